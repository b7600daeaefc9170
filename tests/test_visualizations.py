"""Heatmaps are written from score tables, and refuse groups they have no scores for."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.image import imread

from experiments.visualizations import plot_layer_head_heatmap, plot_layer_position_heatmap, save_heatmaps

TABLE = pd.DataFrame(
    [
        {"target_variables": "carry_0", "layer": layer, "position_id": pos, "head": None, "accuracy": acc}
        for layer, row in enumerate([[0.1, 0.9], [0.2, 1.0]])
        for pos, acc in zip(["op", "last"], row)
    ]
)
HEADS = pd.DataFrame(
    [{"target_variables": "raw_output", "layer": l, "position_id": "last", "head": h, "accuracy": 0.25 * h}
     for l in range(2) for h in range(4)]
)


def test_position_heatmap_is_a_png(tmp_path):
    path = plot_layer_position_heatmap(TABLE, "carry_0", tmp_path / "c.png")
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_head_heatmap_and_batch_saving(tmp_path):
    assert plot_layer_head_heatmap(HEADS, "raw_output", tmp_path / "h.png", position_id="last").exists()
    paths = save_heatmaps(TABLE, tmp_path / "all", kind="positions", position_order=["last", "op"])
    assert [p.name for p in paths] == ["carry_0_positions.png"]


def test_unknown_group_or_kind_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no scores"):
        plot_layer_position_heatmap(TABLE, "carry_9", tmp_path / "x.png")
    with pytest.raises(ValueError, match="no head scores"):
        plot_layer_head_heatmap(TABLE, "carry_0", tmp_path / "y.png")
    with pytest.raises(ValueError, match="kind"):
        save_heatmaps(TABLE, tmp_path, kind="pixels")


def test_importing_does_not_switch_the_matplotlib_backend():
    import subprocess
    import sys

    code = ("import matplotlib; before = matplotlib.rcParams['backend']; import experiments.visualizations; "
            "assert matplotlib.rcParams['backend'] == before, (before, matplotlib.rcParams['backend'])")
    subprocess.run([sys.executable, "-c", code], check=True)
