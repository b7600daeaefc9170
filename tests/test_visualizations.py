"""Heatmaps draw the right value in the right place, say what they show, and refuse groups they have no scores for."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from experiments.analysis.visualizations import (
    draw_layer_head_heatmap,
    draw_layer_position_heatmap,
    plot_layer_head_heatmap,
    plot_layer_position_heatmap,
    save_heatmaps,
)

LAYERS = [-1, 0, 1]
POSITIONS = ["op", "last"]
# informative IIA per (layer, position): every value distinct, so a swapped axis or order shows
INFORMATIVE = {(-1, "op"): 0.05, (-1, "last"): 0.15, (0, "op"): 0.35, (0, "last"): 0.45, (1, "op"): 0.65, (1, "last"): 0.95}
TABLE = pd.DataFrame(
    [
        {"target_variables": "carry_0", "cell_id": f"L{layer}@{pos}", "layer": layer, "position_id": pos, "head": None,
         "informative_accuracy": INFORMATIVE[layer, pos], "accuracy": 1.0 - INFORMATIVE[layer, pos], "floor": 0.5}
        for layer in LAYERS for pos in POSITIONS
    ]
)
HEADS = pd.DataFrame(
    [{"target_variables": "raw_output", "cell_id": f"L{l}H{h}@last", "layer": l, "position_id": "last", "head": h,
      "informative_accuracy": 0.1 * h + 0.5 * l, "accuracy": 0.0} for l in range(2) for h in range(4)]
)


def drawn(fig) -> tuple[np.ndarray, list[str], list[str]]:
    ax = fig.axes[0]
    values = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    return values, [t.get_text() for t in ax.get_yticklabels()], [t.get_text() for t in ax.get_xticklabels()]


def test_position_heatmap_draws_informative_iia_by_layer_bottom_up():
    fig = draw_layer_position_heatmap(TABLE, "carry_0", ["last", "op"])
    values, rows, cols = drawn(fig)
    assert rows == ["embeddings", "0", "1"] and cols == ["last", "op"]
    expected = np.array([[INFORMATIVE[layer, pos] for pos in ["last", "op"]] for layer in LAYERS])
    np.testing.assert_allclose(values, expected)
    ax = fig.axes[0]
    assert ax.images[0].origin == "lower" and ax.get_ylim()[0] < ax.get_ylim()[1]  # row 0 (embeddings) at the bottom
    assert ax.images[0].get_clim() == (0.0, 1.0)
    # the annotation of each cell sits on its own square
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    assert texts[(1, 2)] == f"{INFORMATIVE[1, 'op']:.2f}" and texts[(0, 0)] == f"{INFORMATIVE[-1, 'last']:.2f}"


def test_position_heatmap_other_value_and_missing_cells():
    values, _, cols = drawn(draw_layer_position_heatmap(TABLE, "carry_0", value="accuracy"))
    assert cols == POSITIONS  # first-seen order by default
    np.testing.assert_allclose(values, [[1.0 - INFORMATIVE[layer, pos] for pos in POSITIONS] for layer in LAYERS])
    partial = TABLE[~((TABLE["layer"] == 0) & (TABLE["position_id"] == "last"))]
    values, _, _ = drawn(draw_layer_position_heatmap(partial, "carry_0", POSITIONS))
    assert np.isnan(values[1, 1]) and values[1, 0] == INFORMATIVE[0, "op"]
    with pytest.raises(ValueError, match="no 'iia' column"):
        draw_layer_position_heatmap(TABLE, "carry_0", value="iia")


def test_title_names_variable_hypothesis_model_unit_and_the_best_cell_is_boxed():
    fig = draw_layer_position_heatmap(TABLE, "carry_0", POSITIONS, hypothesis="addition_2d_carry",
                                      model="addition-llama", highlight="L0@last")
    ax = fig.axes[0]
    title = ax.get_title()
    for part in ("carry_0", "hypothesis addition_2d_carry", "addition-llama", "residual stream", "informative IIA"):
        assert part in title
    assert fig.axes[1].get_ylabel() == "informative IIA"  # colour bar
    (box,) = ax.patches
    assert box.get_xy() == (1 - 0.5, 1 - 0.5)  # column "last", row layer 0
    with pytest.raises(ValueError, match="'L9@op'"):
        draw_layer_position_heatmap(TABLE, "carry_0", highlight="L9@op")


def test_head_heatmap_draws_layers_by_heads():
    fig = draw_layer_head_heatmap(HEADS, "raw_output", position_id="last", highlight="L1H2@last")
    values, rows, cols = drawn(fig)
    assert rows == ["0", "1"] and cols == ["0", "1", "2", "3"]
    np.testing.assert_allclose(values, [[0.1 * h + 0.5 * l for h in range(4)] for l in range(2)])
    assert "attention heads @ last" in fig.axes[0].get_title()
    assert fig.axes[0].patches[0].get_xy() == (2 - 0.5, 1 - 0.5)


def test_pngs_are_written(tmp_path):
    image = imread(plot_layer_position_heatmap(TABLE, "carry_0", tmp_path / "c.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert plot_layer_head_heatmap(HEADS, "raw_output", tmp_path / "h.png", position_id="last").exists()
    paths = save_heatmaps(TABLE, tmp_path / "all", kind="positions", position_order=["last", "op"],
                          highlight={"carry_0": "L1@last"})
    assert [p.name for p in paths] == ["carry_0_positions.png"] and paths[0].exists()


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

    code = ("import matplotlib; before = matplotlib.rcParams['backend']; import experiments.analysis.visualizations; "
            "assert matplotlib.rcParams['backend'] == before, (before, matplotlib.rcParams['backend'])")
    subprocess.run([sys.executable, "-c", code], check=True)
