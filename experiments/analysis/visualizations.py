"""Heatmaps of interchange-intervention scores: layers × positions and layers × heads (PNG, annotated).

Input is a scores table with one row per cell: ``target_variables``, ``layer``, ``position_id``,
``head``, ``cell_id`` and the score columns, e.g. ``InterchangeScores.pooled()``. The drawn value is
the informative IIA by default (``value="accuracy"`` for the IIA over all pairs, ``"floor"`` for the
floor). Rows are layers, bottom to top (layer -1 is labelled "embeddings"); columns are positions in
the given order, or heads. ``highlight`` boxes one cell per group, e.g. the ``cell_id`` that
``InterchangeScores.best_cells()`` locates (pass nothing where no cell carries the group).

``draw_*`` return the matplotlib Figure (nothing written); ``plot_*`` and ``save_heatmaps`` write PNGs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # drawn without pyplot: importing this module changes no backend
from matplotlib.patches import Rectangle

VALUE_LABELS: dict[str, str] = {
    "informative_accuracy": "informative IIA",
    "accuracy": "IIA (all pairs)",
    "floor": "floor (no intervention)",
    "effect": "effect: IIA - floor (same pairs)",
}
"""Score columns a heatmap can show, with their colour-bar labels."""

DEFAULT_VALUE = "informative_accuracy"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def layer_label(layer: int) -> str:
    """``"embeddings"`` for layer -1, else the layer number."""
    return "embeddings" if int(layer) == -1 else str(int(layer))


def heatmap_title(target_variables: str, value: str = DEFAULT_VALUE, hypothesis: str | None = None,
                  model: str | None = None, unit: str | None = None) -> str:
    """``"<variable> · hypothesis <id>"`` over ``"<model> · <unit> · <value>"`` (parts left out when unknown)."""
    first = target_variables + (f" · hypothesis {hypothesis}" if hypothesis else "")
    second = " · ".join(part for part in (model, unit, VALUE_LABELS.get(value, value)) if part)
    return f"{first}\n{second}"


def _check_value(rows: pd.DataFrame, value: str) -> None:
    if value not in rows.columns:
        raise ValueError(
            f"the scores table has no {value!r} column (columns: {list(rows.columns)}); pass a table from "
            f"InterchangeScores.pooled() or choose value= among {sorted(VALUE_LABELS)}"
        )


def _heatmap(grid: np.ndarray, row_labels: list[str], col_labels: list[str], title: str, xlabel: str,
             value: str, box: tuple[int, int] | None) -> Figure:
    fig = Figure(figsize=(2.0 + 0.75 * len(col_labels), 1.6 + 0.45 * len(row_labels)))
    ax = fig.subplots()
    signed = value == "effect"  # a difference of rates: -1 .. 1 on a diverging scale
    cmap = matplotlib.colormaps["RdBu_r" if signed else "viridis"].with_extremes(bad="lightgrey")  # no value: grey
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=-1.0 if signed else 0.0, vmax=1.0, cmap=cmap, aspect="auto",
                      origin="lower")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if not np.isnan(grid[r, c]):
                light = abs(grid[r, c]) < 0.6 if signed else grid[r, c] > 0.6
                ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white")
    if box is not None:
        r, c = box
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.0))
    fig.colorbar(image, ax=ax, label=VALUE_LABELS.get(value, value))
    fig.tight_layout()
    return fig


def _box(rows: pd.DataFrame, highlight: str | None, key: str, layers: list, cols: list) -> tuple[int, int] | None:
    if highlight is None:
        return None
    if "cell_id" not in rows.columns:
        raise ValueError("highlight needs a cell_id column in the scores table")
    hit = rows[rows["cell_id"] == highlight]
    if hit.empty:
        raise ValueError(f"highlighted cell {highlight!r} is not in the drawn scores")
    row = hit.iloc[0]
    column = int(row[key]) if key == "head" else row[key]
    return layers.index(row["layer"]), cols.index(column)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def draw_layer_position_heatmap(
    table: pd.DataFrame, target_variables: str, position_order: Sequence[str] | None = None, *,
    value: str = DEFAULT_VALUE, title: str | None = None, hypothesis: str | None = None, model: str | None = None,
    unit: str | None = "residual stream", highlight: str | None = None,
) -> Figure:
    """Figure of ``value`` for every (layer, position) cell of one group: rows layers bottom-up, columns positions."""
    rows = table[(table["target_variables"] == target_variables)]
    if "head" in rows.columns:
        rows = rows[rows["head"].isna()]
    if rows.empty:
        raise ValueError(f"no scores for target variables {target_variables!r}")
    _check_value(rows, value)
    positions = list(position_order) if position_order else list(dict.fromkeys(rows["position_id"]))
    layers = sorted(rows["layer"].unique())
    grid = np.full((len(layers), len(positions)), np.nan)
    for _, row in rows.iterrows():
        if row["position_id"] in positions:
            grid[layers.index(row["layer"]), positions.index(row["position_id"])] = row[value]
    box = _box(rows, highlight, "position_id", layers, positions)
    return _heatmap(grid, [layer_label(l) for l in layers], positions,
                    title or heatmap_title(target_variables, value, hypothesis, model, unit), "token position", value, box)


def plot_layer_position_heatmap(table: pd.DataFrame, target_variables: str, path: str | Path,
                                position_order: Sequence[str] | None = None, title: str | None = None,
                                **options: object) -> Path:
    """Write `draw_layer_position_heatmap` as a PNG at ``path``."""
    return _save(draw_layer_position_heatmap(table, target_variables, position_order, title=title, **options), path)


def draw_layer_head_heatmap(
    table: pd.DataFrame, target_variables: str, position_id: str | None = None, *, value: str = DEFAULT_VALUE,
    title: str | None = None, hypothesis: str | None = None, model: str | None = None, unit: str | None = None,
    highlight: str | None = None,
) -> Figure:
    """Figure of ``value`` for every single-head cell (rows layers bottom-up, columns heads) of one group."""
    rows = table[(table["target_variables"] == target_variables) & table["head"].notna()]
    if position_id is not None:
        rows = rows[rows["position_id"] == position_id]
    if rows.empty:
        raise ValueError(f"no head scores for {target_variables!r} at position {position_id!r}")
    _check_value(rows, value)
    layers = sorted(rows["layer"].unique())
    heads = sorted(int(h) for h in rows["head"].unique())
    grid = np.full((len(layers), len(heads)), np.nan)
    for _, row in rows.iterrows():
        grid[layers.index(row["layer"]), heads.index(int(row["head"]))] = row[value]
    if unit is None:
        where = position_id or "/".join(dict.fromkeys(rows["position_id"]))
        unit = f"attention heads @ {where}"
    box = _box(rows, highlight, "head", layers, heads)
    return _heatmap(grid, [layer_label(l) for l in layers], [str(h) for h in heads],
                    title or heatmap_title(target_variables, value, hypothesis, model, unit), "head", value, box)


def plot_layer_head_heatmap(table: pd.DataFrame, target_variables: str, path: str | Path,
                            position_id: str | None = None, title: str | None = None, **options: object) -> Path:
    """Write `draw_layer_head_heatmap` as a PNG at ``path``."""
    return _save(draw_layer_head_heatmap(table, target_variables, position_id, title=title, **options), path)


def save_heatmaps(table: pd.DataFrame, out_dir: str | Path, kind: str = "positions",
                  position_order: Sequence[str] | None = None, prefix: str = "", *, value: str = DEFAULT_VALUE,
                  hypothesis: str | None = None, model: str | None = None, unit: str | None = None,
                  highlight: Mapping[str, str | None] | None = None) -> list[Path]:
    """One PNG per target-variable group; ``kind`` is "positions" or "heads"; ``highlight``: group -> cell id."""
    if kind not in ("positions", "heads"):
        raise ValueError(f"kind must be 'positions' or 'heads', got {kind!r}")
    out = Path(out_dir)
    highlight = highlight or {}
    paths = []
    for group in dict.fromkeys(table["target_variables"]):
        name = out / f"{prefix}{_safe_name(group)}_{kind}.png"
        options = {"value": value, "hypothesis": hypothesis, "model": model, "highlight": highlight.get(group)}
        if kind == "positions":
            fig = draw_layer_position_heatmap(table, group, position_order, unit=unit or "residual stream", **options)
        else:
            fig = draw_layer_head_heatmap(table, group, unit=unit, **options)
        paths.append(_save(fig, name))
    return paths
