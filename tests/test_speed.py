"""bench.speed end to end on a tiny configuration: every row runs, the agreement check passes (and is asserted, so a
method computing other maps stops the benchmark), the JSON has every figure. Timings are not asserted (benchmarks,
not tests)."""

import json

import pytest
import torch

from bench import speed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", ["resnet18", "vgg11_bn"])
def test_every_row_runs_and_agrees(model, tmp_path):
    pytest.importorskip("captum")
    pytest.importorskip("zennit")
    out = tmp_path / "speed.json"
    speed.main(["--model", model, "--size", "32", "--batch", "2", "--classes", "3", "--repeats", "1", "--warmup", "0",
                "--no-memory", "--json", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert set(rows) == set(speed.HEATMAP_ROWS + speed.TRAIN_ROWS)
    for name, row in rows.items():
        assert row["seconds"] is not None and row["seconds"] > 0, (name, row["note"])
    agreement = report["agreement"]
    for name in ("autograd_loop", "autograd_batched", "captum", "zennit"):
        assert agreement[name] < 1e-3, name  # zennit: against unroll(rule="epsilon"), canonized (zennit_composite)
    assert agreement["train_grads"] < 1e-2
    summary = report["summary"]
    for key in ("heatmaps_vs_autograd_loop", "heatmaps_in_K_forwards", "heatmaps_vs_forward_on_BK_images",
                "train_vs_double_backprop", "train_half_vs_double_backprop"):
        assert summary[key] > 0, key


def test_disagreeing_method_stops_the_benchmark(monkeypatch):
    """The agreement check is an assertion, not a report: a row that computes other maps is never timed."""
    args = speed.parser().parse_args(["--model", "resnet18", "--size", "32", "--classes", "3"])
    s = speed.Setup(args)
    monkeypatch.setattr(speed.Setup, "autograd_loop", lambda self: self.unroll() * 1.01)
    with pytest.raises(AssertionError, match="autograd_loop differs"):
        speed.check_agreement(s, ["unroll", "autograd_loop"])


def test_memory_row_in_a_subprocess():
    args = speed.parser().parse_args(["--model", "resnet18", "--size", "32", "--classes", "3"])
    mib = speed.memory_in_subprocess(args, "train_unroll")
    assert mib is not None and mib > 0
    assert torch.get_num_threads() >= 1
