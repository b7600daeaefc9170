"""Heatmaps of interchange-intervention accuracy: layers × positions and layers × heads (PNG, annotated).

Input is a scores table with columns ``target_variables``, ``layer``, ``position_id``, ``head``,
``accuracy`` (one row per cell, e.g. ``InterchangeScores.averaged()``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # drawn without pyplot: importing this module changes no backend


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def _heatmap(grid: np.ndarray, row_labels: list[str], col_labels: list[str], title: str,
             xlabel: str, path: Path) -> Path:
    fig = Figure(figsize=(1.0 + 0.75 * len(col_labels), 1.0 + 0.45 * len(row_labels)))
    ax = fig.subplots()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if not np.isnan(grid[r, c]):
                ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if grid[r, c] > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="interchange accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_layer_position_heatmap(table: pd.DataFrame, target_variables: str, path: str | Path,
                                position_order: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Accuracy of every (layer, position) cell for one target-variable group."""
    rows = table[table["target_variables"] == target_variables]
    if rows.empty:
        raise ValueError(f"no scores for target variables {target_variables!r}")
    positions = list(position_order) if position_order else list(dict.fromkeys(rows["position_id"]))
    layers = sorted(rows["layer"].unique())
    grid = np.full((len(layers), len(positions)), np.nan)
    for _, row in rows.iterrows():
        if row["position_id"] in positions:
            grid[layers.index(row["layer"]), positions.index(row["position_id"])] = row["accuracy"]
    return _heatmap(grid, [str(l) for l in layers], positions, title or f"{target_variables}", "token position", Path(path))


def plot_layer_head_heatmap(table: pd.DataFrame, target_variables: str, path: str | Path,
                            position_id: str | None = None, title: str | None = None) -> Path:
    """Accuracy of every single-head cell (layer × head) for one group, at one position."""
    rows = table[(table["target_variables"] == target_variables) & table["head"].notna()]
    if position_id is not None:
        rows = rows[rows["position_id"] == position_id]
    if rows.empty:
        raise ValueError(f"no head scores for {target_variables!r} at position {position_id!r}")
    layers = sorted(rows["layer"].unique())
    heads = sorted(int(h) for h in rows["head"].unique())
    grid = np.full((len(layers), len(heads)), np.nan)
    for _, row in rows.iterrows():
        grid[layers.index(row["layer"]), heads.index(int(row["head"]))] = row["accuracy"]
    return _heatmap(grid, [str(l) for l in layers], [str(h) for h in heads],
                    title or f"{target_variables} (heads{'' if position_id is None else ' @ ' + position_id})",
                    "head", Path(path))


def save_heatmaps(table: pd.DataFrame, out_dir: str | Path, kind: str = "positions",
                  position_order: Sequence[str] | None = None, prefix: str = "") -> list[Path]:
    """One PNG per target-variable group; ``kind`` is "positions" or "heads"."""
    out = Path(out_dir)
    paths = []
    for group in dict.fromkeys(table["target_variables"]):
        name = out / f"{prefix}{_safe_name(group)}_{kind}.png"
        if kind == "positions":
            paths.append(plot_layer_position_heatmap(table, group, name, position_order))
        elif kind == "heads":
            paths.append(plot_layer_head_heatmap(table, group, name))
        else:
            raise ValueError(f"kind must be 'positions' or 'heads', got {kind!r}")
    return paths
