"""The benchmark figures carry their keys: a colour scale beside every heatmap, a legend naming the classes shown."""

import pytest
import torch

pytest.importorskip("matplotlib")

from bench import figures  # noqa: E402

NAMES = ["background", "one", "two", "three"]


@pytest.fixture
def saved(monkeypatch):
    """The figures handed to _save (which still writes and closes them; a closed figure keeps its axes)."""
    kept = []
    real = figures._save

    def keep(fig, path):
        kept.append(fig)
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return kept


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _legend_texts(fig):
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _scenes(n=2, size=12):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    masks[0, :4, :4], masks[1, 5:, 5:], masks[1, 0, 0] = 1, 3, 255
    heatmaps = torch.randn(n, len(NAMES), size, size, generator=g)
    return images, masks, heatmaps


def test_heatmaps_figure_has_a_scale_per_row_and_a_class_legend(saved, tmp_path):
    images, masks, heatmaps = _scenes()
    figures.heatmaps_figure(tmp_path / "h.png", images, heatmaps, NAMES, masks)
    fig, = saved
    assert len(_colorbars(fig)) == len(images)
    assert _legend_texts(fig) == ["background", "one", "three"]  # the classes of the ground truth, 255 not one


def test_evolution_figure_has_a_scale_and_a_legend(saved, tmp_path):
    images, masks, heatmaps = _scenes()
    figures.evolution_figure(tmp_path / "e.png", images, masks, [(0, heatmaps), (5, 2 * heatmaps)], NAMES)
    fig, = saved
    assert len(_colorbars(fig)) == 1
    shown = set(_legend_texts(fig))
    assert {"background", "one", "three"} <= shown <= set(NAMES)


def test_voc_predictions_figure_has_map_scales_and_a_class_legend(saved, tmp_path):
    from bench.data.voc import CLASSES, voc_palette
    from bench.runner import predictions_figure

    n, size = 2, 12
    images = [torch.rand(3, size, size) for _ in range(n)]
    masks = [torch.zeros(size, size, dtype=torch.long) for _ in range(n)]
    masks[0][:5, :5], masks[1][6:, 6:] = 15, 7  # person, car
    preds = [m.clone() for m in masks]
    preds[1][:3, :3] = 12  # dog, predicted only
    maps = [torch.randn(len(CLASSES), size, size) for _ in range(n)]
    predictions_figure(tmp_path / "p.png", images, masks, preds, maps, "test", CLASSES, voc_palette())
    fig, = saved
    assert len(_colorbars(fig)) == 2  # one per drawn map: each image shows the map of its one object class
    assert _legend_texts(fig) == ["background", "car", "dog", "person"]
