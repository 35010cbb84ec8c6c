"""unroll.segmentation.wsss_metrics, unroll.segmentation.resolve and the bench.wsss / bench.window command lines."""
import json
import math

import pytest
import torch
from torchmetrics import Metric

from unroll.segmentation.metrics import SegmentationIoU
from unroll.segmentation.resolve import (SWEEP_THRESHOLDS, normalize, resolve, resolve_basic, smooth_maps,
                                         superpixel_maps, superpixels, threshold_sweep)
from unroll.segmentation.wsss_metrics import DRRecall, ForegroundPrecision, NDRRecall, RegionRecall, wsss_metrics

# ------------------------------------------------------------------------------------------------ metrics
# one 2x4 image, classes 0 (background), 1, 2; one ignored pixel
TARGET = torch.tensor([[[0, 1, 1, 255], [2, 2, 0, 0]]])
PREDS = torch.tensor([[[1, 1, 2, 1], [2, 2, 0, 2]]])


def _cam():
    cam = torch.zeros(1, 3, 2, 4)
    cam[0, 1, 0, 1] = 0.9  # GT 1, DR
    cam[0, 1, 0, 2] = 0.1  # GT 1, NDR
    cam[0, 2, 1, 0] = 0.25  # GT 2, DR (>= tau)
    cam[0, 2, 1, 1] = 0.2  # GT 2, NDR
    cam[0, 1, 1, 1] = 0.9  # another class's CAM at a GT-2 pixel: must not count
    cam[0, 2, 0, 2] = 0.9
    return cam


def test_foreground_precision_by_hand():
    m = ForegroundPrecision()
    assert isinstance(m, Metric)
    m.update(PREDS, TARGET)
    # predicted foreground, target not ignored: (0,0) 1 vs 0 wrong, (0,1) right, (0,2) 2 vs 1 wrong, (1,0) right,
    # (1,1) right, (1,3) 2 vs 0 wrong; (0,3) has target 255 -> 3 / 6
    assert m.compute().item() == pytest.approx(0.5)


def test_region_recalls_by_hand():
    dr, ndr = DRRecall(), NDRRecall()
    dr.update(PREDS, TARGET, _cam())
    ndr.update(PREDS, TARGET, _cam())
    # DR (GT-class CAM >= 0.25): (0,1) right, (1,0) right -> 2/2; NDR: (0,2) predicted 2 for 1 wrong, (1,1) right -> 1/2
    assert dr.compute().item() == pytest.approx(1.0)
    assert ndr.compute().item() == pytest.approx(0.5)
    # the ground-truth class's CAM given directly as (N, H, W)
    gathered = torch.tensor([[[0, 0.9, 0.1, 0], [0.25, 0.2, 0, 0]]])
    r = RegionRecall("ndr")
    r.update(PREDS, TARGET, gathered)
    assert r.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        RegionRecall("middle")


def test_metrics_sum_over_the_dataset_not_per_image():
    m = ForegroundPrecision()
    m.update(PREDS, TARGET)  # 3 / 6
    m.update(torch.tensor([[[1, 1]]]), torch.tensor([[[1, 1]]]))  # 2 / 2
    assert m.compute().item() == pytest.approx(5 / 8)  # not (0.5 + 1) / 2
    empty = NDRRecall()
    zeros = torch.zeros(1, 2, 2, dtype=torch.long)
    empty.update(zeros, zeros, torch.zeros(1, 3, 2, 2))
    assert math.isnan(empty.compute().item())  # no ground-truth foreground at all


def test_wsss_collection():
    m = wsss_metrics(3)
    m.update(PREDS, TARGET, cam=_cam())
    out = m.compute()
    ref = SegmentationIoU(3)
    ref.update(PREDS, TARGET)
    assert set(out) == {"miou", "fg_precision", "dr_recall", "ndr_recall"}
    assert out["miou"].item() == pytest.approx(ref.compute()["miou"].item())
    assert (out["fg_precision"].item(), out["dr_recall"].item(), out["ndr_recall"].item()) == pytest.approx(
        (0.5, 1.0, 0.5))


# ------------------------------------------------------------------------------------------------ resolves


def test_basic_resolve_by_hand():
    maps = torch.zeros(2, 3, 2, 3)
    maps[0, 1] = torch.tensor([[4.0, 2, 0], [0, 0, 1]])  # normalised: [[1, .5, 0], [0, 0, .25]]
    maps[0, 2] = torch.tensor([[0.0, 3, 3], [0, -1, 0]])  # normalised: [[0, 1, 1], [0, 0, 0]]
    maps[0, 0] = 100.0  # the background channel is never read
    maps[1] = maps[0]
    labels = torch.tensor([[1, 1, 1], [1, 1, 0]])  # image 1: class 2 not in the image
    out = resolve_basic(maps, labels, threshold=0.3)
    assert out[0].tolist() == [[1, 2, 2], [0, 0, 0]]
    assert out[1].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert resolve_basic(maps, labels, threshold=0.25)[0].tolist() == [[1, 2, 2], [0, 0, 1]]  # >= threshold
    assert resolve_basic(maps, torch.tensor([[1, 0, 0], [1, 0, 0]]), 0.01).eq(0).all()  # no class: background


