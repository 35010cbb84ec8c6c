"""Training and scoring segmenters built on unroll: the training loop (``unroll.segmentation.train``), metrics
(``.metrics``, ``.wsss_metrics``) and the WSSS map resolves (``.resolve``).

Not imported by ``import unroll`` (whose core needs torch only): these modules use the extras (torchmetrics,
scikit-image; ``pip install unroll[bench]``). Import the submodule you need, e.g.
``from unroll.segmentation.train import TrainConfig, train, evaluate``.
"""
