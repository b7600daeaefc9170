"""Report folder: tables (parquet + CSV), JSON, PNG figures with a one-line reading each, and an index
(``index.md``, ``index.html``, ``index.json``). Every file is written atomically (temporary file, then rename).
:func:`compare_reports` puts two report folders side by side.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _atomic(path: Path, write: Any, suffix: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON (NaN/inf become null)."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False)
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"), ".json")


@dataclass
class FigureEntry:
    section: str
    path: str
    title: str
    reading: str


@dataclass
class Report:
    """A report under ``root``: add tables, JSON, figures; :meth:`finish` writes the index files."""

    root: Path
    title: str = "Analysis report"
    figures: list[FigureEntry] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def table(self, rel: str, frame: pd.DataFrame, parquet: bool = True) -> None:
        """``rel`` without suffix: writes ``rel.csv`` (and ``rel.parquet``)."""
        base = self.root / rel
        _atomic(base.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False), ".csv")
        if parquet:
            _atomic(base.with_suffix(".parquet"), lambda tmp: frame.to_parquet(tmp, index=False), ".parquet")

    def json(self, rel: str, obj: Any) -> None:
        write_json(self.root / rel, obj)

    def figure(self, section: str, rel: str, fig: plt.Figure, title: str, reading: str) -> None:
        """Save ``fig`` as PNG at ``rel`` and list it in the index with its one-line ``reading``."""
        path = self.root / rel
        _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"), ".png")
        plt.close(fig)
        self.figures.append(FigureEntry(section, rel, title, reading))

    def note(self, section: str, text: str) -> None:
        self.notes.setdefault(section, []).append(text)

    def finish(self) -> None:
        """Write ``summary.json``, ``index.json``, ``index.md`` and ``index.html``."""
        self.json("summary.json", self.summary)
        self.json("index.json", {"title": self.title, "figures": [asdict(f) for f in self.figures],
                                 "notes": self.notes})
        sections = list(dict.fromkeys([f.section for f in self.figures] + list(self.notes)))
        md = [f"# {self.title}", ""]
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for section in sections:
            md += [f"## {section}", ""]
            body.append(f"<h2>{html.escape(section)}</h2>")
            for text in self.notes.get(section, []):
                md += [f"- {text}"]
                body.append(f"<p>{html.escape(text)}</p>")
            md.append("")
            for f in (f for f in self.figures if f.section == section):
                md += [f"### {f.title}", "", f"{f.reading}", "", f"![{f.title}]({f.path})", ""]
                body.append(f"<h3>{html.escape(f.title)}</h3><p>{html.escape(f.reading)}</p>"
                            f"<img src='{html.escape(f.path)}' style='max-width:900px'>")
        text_md = "\n".join(md) + "\n"
        _atomic(self.root / "index.md", lambda tmp: Path(tmp).write_text(text_md), ".md")
        page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(self.title) +
                "</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
                "img{border:1px solid #ccc}</style></head><body>" + "\n".join(body) + "</body></html>\n")
        _atomic(self.root / "index.html", lambda tmp: Path(tmp).write_text(page), ".html")


def compare_reports(first: Path, second: Path, out: Path) -> Path:
    """``out/compare.html``: the figures of two reports side by side (matched by path), then those in one only."""
    first, second, out = Path(first), Path(second), Path(out)
    indexes = []
    for root in (first, second):
        index = root / "index.json"
        if not index.exists():
            raise FileNotFoundError(f"{root} is not a report folder (no index.json)")
        indexes.append(json.loads(index.read_text()))
    by_path = [{f["path"]: f for f in idx["figures"]} for idx in indexes]
    paths = list(dict.fromkeys([*by_path[0], *by_path[1]]))
    rows = []
    for path in paths:
        cells = []
        for root, figs in zip((first, second), by_path):
            fig = figs.get(path)
            if fig is None:
                cells.append("<td><em>not in this report</em></td>")
            else:
                src = os.path.relpath(root / path, out)
                cells.append(f"<td><p>{html.escape(fig['reading'])}</p><img src='{html.escape(src)}' "
                             f"style='max-width:100%'></td>")
        title = (by_path[0].get(path) or by_path[1].get(path))["title"]
        rows.append(f"<tr><th colspan=2>{html.escape(title)} <small>({html.escape(path)})</small></th></tr>"
                    f"<tr>{''.join(cells)}</tr>")
    head = (f"<tr><th>{html.escape(str(first))}</th><th>{html.escape(str(second))}</th></tr>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Report comparison</title>"
            "<style>td{vertical-align:top;width:50%}table{width:100%}</style></head><body>"
            f"<h1>Report comparison</h1><table>{head}{''.join(rows)}</table></body></html>\n")
    target = out / "compare.html"
    _atomic(target, lambda tmp: Path(tmp).write_text(page), ".html")
    return target


# ---------------------------------------------------------------------------- plotting helpers
def heatmap(values: np.ndarray, xlabels: list[str], ylabels: list[str], title: str, cbar: str,
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None, annotate: bool = True
            ) -> plt.Figure:
    """A labelled heatmap (rows = ylabels) with optional value annotations."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(xlabels) + 2), max(3, 0.45 * len(ylabels) + 1.5)))
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar)
    if annotate and values.size <= 400:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.tight_layout()
    return fig
