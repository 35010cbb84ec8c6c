"""python -m bench.digits: a tiny end-to-end run (results.json / results.md / figures), CLI resume, bad flags, a missing
MNIST folder. One process, one thread; well under a minute on two cores."""

import json
import shutil

import pytest
import torch

import bench.digits as digits
from bench.data.digits import class_names

# Smaller than --quick, and single-digit scenes (a classifier learns them in 150 steps): the real pipeline end to
# end in about 20 s of CPU. Two models, one label count, short training.
TINY = ["--quick", "--jobs", "1", "--scene", "single", "--train-scenes", "300", "--val-scenes", "32",
        "--test-scenes", "64", "--clf-steps", "150", "--steps", "80", "--eval-every", "40", "--labels", "40",
        "--models", "unrolled,unet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: small ops run faster single-threaded


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert digits.main([*TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_structure(tiny_run):
    out, res = tiny_run
    assert res["format"] == "unroll-bench-digits/1"
    assert res["classes"] == class_names and res["label_counts"] == [40] and res["train_scenes"] == 300
    assert res["models"] == ["unrolled", "unet"]
    for model in res["models"]:
        s = res["summary"][model]["40"]
        assert set(s) >= {"miou", "f1_after", "f1_before", "per_class_iou", "best_step"}
        assert 0 <= s["miou"]["mean"] <= 1 + 1e-6 and s["miou"]["std"] == 0.0 and len(s["miou"]["values"]) == 1
        assert 0 <= s["f1_after"]["mean"] <= 1 + 1e-6
        assert len(s["per_class_iou"]) == len(class_names)
    assert 0 <= res["classifier"]["test_f1"]["mean"] <= 1 + 1e-6
    runs = res["runs"]
    assert [r["task"]["kind"] for r in runs] == ["classifier", "seg", "seg"]
    for r in runs:
        assert r["history"] and all("step" in h and "loss" in h for h in r["history"])
        assert 0 < r["best_step"] <= r["task"]["train"]["steps"]
    # both models of a seed see the same batches and the same labelled scenes
    seg = [r["task"] for r in runs[1:]]
    assert seg[0]["train"]["seed"] == seg[1]["train"]["seed"] and seg[0]["labels"] == seg[1]["labels"]
    md = (out / "results.md").read_text()
    assert "Test mIoU" in md and "unrolled" in md and "N=40" in md
    for name in ("predictions_N40.png", "heatmaps_N40.png", "evolution_N40.png", "curves_N40.png", "sweep.png"):
        assert (out / name).stat().st_size > 1000, name
    assert not list(out.rglob("ckpt.pt")), "finished runs delete their checkpoints (unless --keep-checkpoints)"


def test_trained_unrolled_beats_untrained(tiny_run):
    """Segmentation training clearly improves on the same model untrained: both on the heatmaps of the classifier at
    initialisation and on those of the trained classifier before segmentation training."""
    _, res = tiny_run
    trained = res["summary"]["unrolled"]["40"]["miou"]["mean"]
    initial = res["classifier"]["test_miou_of_initial_heatmaps"]["mean"]
    classifier_only = res["classifier"]["test_miou_of_untrained_heatmaps"]["mean"]
    assert trained > initial + 0.15, (trained, initial)
    assert trained > classifier_only + 0.08, (trained, classifier_only)


def test_cli_resume_matches_uninterrupted(tiny_run, tmp_path, monkeypatch):
    """Interrupt a run halfway (as Ctrl-C would), then --resume: exactly the numbers of the uninterrupted run."""
    ref_dir, ref = tiny_run
    # Reuse the trained classifier (--resume takes finished runs as they are): only the segmentation runs repeat.
    shutil.copytree(ref_dir / "runs" / "seed0" / "classifier", tmp_path / "runs" / "seed0" / "classifier")
    real_train = digits.train

    def interrupted(*args, **kwargs):  # the first segmentation run stops after 50 of 80 steps: "Ctrl-C"
        real_train(*args, stop_after=50, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "train", interrupted)
    assert digits.main([*TINY, "--out", str(tmp_path), "--resume"]) == 130
    ckpt = torch.load(tmp_path / "runs" / "seed0" / "N40" / "unrolled" / "ckpt.pt", weights_only=True)
    assert ckpt["state"]["step"] == 50
    monkeypatch.setattr(digits, "train", real_train)
    assert digits.main([*TINY, "--out", str(tmp_path), "--resume"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["task"]["id"] for r in res["runs"]] == [r["task"]["id"] for r in ref["runs"]]
    for a, b in zip(res["runs"], ref["runs"]):
        assert a["test"] == b["test"] and a["history"] == b["history"] and a["best_step"] == b["best_step"]
    for model, by_n in ref["summary"].items():
        for n, s in by_n.items():
            for key in ("miou", "f1_after", "f1_before", "per_class_iou", "best_step"):
                assert res["summary"][model][n][key] == s[key]


@pytest.mark.parametrize("flags, message", [
    (["--labels", "ten"], "--labels takes positive integers"),
    (["--labels", "0"], "must be >= 1"),
    (["--models", "unrolled,resnet"], "unknown model(s) resnet"),
    (["--seeds", "0"], "positive integer"),
    (["--source", "imagenet"], "invalid choice"),
    (["--heatmap-scale", "-1"], "positive number or 'learn'"),
    (["--pixel-fraction", "1"], "strictly between 0 and 1"),
    (["--labels", "5000"], "exceed the"),
    (["--gradient", "reference", "--models", "unet"], "--gradient applies to the 'unrolled' model"),
    (["--gradient", "reference", "--bn", "const"], "--bn const does not apply"),
    (["--calibration-lr", "30", "--heatmap-scale", "10"], "there are none"),
])
def test_bad_flags_exit_2_with_a_message(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        digits.main([*flags, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_mnist_root_exits_2(tmp_path, capsys):
    code = digits.main(["--source", "mnist", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "mnist digits not found" in capsys.readouterr().out.replace("\n", " ")
    assert not (tmp_path / "o").exists()


def test_presence_prior_is_the_tied_default_and_none_keeps_older_runs_cached(tmp_path):
    """The default plan gives the tied models --presence prior-detached (the free decoders no such key); --presence
    none gives exactly the task a run from before the flag had (no key), so cached runs stay valid."""
    def plan(*flags):
        args = digits.resolve(digits.build_parser().parse_args(
            ["--models", "unrolled,ws-ae,unet", "--labels", "10", "--seeds", "1", "--out", str(tmp_path), *flags]))
        return {t["model"]: t for t in digits.plan(args, 100) if t["kind"] == "seg"}
    default, none = plan(), plan("--presence", "none")
    assert default["unrolled"]["presence"] == default["ws-ae"]["presence"] == "prior-detached"
    assert "presence" not in default["unet"] and "presence" not in none["unrolled"]
    assert {k: v for k, v in default["unrolled"].items() if k != "presence"} == none["unrolled"]
