"""bench.voc --protocol reference on a fake VOC tree: the run states its protocol and its optimism, and each
difference from our protocol is visible on its own (loss weighting, input scaling, crops, void as background,
defaults, the training gradient). CPU, tiny."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from bench import runner
from bench import voc as cli
from bench.data import voc
from bench.data.fake_voc import make_fake_voc
from bench.protocol import OURS, REFERENCE
from unroll.segmentation.train import TrainConfig, compute_loss
from zoo import SegOutput

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_fake_voc(tmp_path_factory.mktemp("fakevoc"), n_train=6, n_val=2, n_extra=2, seed=0)


def test_short_reference_run_states_protocol_and_optimism(voc_root, tmp_path, capsys):
    out = tmp_path / "ref"
    argv = ["--root", str(voc_root), "--out", str(out), "--protocol", "reference", "--labels", "2",
            "--backbone", "small_vgg", "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--steps", "2", "--pretrain-steps", "1", "--eval-every", "1", "--device", "cpu", "--no-progress",
            "--no-figures"]
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "OPTIMISTIC" in log and "protocol reference" in log
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "reference" and m["optimistic"] is True
    assert m["reported"].startswith("OPTIMISTIC: best val mIoU of 2 evaluations on the reported set")
    assert m["val_selected_miou"] == pytest.approx(m["miou"], abs=1e-9)  # selected and reported on the same set
    assert "centre square crop resized to 32x32" in m["evaluated_on"] and "void (255) counted as background" in \
        m["evaluated_on"]
    g = m["training_gradient"]
    assert g["kind"] == "reference" and g["tie"] == "alias" and g["unpool"] == "overwrite"
    assert g["decoder_weights"].startswith("aliased")  # on the CPU nothing moves the model: two AdamW steps
    assert m["config"]["weight_decay"] == 0.01 and m["config"]["eval_every"] == 1
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["val_miou"] is not None for r in rows)  # val: every eval
    assert m["classifier"]["protocol"] == "reference"  # its own classification stage (other input scaling)


def test_ours_stays_the_default(voc_root):
    args = cli.build_parser().parse_args(["--root", str(voc_root)])
    cli.check(args)
    assert args.protocol == "ours" and args.eval_every == 1000 and args.weight_decay == 1e-4
    assert args.default_steps == 10_000
    assert OURS.steps == 10_000 and not OURS.optimistic and OURS.gradient is None


def test_reference_defaults():
    """100 epochs of ceil(15676 / 10) batches; evaluation every 3000 images; AdamW's default weight decay."""
    assert REFERENCE.steps == 100 * math.ceil(15676 / 10) == 156_800
    assert REFERENCE.eval_every == 300 and REFERENCE.weight_decay == 0.01
    assert REFERENCE.gradient.epsilon == 1e-8 and REFERENCE.gradient.tie == "alias"
    args = cli.build_parser().parse_args(["--protocol", "reference"])
    cli.check(args)
    assert args.eval_every == 300 and args.weight_decay == 0.01
    assert runner.steps_from(None, None, 10582, 5, args.default_steps) == 156_800  # the runner's default steps


def test_select_on_is_refused_under_the_reference_protocol(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--protocol", "reference", "--select-on", "4"])
    assert exc.value.code == 2 and "selects on val itself" in capsys.readouterr().err


def test_reference_evaluation_crop_counts_void_as_background(voc_root):
    """val under the reference recipe: the centred square of the shorter side resized to the crop size, masks
    without void (255 -> 0); elsewhere the same labels as our full-image mask cropped the same way."""
    size = 32
    ref = voc.VOCPixelSet(voc_root, image_set="val", train=False, image_size=size, recipe="reference")
    ours = voc.VOCPixelSet(voc_root, image_set="val", train=False)
    assert ref.sizes() == [(size, size)] * len(ref)
    for i in range(len(ref)):
        r, o = ref[i], ours[i]
        h, w = o["mask"].shape
        side = min(h, w)
        want = TF.center_crop(o["mask"][None], [side, side])
        want = F.interpolate(want[None].float(), size=(size, size), mode="nearest")[0, 0].long()
        assert r["image"].shape == (3, size, size)
        assert not (r["mask"] == 255).any() and (want == 255).any()  # fake VOC draws void outlines
        assert torch.equal(r["mask"], torch.where(want == 255, 0, want))
        assert r["image"].min() >= 1 / 256 and r["image"].max() <= 1.0  # (x + 1) / 256: never exactly 0


def test_reference_training_transform_is_photometric_and_square(voc_root):
    ds = voc.VOCPixelSet(voc_root, image_set="train", train=True, image_size=32, recipe="reference")
    torch.manual_seed(0)
    a = ds[0]
    torch.manual_seed(1)
    b = ds[0]
    assert a["image"].shape == b["image"].shape == (3, 32, 32)
    assert not torch.equal(a["image"], b["image"])
    assert a["image"].min() > 0 and not (a["mask"] == 255).any()
    # the colour statistics move (brightness/contrast always): the per-image mean differs beyond crop effects
    means = []
    for seed in range(8):
        torch.manual_seed(seed)
        means.append(float(ds[0]["image"].mean()))
    assert max(means) - min(means) > 0.01


def test_reference_loss_is_soft_margin_times_batch():
    """cls_loss='reference': mean over all K columns (background weight 0) of the sigmoid CE, mean over rows, times
    the batch size; against our BCE (mean over rows and the K-1 object classes) that is B (K-1)/K: 9.52 at B=10,
    K=21."""
    torch.manual_seed(0)
    B, K = 10, 21
    logits = torch.randn(B, K, dtype=torch.double)
    labels = (torch.rand(B, K) < 0.2).double()
    labels[:, 0] = 1
    batch = {"labels": labels, "mask": torch.zeros(B, 2, 2, dtype=torch.long), "has_mask": torch.zeros(B, dtype=bool)}
    out = SegOutput(logits, None)
    ref, _ = compute_loss(out, batch, TrainConfig(batch_size=B, cls_loss="reference"))
    ours, _ = compute_loss(out, batch, TrainConfig(batch_size=B))
    p = torch.sigmoid(logits)
    per = -(labels * p.log() + (1 - labels) * (1 - p).log())
    per[:, 0] = 0
    assert float(ref) == pytest.approx(float(per.sum(1).div(K).mean() * B), rel=1e-12)
    assert float(ref / ours) == pytest.approx(B * (K - 1) / K, rel=1e-12)
    assert B * (K - 1) / K == pytest.approx(9.52, abs=5e-3)
    with pytest.raises(ValueError, match="cls_loss"):
        TrainConfig(cls_loss="soft")