def test_smooth_resolve_is_a_gaussian_disc():
    maps = torch.zeros(1, 2, 31, 31, dtype=torch.double)
    maps[0, 1, 15, 15] = 5.0
    smooth = smooth_maps(maps)  # kernel 13, sigma 5: normalised value exp(-d^2 / 50) within the kernel
    yy, xx = torch.meshgrid(torch.arange(31) - 15, torch.arange(31) - 15, indexing="ij")
    d2 = (yy ** 2 + xx ** 2).double()
    inside = (yy.abs() <= 6) & (xx.abs() <= 6)
    torch.testing.assert_close(smooth[0, 1], torch.where(inside, torch.exp(-d2 / 50), torch.zeros_like(d2)))
    out = resolve(maps, torch.tensor([[1, 1]]), "smooth", threshold=math.exp(-24.5 / 50))
    assert torch.equal(out[0], (d2 <= 24).long())  # the disc of squared radius 24, class 1
    assert resolve(maps, torch.tensor([[1, 1]]), "basic", threshold=0.01)[0].sum() == 1  # unsmoothed: one pixel


def test_superpixel_resolve_spreads_over_segments():
    image = torch.full((1, 1, 16, 16), 0.1)
    image[..., 8:] = 0.9  # two flat halves -> two superpixels
    seg = superpixels(image)
    assert seg[0, :, :8].unique().numel() == 1 and seg[0, :, 8:].unique().numel() == 1
    assert seg[0, 0, 0] != seg[0, 0, 15]
    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 1, :, 8:14] = 1.0  # hot on 6 of the right half's 8 columns -> mean 0.75 there
    maps[0, 1, :, :8] = 0.2  # lukewarm left half -> mean 0.2
    scores = superpixel_maps(maps, seg)
    torch.testing.assert_close(scores[0, 1, 0], torch.tensor([0.2] * 8 + [0.75] * 8))
    out = resolve(maps, torch.tensor([[1, 1]]), "superpixel", images=image)  # threshold 0.3
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[:, 8:] = 1
    assert torch.equal(out[0], expected)
    assert resolve(maps, torch.tensor([[1, 1]]), "basic", threshold=0.3)[0, :, 14:].eq(0).all()


def test_sweep_picks_the_known_best_threshold():
    scores = torch.zeros(1, 2, 10, 10)
    scores[0, 1] = torch.arange(100).view(10, 10) / 100.0  # 0.00 .. 0.99
    target = (scores[:, 1] >= 0.23).long()  # exactly the pixels a threshold of 0.23 keeps
    sweep = threshold_sweep(2)
    sweep.update(scores, torch.tensor([[1, 1]]), target)
    res = sweep.compute()
    assert len(res.thresholds) == 50 and res.thresholds[0] == 0.01 and res.thresholds[-1] == 0.5
    assert res.best_threshold == pytest.approx(0.23)
    assert res.best_miou == pytest.approx(1.0)
    assert all(m < 1.0 for t, m in zip(res.thresholds, res.miou) if abs(t - 0.23) > 1e-9)


