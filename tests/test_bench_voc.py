"""python -m bench.voc end to end on a fake VOC tree (bench.data.fake_voc): every model trains two steps and is
evaluated, metrics.json has its fields, --resume after an interruption ends where an uninterrupted run ends, missing
data exits 2, bad flags are usage errors, and a 2-process torch.distributed (gloo) run finishes. CPU, tiny."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from bench import runner
from bench import voc as cli
from bench.data.fake_voc import make_fake_voc
from bench.data.voc import CLASSES

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: small ops run faster single-threaded


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_fake_voc(tmp_path_factory.mktemp("fakevoc"), n_train=6, n_val=2, n_extra=2, seed=0)


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier")  # the classification stage runs once, later runs reuse it


def flags(root, out, clf_dir, model="unrolled", *extra):
    return ["--root", str(root), "--out", str(out), "--classifier-dir", str(clf_dir), "--model", model,
            "--labels", "2", "--backbone", "small_vgg", "--weights", "none", "--image-size", "32",
            "--batch-size", "4", "--steps", "2", "--pretrain-steps", "2", "--eval-every", "1", "--device", "cpu",
            "--no-progress", *extra]


@pytest.mark.parametrize("model", cli.MODELS)
def test_every_model_trains_and_writes_metrics(model, voc_root, clf_dir, tmp_path):
    out = tmp_path / model
    extra = [] if model == "unrolled" else ["--no-figures"]  # figures once is enough
    assert cli.main(flags(voc_root, out, clf_dir, model, *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= m["miou"] <= 1.0
    assert list(m["per_class_iou"]) == list(CLASSES)
    assert m["f1"] is not None and 0.0 <= m["f1"] <= 1.0  # unet/fcn: the shared classifier's F1
    assert m["steps"] == 2 and m["images_per_s"] > 0
    assert m["config"]["model"] == model and m["labels"] == 2 and len(m["labelled_ids"]) == 2
    assert m["reported"].startswith("last step")
    assert "val" in m["evaluated_on"]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "labelled.txt").read_text().split() == m["labelled_ids"]
    if model == "unrolled":
        assert (out / "predictions.png").is_file() and (out / "evolution.png").is_file()
        assert m["classifier"]["source"] in ("trained here", "cached")


def test_resume_matches_uninterrupted(voc_root, clf_dir, tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    extra = ["--steps", "3", "--select-on", "2", "--no-figures"]
    # the reference loads its batches in 2 worker processes: the same batches as in-process loading
    assert cli.main(flags(voc_root, ref, clf_dir, "unrolled", *extra, "--workers", "2")) == 0
    assert cli.main(flags(voc_root, split, clf_dir, "unrolled", *extra, "--stop-after", "1")) == 0
    assert (split / "ckpt.pt").is_file() and not (split / "metrics.json").exists()
    assert cli.main(flags(voc_root, split, clf_dir, "unrolled", *extra, "--resume")) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, split))
    for key in ("miou", "per_class_iou", "f1", "best_step", "held_out_miou", "labelled_ids", "held_out_ids"):
        assert a[key] == b[key], key
    assert a["reported"].startswith("best held-out mIoU") and len(a["held_out_ids"]) == 2
    assert not set(a["held_out_ids"]) & set(a["labelled_ids"])
    assert (ref / "history.jsonl").read_text() == (split / "history.jsonl").read_text()


def test_decoder_memory_flags_give_the_same_run(voc_root, clf_dir, tmp_path):
    """--classes-per-chunk / --decoder-checkpoint only trade memory for time: the same losses and metrics."""
    runs = {"one pass": ["--classes-per-chunk", "none"],
            "chunks + checkpoint": ["--classes-per-chunk", "4", "--decoder-checkpoint"]}
    out = {}
    for name, extra in runs.items():
        d = tmp_path / name.replace(" ", "")
        assert cli.main(flags(voc_root, d, clf_dir, "unrolled", "--no-figures", "--steps", "3", *extra)) == 0
        out[name] = (json.loads((d / "metrics.json").read_text()),
                     [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()])
    (a, ha), (b, hb) = out.values()
    assert b["config"]["classes_per_chunk"] == 4 and b["config"]["decoder_checkpoint"] is True
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("loss", "seg", "cls"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert b["miou"] == pytest.approx(a["miou"], abs=1e-6)


def test_amp_bf16_on_cpu_runs_and_agrees(voc_root, clf_dir, tmp_path):
    """--amp (bf16 autocast) through the whole CLI on the CPU: it trains, records amp in the config, and its step-1
    losses agree with float32 (a smoke check: an untrained model's seg loss sits near log 21; heatmap precision
    under bf16 is tested in test_fast_paths). The CUDA path is the same code with device_type='cuda'."""
    first = {}
    for name, extra in {"fp32": [], "bf16": ["--amp"]}.items():
        d = tmp_path / name
        assert cli.main(flags(voc_root, d, clf_dir, "unrolled", "--no-figures", *extra)) == 0
        first[name] = json.loads((d / "history.jsonl").read_text().splitlines()[0])
        assert json.loads((d / "metrics.json").read_text())["config"]["amp"] is (name == "bf16")
    for key in ("seg", "cls"):
        assert first["bf16"][key] == pytest.approx(first["fp32"][key], rel=2e-2), key


def test_full_image_evaluation_does_not_depend_on_batching(voc_root):
    """Every val image is predicted at its own size whatever the eval batch: equal-size batches when the dataset
    knows its sizes, same-size groups of a padded batch otherwise. Padding would change the result (checked)."""
    from torch.utils.data import Subset

    from zoo import segmentation as bench_models
    from bench.data.voc import VOCPixelSet
    from unroll.segmentation.train import collate, evaluate

    ds = VOCPixelSet(voc_root, image_set="train", train=False)  # 6 full images, 3 sizes
    assert len(set(ds.sizes())) == 3 and ds.sizes()[0] == tuple(ds[0]["image"].shape[-2:])
    torch.manual_seed(0)
    model = bench_models.build("unrolled", zoo.classifier("small_vgg", 21), 21)
    ref = evaluate(model, ds, 21, batch_size=1)
    for bs in (2, 6):
        assert evaluate(model, ds, 21, bs) == ref
        assert evaluate(model, Subset(ds, range(6)), 21, bs) == ref  # no sizes(): groups inside padded batches
    grad_modes = []
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    evaluate(model, ds, 21, 2)
    assert grad_modes and not any(grad_modes)  # no autograd graph of full images in evaluation
    padded = evaluate(model, Subset(ds, range(6)), 21, 6,
                      collate_fn=lambda items: {k: v for k, v in collate(items).items() if k != "size"})
    assert padded["miou"] != ref["miou"]  # what padding would have done: the test can fail


def test_model_pert_classifier_stage(voc_root, clf_dir, tmp_path):
    """--pretrain-perturb trains the classifier stage on noisy inputs; the choice is part of the cache spec (a clean
    cached classifier is never taken for a perturbed one) and the cached file stays a plain classifier state dict."""
    pert_dir = tmp_path / "clf-binary"
    args = flags(voc_root, tmp_path / "o", pert_dir, "unrolled", "--no-figures", "--steps", "1",
                 "--pretrain-perturb", "binary")
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["classifier"]["perturb"] == "binary" and m["classifier"]["source"] == "trained here"
    spec = json.loads((pert_dir / "spec.json").read_text())
    assert spec["perturb"] == "binary"
    clf = zoo.classifier("small_vgg", 21)
    clf.load_state_dict(torch.load(pert_dir / "classifier.pt", weights_only=True))  # strict: no extra keys


def test_missing_data_exits_2(tmp_path, capsys):
    code = cli.main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2
    text = capsys.readouterr().out.replace("\n", " ")
    assert "--root" in text and "--download" in text


@pytest.mark.parametrize("bad, message", [
    (["--model", "resnet"], "invalid choice"),
    (["--labels", "0"], "integer >= 1"),
    (["--steps", "3", "--epochs", "1"], "not both"),
    (["--pixel-fraction", "1"], "strictly between 0 and 1"),
    (["--weights", "/no/such/file.pt"], "--weights takes"),
    (["--heatmap-scale", "hot"], "positive number or 'learn'"),
    (["--classes-per-chunk", "0"], "positive integer, 'none' or 'auto'"),
    (["--model", "unet", "--decoder-checkpoint"], "apply to the tied models"),
    (["--model", "fcn", "--classes-per-chunk", "3"], "apply to the tied models"),
    (["--model", "unet", "--background", "constant"], "applies to the tied models"),
    (["--model", "fcn", "--presence", "prior"], "applies to the tied models"),
    (["--calibration-lr", "30"], "there are none"),
    (["--calibration-lr", "0"], "--calibration-lr"),
])
def test_bad_flags_are_usage_errors(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--root", str(tmp_path), "--out", str(tmp_path / "o"), *bad])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_too_many_labels_is_a_usage_error(voc_root, clf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(flags(voc_root, tmp_path / "o", clf_dir, "unrolled", "--labels", "7"))
    assert exc.value.code == 2 and "exceeds the 6 images" in capsys.readouterr().err


def test_torchrun_two_processes(voc_root, clf_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bench.voc",
           *flags(voc_root, out, clf_dir, "unrolled", "--select-on", "2", "--no-figures")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["environment"]["world_size"] == 2 and m["steps"] == 2
    assert (out / "history.jsonl").is_file() and (out / "ckpt.pt").is_file()


def test_ctrl_c_saves_then_resume_matches(voc_root, clf_dir, tmp_path, monkeypatch):
    """A real SIGINT during training: the step finishes, a checkpoint is written, exit 130; --resume then ends where
    an uninterrupted run ends."""
    import signal

    extra = ["--steps", "3", "--eval-every", "3", "--no-figures"]
    ref, split = tmp_path / "ref", tmp_path / "split"
    assert cli.main(flags(voc_root, ref, clf_dir, "fcn", *extra)) == 0
    real_step = runner.Progress.step

    def step(self, n, parts):
        real_step(self, n, parts)
        if n == 1 and self.name.startswith("fcn"):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runner.Progress, "step", step)
    assert cli.main(flags(voc_root, split, clf_dir, "fcn", *extra)) == 130
    saved = torch.load(split / "ckpt.pt", weights_only=True)
    assert saved["state"]["step"] == 1
    monkeypatch.setattr(runner.Progress, "step", real_step)
    assert cli.main(flags(voc_root, split, clf_dir, "fcn", *extra, "--resume")) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, split))
    assert a["miou"] == b["miou"] and a["per_class_iou"] == b["per_class_iou"] and a["f1"] == b["f1"]


def test_voc_table_dry_run_and_tables(tmp_path, capsys):
    from bench import voc_table

    args = ["--root", "R", "--out", str(tmp_path), "--labels", "20,100", "--models", "unrolled,unet",
            "--backbones", "resnet18", "--seeds", "2"]
    assert voc_table.main([*args, "--dry-run", "--", "--amp"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and all("-m bench.voc" in l and l.endswith("--amp") for l in lines)
    assert voc_table.main([*args, "--dry-run", "--", "--classes-per-chunk", "3", "--decoder-checkpoint"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()  # the memory flags reach the tied runs only
    assert [l.endswith("--classes-per-chunk 3 --decoder-checkpoint") for l in lines] == [
        "--model unrolled" in l for l in lines] and sum("--model unrolled" in l for l in lines) == 4
    for seed, miou in ((0, 0.5), (1, 0.7)):
        d = voc_table.run_dir(tmp_path, "resnet18", "unrolled", 20, seed)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"miou": miou, "f1": 0.9, "steps": 1, "best_step": 1,
                                                    "images_per_s": 1.0}))
    assert voc_table.main([*args, "--collect"]) == 0
    text = (tmp_path / "tables.md").read_text()
    assert "| unrolled | 60.0 ± 14.1 | - |" in text and "| unet | - | - |" in text


def test_constant_background_presence_and_calibration_lr_reach_the_model(voc_root, clf_dir, tmp_path):
    """--background constant / --calibration-lr: the run trains that model (its background level moves at the
    scaled lr) and the checkpoint rebuilds it (load_trained) with the level it learnt."""
    from bench.runner import load_trained

    out = tmp_path / "bgc"
    assert cli.main(flags(voc_root, out, clf_dir, "unrolled", "--no-figures", "--background", "constant",
                          "--presence", "prior", "--heatmap-scale", "learn", "--calibration-lr", "1000", "--lr", "1e-4")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["background"] == "constant" and m["config"]["calibration_lr"] == 1000
    model, meta = load_trained(out / "ckpt.pt")
    assert model.background == "constant" and meta["model_kwargs"]["background"] == "constant"
    assert model.presence == "prior" and meta["model_kwargs"]["presence"] == "prior"
    level = float(model.background_level.detach())
    # two AdamW steps at 1000 x 1e-4 = 0.1 each move the level (initialised at 0) by ~0.2; 1e-4 alone by ~2e-4
    assert 0.05 < abs(level) < 0.5, level
