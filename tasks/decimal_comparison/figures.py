"""Figures of the decimal comparison study, drawn only from the extracted data of its extra steps
(``<study>/analyses/<step>/<name>.json``, `tasks.decimal_comparison.steps`).

``make_figures(data, folder)`` writes PNG and PDF under ``folder`` for whatever data exists:
bug rate by format; fix (and break) rate by layer × component with floors; generalisation;
attention differences (mass on decimals vs format tokens, entropy, differing heads); bidirectional
transplantation; head-subset success vs k; head contributions (ablation); a surgical-precision
heatmap (fix rate by layer × position per component); token-level attention maps for two formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COMPONENT_LABELS = {"attention_output": "attention out", "mlp_output": "MLP out", "block_output": "block out"}


def _save(fig, folder: Path, name: str, written: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"{name}.{ext}", dpi=130)
    plt.close(fig)
    written.append(f"{name}.png")


def _err(r: dict) -> tuple[float, float]:
    return max(0.0, r["rate"] - r["ci_low"]), max(0.0, r["ci_high"] - r["rate"])


def bug_rate_figure(bug: dict, folder: Path, written: list[str]) -> None:
    formats = list(bug["formats"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.3 * len(formats), 3.4))
    width = 0.27
    colours = {"correct": "#4c9f70", "buggy": "#d1495b", "unparseable": "#999999"}
    for i, outcome in enumerate(("correct", "buggy", "unparseable")):
        rates = [bug["formats"][f][outcome] for f in formats]
        xs = np.arange(len(formats)) + (i - 1) * width
        ax.bar(xs, [r["rate"] for r in rates], width, yerr=np.array([_err(r) for r in rates]).T, capsize=3,
               color=colours[outcome], label=outcome)
    ax.set_xticks(np.arange(len(formats)), formats)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"rate (n={bug['n_pairs']} pairs, 95% CI)")
    ax.set_title("answers to 'which is bigger' on disagreeing pairs")
    ax.legend(fontsize=8)
    _save(fig, folder, "bug_rate_by_format", written)


def _cell_rate(rows: list[dict], direction: str, layer: int, component: str, position: str) -> tuple[float, float]:
    hits = [r for r in rows if r["direction"] == direction and r["layer"] == layer and r["component"] == component
            and r["position_id"] == position]
    if not hits:
        return np.nan, np.nan
    return float(np.mean([r["success"]["rate"] for r in hits])), float(np.mean([r["floor"]["rate"] for r in hits]))


def patching_figures(patch: dict, folder: Path, written: list[str]) -> None:
    rows, layers, comps = patch["rows"], patch["layers"], patch["components"]
    formats = sorted({r["format"] for r in rows})
    for direction, label in (("fix", "fix rate (answer becomes correct)"), ("break", "break rate (answer becomes buggy)")):
        fig, axes = plt.subplots(1, len(formats), figsize=(2.5 + (1.8 + 0.55 * len(layers)) * len(formats), 3.0),
                                 squeeze=False)
        for col, (ax, fmt) in enumerate(zip(axes[0], formats)):
            sub = [r for r in rows if r["format"] == fmt]
            grid = np.array([[_cell_rate(sub, direction, l, c, "matched")[0] for l in layers] for c in comps])
            floor = _cell_rate(sub, direction, layers[0], comps[0], "matched")[1]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(layers)), layers)
            ax.set_yticks(range(len(comps)), [COMPONENT_LABELS[c] for c in comps] if col == 0 else [])
            ax.set_xlabel("layer")
            source = patch.get("source_format", "simple")
            src, dst = (source, fmt) if direction == "fix" else (fmt, source)
            ax.set_title(f"{src} → {dst} (floor {floor:.2f})", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=label)
        fig.suptitle(f"{label}, patch at role-matched positions, n={patch['n_pairs']}", fontsize=9)
        folder.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            fig.savefig(folder / f"{direction}_rate_layer_component.{ext}", dpi=130, bbox_inches="tight")
        plt.close(fig)
        written.append(f"{direction}_rate_layer_component.png")
    roles = patch["roles"]
    fig, axes = plt.subplots(1, len(comps), figsize=(1.5 + 0.5 * len(layers) * len(comps), 0.5 + 0.45 * len(roles)),
                             squeeze=False)
    for ax, comp in zip(axes[0], comps):
        grid = np.array([[_cell_rate(rows, "fix", l, comp, role)[0] for l in layers] for role in roles])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(layers)), layers)
        ax.set_yticks(range(len(roles)), roles)
        ax.set_xlabel("layer")
        ax.set_title(COMPONENT_LABELS[comp], fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="fix rate (mean over buggy formats)")
    fig.suptitle("surgical precision: which position × layer × component fixes the bug", fontsize=9)
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"surgical_precision.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)
    written.append("surgical_precision.png")


def generalisation_figure(gen: dict, folder: Path, written: list[str]) -> None:
    rows = gen["rows"]
    labels = [f"{r['cell_id']}\n{r['dataset_id']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows)), 3.6))
    xs = np.arange(len(rows))
    ax.bar(xs, [r["success"]["rate"] for r in rows], yerr=np.array([_err(r["success"]) for r in rows]).T,
           capsize=3, color=["#2e86ab" if r["direction"] == "fix" else "#d1495b" for r in rows])
    ax.scatter(xs, [r["floor"]["rate"] for r in rows], marker="_", s=300, color="k", label="floor (unpatched)")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"success rate (held-out, n={gen['n_pairs']})")
    ax.set_title("best patches on held-out pairs (blue: fix, red: break)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, folder, "generalisation", written)


def attention_figures(att: dict, folder: Path, written: list[str]) -> None:
    layers = att["layers"]
    formats = list(att["per_format"])
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for fmt in formats:
        d = att["per_format"][fmt]
        axes[0].plot(layers, np.mean(d["decimals"], axis=1), marker="o", label=fmt)
        axes[1].plot(layers, np.mean(d["format_tokens"], axis=1), marker="o", label=fmt)
        axes[2].plot(layers, np.mean(d["entropy"], axis=1), marker="o", label=fmt)
    for ax, title in zip(axes, ("mass on decimal tokens", "mass on format-only tokens", "entropy (nats)")):
        ax.set_xlabel("layer")
        ax.set_title(f"answer position: {title}", fontsize=9)
        ax.set_xticks(layers)
        ax.legend(fontsize=7)
    _save(fig, folder, "attention_by_format", written)
    top = att["top_differing_heads"][:12]
    if top:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.barh(range(len(top)), [d["delta_decimals"] for d in top], color="#6a4c93")
        ax.set_yticks(range(len(top)), [f"{d['format']} L{d['layer']}H{d['head']}" for d in top], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("Δ attention to decimals (format − simple), answer position")
        ax.set_title("heads differing most between formats", fontsize=9)
        _save(fig, folder, "attention_differing_heads", written)
    maps = att["token_maps"]
    shown = [f for f in ("simple", "qa") if f in maps] or formats[:2]
    critical = att.get("critical_layer", layers[len(layers) // 2])
    fig, axes = plt.subplots(len(shown), 1, figsize=(min(18, 0.28 * max(len(maps[f]["tokens"]) for f in shown) + 2),
                                                       1.2 + 1.1 * len(shown) * max(1, len(maps[shown[0]]["last_query_by_layer_head"][0]) / 4)),
                             squeeze=False)
    for ax, fmt in zip(axes[:, 0], shown):
        grid = np.array(maps[fmt]["last_query_by_layer_head"][critical])  # (H, T)
        ax.imshow(grid, cmap="Blues", aspect="auto", vmin=0, vmax=max(grid.max(), 1e-6))
        toks = [t.replace("\n", "\\n").replace("Ġ", "␣").replace("Ċ", "\\n") for t in maps[fmt]["tokens"]]
        ax.set_xticks(range(len(toks)), toks, fontsize=6, rotation=90)
        ax.set_ylabel("head")
        ax.set_title(f"{fmt}: attention of the last prompt token, layer {critical} (9.8 vs 9.11)", fontsize=9)
    _save(fig, folder, "token_attention_two_formats", written)


def transplant_figures(tr: dict, folder: Path, written: list[str], name: str = "transplant_bidirectional",
                       title: str = "attention transplantation (queries: matched positions; keys aligned by role)") -> None:
    rows, layers = tr["rows"], tr["layers"]
    formats = sorted({r["format"] for r in rows})
    heads = sorted({r["head"] for r in rows if r["head"] is not None and not r["cell_id"].endswith(".all")} |
                   {int(r["cell_id"].rsplit(".h", 1)[1]) for r in rows if ".h" in r["cell_id"]})
    fig, axes = plt.subplots(2, len(formats), figsize=(2 + 0.45 * (len(heads) + 1) * len(formats), 1.5 + 0.4 * len(layers) * 2),
                             squeeze=False)
    for col, fmt in enumerate(formats):
        for row, direction in enumerate(("fix", "break")):
            ax = axes[row, col]
            grid = np.full((len(layers), len(heads) + 1), np.nan)
            floor = np.nan
            for r in rows:
                if r["format"] != fmt or r["direction"] != direction:
                    continue
                li = layers.index(r["layer"])
                hi = len(heads) if r["cell_id"].endswith(".all") else heads.index(int(r["cell_id"].rsplit(".h", 1)[1]))
                grid[li, hi] = r["success"]["rate"]
                floor = r["floor"]["rate"]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis" if direction == "fix" else "inferno", aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(heads) + 1), [f"h{h}" for h in heads] + ["all"], fontsize=7)
            ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers])
            run = fmt if direction == "fix" else "simple"
            ax.set_title(f"{direction}: {run} run (floor {floor:.2f})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, folder, name, written)
    if "subsets" not in tr:
        return
    subsets = [s for s in tr.get("subsets", []) if s["direction"] == "fix"]
    if subsets:
        modes = sorted({s["mode"] for s in subsets})
        fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for (pool, fmt) in sorted({(s["pool"], s["format"]) for s in subsets if s["mode"] == mode}):
                pts = sorted((s["k"], s["mean_success"], s["share_above_threshold"]) for s in subsets
                             if s["mode"] == mode and s["pool"] == pool and s["format"] == fmt)
                line, = ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"{pool} heads, {fmt}")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=":", color=line.get_color())
            ax.set_xlabel("k heads")
            ax.set_ylabel(f"share with fix rate ≥ {tr['threshold']} (dotted: mean)")
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{mode} of k heads in layer {tr['subset_layer']}", fontsize=9)
            ax.legend(fontsize=6)
        _save(fig, folder, "head_subsets", written)


def ablation_figure(ab: dict, folder: Path, written: list[str]) -> None:
    rows, layers = ab["rows"], ab["layers"]
    datasets = sorted({r["dataset_id"] for r in rows})
    heads = sorted({int(r["cell_id"].rsplit(".h", 1)[1]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.5 * len(heads) * 2, 1.2 + 0.35 * len(layers) * len(datasets)), squeeze=False)
    for ax, kind in zip(axes[0], ("zero", "mean")):
        labels, grid = [], []
        for did in datasets:
            for layer in layers:
                labels.append(f"{did} L{layer}")
                line = []
                for h in heads:
                    hit = [r for r in rows if r["dataset_id"] == did and r["cell_id"] == f"{kind}.L{layer}.h{h}"]
                    line.append(hit[0]["success"]["rate"] - hit[0]["floor"]["rate"] if hit else np.nan)
                grid.append(line)
        grid = np.array(grid)
        im = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(heads)), [f"h{h}" for h in heads], fontsize=7)
        ax.set_yticks(range(len(labels)), labels if kind == "zero" else [], fontsize=7)
        ax.set_title(f"{kind} ablation: success − floor", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    for ext in ("png", "pdf"):
        fig.savefig(folder / f"head_contributions.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)
    written.append("head_contributions.png")
    neurons = ab.get("neurons")
    if neurons and neurons["results"]:
        res = neurons["results"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ks = [r["n_neurons"] for r in res]
        for key in [k for k in res[0] if k.startswith("fix.")]:
            ax.plot(ks, [r[key]["rate"] for r in res], marker="o", label=f"{key} (floor {neurons['floors'][key]['rate']:.2f})")
        ax.plot(ks, [r["correct_format_still_correct"]["rate"] for r in res], marker="s", ls="--",
                label="simple format still correct")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"neurons ablated (layer {neurons['layer']} MLP)")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7)
        ax.set_title("MLP neuron ablation", fontsize=9)
        _save(fig, folder, "neuron_ablation", written)


def make_figures(data: dict[str, Any], folder: str | Path, critical_layer: int | None = None) -> list[str]:
    """Draw every figure whose data is in ``data`` (name -> the JSON an extra step wrote: ``bug_rate``, ``patching``,
    ``generalisation``, ``attention``, ``transplant``, ``blocking``, ``ablation``) into ``folder``; returns the PNG
    names written. ``critical_layer``: the layer whose token-level attention map is drawn."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if (bug := data.get("bug_rate")) is not None:
        bug_rate_figure(bug, folder, written)
    if (patch := data.get("patching")) is not None:
        patching_figures(patch, folder, written)
    if (gen := data.get("generalisation")) is not None:
        generalisation_figure(gen, folder, written)
    if (att := data.get("attention")) is not None:
        if critical_layer is not None and critical_layer in att["layers"]:
            att = {**att, "critical_layer": att["layers"].index(critical_layer)}
        attention_figures(att, folder, written)
    if (tr := data.get("transplant")) is not None:
        transplant_figures(tr, folder, written)
    if (bl := data.get("blocking")) is not None:
        transplant_figures(bl, folder, written, "format_blocking",
                           "blocking attention to the format's own tokens (prompt and decoding)")
    if (ab := data.get("ablation")) is not None:
        ablation_figure(ab, folder, written)
    return written
