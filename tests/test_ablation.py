"""python -m bench.ablation --quick: every row of the study trains and lands in results.json / results.md /
curves.png (the numbers of a quick run mean nothing, so none are asserted), and bad rows are refused up front."""

import json

import pytest

import bench.ablation as ablation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    assert ablation.main(["--quick", "--jobs", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_row_and_file(quick_run):
    out, res = quick_run
    assert res["format"] == "unroll-bench-ablation/1" and res["quick"]
    assert [e["row"] for e in res["rows"]] == list(ablation.ROW_NAMES)
    counts = res["label_counts"]
    for e in res["rows"]:
        for n in counts:
            b = e["by_n"][str(n)]
            assert b["seeds"] == [0], e["row"]
            assert 0 <= b["test_miou"] <= 1 and 0 <= b["val_miou"] <= 1
            assert b["loss_at"]["10"] is not None or e["row"] != "steps2000"
    md = (out / "results.md").read_text()
    for name in ablation.ROW_NAMES:
        assert f"| {name} |" in md
    assert (out / "curves.png").stat().st_size > 10_000


def test_rows_share_classifier_and_batches(quick_run):
    _, res = quick_run
    seg = [r for r in res["runs"] if r["task"]["kind"] == "seg"]
    raw = [r["task"] for r in seg if r["task"]["data"]["input"] == "raw"]
    assert len({t["classifier_dir"] for t in raw}) == 1  # one classifier per (source, input, seed)
    assert len({t["train"]["seed"] for t in raw}) == 1  # and the same batches
    clfs = [r for r in res["runs"] if r["task"]["kind"] == "classifier"]
    assert len(clfs) == len({r["task"]["data"]["input"] for r in seg})


def test_resume_reuses_runs(quick_run, capsys):
    out, res = quick_run
    assert ablation.main(["--quick", "--jobs", "1", "--out", str(out), "--resume", "--rows", "base,offset"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [e["row"] for e in again["rows"]] == ["base", "offset"]
    before = {e["row"]: e for e in res["rows"]}
    for e in again["rows"]:
        assert e["by_n"] == before[e["row"]]["by_n"]


def test_bad_rows_refused(capsys):
    with pytest.raises(SystemExit):
        ablation.main(["--rows", "base,nope"])
    assert "unknown row 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(["--extra", "x=--no-such-flag"])


def test_reference_gradient_rows_change_the_gradient_only(quick_run):
    """ref-grad trains with unroll.reference's gradient: on the same classifier and batches its first loss (before any
    step: the heatmap values, LRP-epsilon = input x gradient up to 1e-8 on SmallVGG's non-overlapping pools) equals the
    exact row's, and the losses after the first update differ (a different gradient)."""
    _, res = quick_run
    runs = {r["task"].get("row"): r for r in res["runs"] if r["task"]["kind"] == "seg"}
    for exact, ref in (("base", "ref-grad"), ("ref-recipe", "ref-recipe+ref-grad")):
        a, b = runs[exact], runs[ref]
        assert "gradient" not in a["task"] and b["task"]["gradient"] == "reference"
        assert a["step_loss"][0] == pytest.approx(b["step_loss"][0], rel=1e-5)
        assert max(abs(x - y) for x, y in zip(a["step_loss"][1:], b["step_loss"][1:])) > 1e-4


def test_plot_rows_auto_keeps_the_most_seeded_rows_and_named_rows_are_checked(capsys):
    def table(seeds):
        return {"rows": [{"row": f"r{i}", "by_n": {"10": {"seeds": list(range(k))}}} for i, k in enumerate(seeds)]}
    few = table([1, 2, 3])
    assert ablation.plot_rows(few) == ["r0", "r1", "r2"]  # at most PLOT_MAX: every row
    many = table([1] * 10 + [3] * 5 + [2] * 5)
    picked = ablation.plot_rows(many)
    assert len(picked) == ablation.PLOT_MAX
    assert set(picked) >= {f"r{i}" for i in range(10, 20)}  # every 3- and 2-seed row, then 1-seed rows in order
    assert picked == sorted(picked, key=lambda n: int(n[1:]))  # table order
    assert ablation.plot_rows(many, "r19, r0") == ["r0", "r19"]
    with pytest.raises(ValueError, match="nope"):
        ablation.plot_rows(many, "r0,nope")
    with pytest.raises(ValueError, match="names no rows"):
        ablation.plot_rows(many, " , ")
    with pytest.raises(SystemExit):
        ablation.main(["--rows", "base,unet", "--plot", "base,offset"])
    assert "--plot names rows not in this table: offset" in capsys.readouterr().err