def test_sweep_equals_segmentation_iou_at_every_threshold():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 12, 12, generator=g)
    labels = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0], [1, 0, 0, 0]])
    target = torch.randint(0, 4, (3, 12, 12), generator=g)
    target[0, :2] = 255
    scores = normalize(maps)
    sweep = threshold_sweep(4)
    sweep.update(scores[:2], labels[:2], target[:2])  # two batches accumulate
    sweep.update(scores[2:], labels[2:], target[2:])
    res = sweep.compute()
    for i in (0, 9, 24, 49):
        ref = SegmentationIoU(4)
        ref.update(resolve_basic(maps, labels, SWEEP_THRESHOLDS[i]), target)
        assert res.miou[i] == pytest.approx(ref.compute()["miou"].item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------ command lines


def test_wsss_quick_cli(tmp_path):
    from bench import wsss

    out = tmp_path / "wsss"
    assert wsss.main(["--dataset", "digits", "--quick", "--out", str(out), "--seed", "1"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == set(wsss.METHOD_ORDER)
    for method, per_resolve in report["results"].items():
        assert set(per_resolve) == {"basic", "smooth", "superpixel"}
        for r, v in per_resolve.items():
            assert 0 <= v["miou"] <= 1 and 0.01 <= v["threshold"] <= 0.5
            assert len(v["sweep"]["miou"]) == 50
    for name in ["results.md", "hyperplanes.png", "classifier.pt"] + [f"panel_{m}.png" for m in wsss.METHOD_ORDER]:
        assert (out / name).is_file(), name
    from bench.wsss import Config, load_split

    _, test_masks, _ = load_split(Config.for_dataset("digits", quick=True, seed=1), "test")
    fg_pixels = int((test_masks != 0).sum())
    assert report["region_pixels"]["dr"] + report["region_pixels"]["ndr"] == fg_pixels > 0
    md = (out / "results.md").read_text()
    assert "Table 4" in md and ("(+" in md or "(-" in md)

    # a bare state dict as --checkpoint: the architecture is read off the weights
    state = torch.load(out / "classifier.pt", weights_only=True)["model"]
    torch.save(state, tmp_path / "bare.pt")
    out2 = tmp_path / "ckpt"
    assert wsss.main(["--quick", "--checkpoint", str(tmp_path / "bare.pt"), "--out", str(out2), "--seed", "1",
                      "--methods", "cam", "saliency", "--finetune-epochs", "0"]) == 0
    again = json.loads((out2 / "results.json").read_text())
    assert set(again["results"]) == {"cam", "saliency"}
    assert again["classifier"]["config"]["kwargs"]["widths"] == [16, 32, 64, 128]
    # same classifier, same test images -> same CAM and saliency numbers
    assert again["results"]["cam"] == report["results"]["cam"]
    assert again["results"]["saliency"] == report["results"]["saliency"]


def test_wsss_voc_without_voc_exits_2(tmp_path, monkeypatch):
    from bench import wsss

    monkeypatch.setenv("UNROLL_DATA", str(tmp_path))
    assert wsss.main(["--dataset", "voc", "--out", str(tmp_path / "o")]) == 2


def test_wsss_voc_on_a_fake_voc_tree(tmp_path):
    """The VOC path end to end on a tiny VOC-format tree: a 21-output classifier checkpoint (what bench.voc's
    classification stage caches), colour images, 255 borders, every method and resolve."""
    import zoo
    from bench import wsss
    from bench.data.fake_voc import make_fake_voc

    root = make_fake_voc(tmp_path / "voc", n_train=2, n_val=5, n_extra=0, seed=3)
    torch.manual_seed(0)
    clf = zoo.classifier("small_vgg", 21, widths=(8, 16))
    torch.save(clf.state_dict(), tmp_path / "clf.pt")
    out = tmp_path / "o"
    # no checkpoint, or model-pert fine-tuning asked for: clear errors, exit 2
    assert wsss.main(["--dataset", "voc", "--voc-root", str(root), "--out", str(out)]) == 2
    assert wsss.main(["--dataset", "voc", "--voc-root", str(root), "--checkpoint", str(tmp_path / "clf.pt"),
                      "--finetune-epochs", "1", "--out", str(out)]) == 2
    methods = [m for m in wsss.METHOD_ORDER if not m.startswith("model_pert")]
    assert wsss.main(["--dataset", "voc", "--voc-root", str(root), "--checkpoint", str(tmp_path / "clf.pt"),
                      "--quick", "--n-test", "4", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == set(methods)  # model-pert rows: not on VOC (see --pretrain-perturb)
    assert report["n_test"] == 4 and report["size"] == 32
    assert report["classifier"]["config"]["num_classes"] == 21
    for per_resolve in report["results"].values():
        for v in per_resolve.values():
            assert 0 <= v["miou"] <= 1
    x, masks, labels = wsss.load_split(wsss.Config.for_dataset("voc", quick=True, n_test=4, voc_root=str(root)),
                                       "test")
    assert x.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32) and labels.shape == (4, 21)
    assert (masks == 255).any()  # the void borders survive the resize (nearest) and are ignored by the metrics
    for m, y in zip(masks, labels):  # image labels are exactly the classes of the cropped mask, background first
        present = set(m.unique().tolist()) - {255}
        assert set(y.nonzero().flatten().tolist()) == present | {0}
    fg = int(((masks != 0) & (masks != 255)).sum())
    assert report["region_pixels"]["dr"] + report["region_pixels"]["ndr"] == fg
    assert (out / "hyperplanes.png").is_file() and (out / "panel_random_crops.png").is_file()


def test_window_quick_cli(tmp_path):
    from bench import window

    assert window.main(["--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "window.json").read_text())
    assert [r["kernel_size"] for r in report["rows"]] == [1, 3]
    assert [r["window"] for r in report["rows"]] == [1, 11]
    for r in report["rows"]:
        for name in ("cam", "saliency"):
            assert 0 <= r[name]["miou"] <= 1
    assert (tmp_path / "window.png").is_file() and (tmp_path / "window.md").is_file()
