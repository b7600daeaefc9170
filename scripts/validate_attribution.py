"""How well attribution patching (AtP; AtP* on attention patterns) predicts exact patching, per unit type, on a
task's shipped organism.

    .venv/bin/python scripts/validate_attribution.py [--task general_addition] [--pairs 24] [--families ...]
        [--kinds residual attention mlp head pattern] [--threads 1] [--json out.json]

For every variable of the task's default targets (main hypothesis) and every cell (every layer × position; heads ×
every head): the mean estimated and the mean exact effect on the metric log p(cf label) - log p(base label)
(answers scored whole, teacher-forced) over the informative pairs. Prints

1. per variable and unit type: the Spearman correlation of estimate and exact effect over the cells, and whether
   the exact best cell is in the estimate's top 5 (by the signed estimate / by |estimate|);
2. per unit type over the variables: the median Spearman, how often the best cell is in the top 5, the Spearman of
   mean |estimate| and of the GradDrop score against mean |exact effect|;
3. the cells where the estimate is most wrong, with the share of pairs whose preferred label the patch flips
   (sign of M before vs after): a large share means the log-probability metric saturates;
and the time of estimates (with GradDrop) vs exact patching. ``pattern`` cells (attention transplant, keys aligned
by unpadded index) need base and source prompts of the same layout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from experiments.attribution_units import UNIT_KINDS, UnitAttribution, sweep_cells
from experiments.pipeline import LMPipeline
from experiments.task import get_task

DEFAULT_FAMILIES = {"general_addition": ["random", "flip_carry_0", "flip_carry_1"]}


def rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(stats.spearmanr(a, b).statistic) if len(a) > 2 and np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")


def reason(estimate: float, exact: float, flips: float) -> str:
    """Why a first-order estimate missed, from the numbers."""
    if abs(exact) > 3 * abs(estimate) and flips >= 0.3:
        return (f"flips the preferred label on {flips:.0%} of pairs: the log-prob metric saturates, "
                "first order too small")
    if np.sign(estimate) != np.sign(exact):
        return f"wrong sign (flips {flips:.0%})"
    if abs(estimate) > 3 * abs(exact):
        return f"overshoots: a saturating nonlinearity downstream (flips {flips:.0%})"
    return f"nonlinear response (flips {flips:.0%})"


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="general_addition")
    parser.add_argument("--pairs", type=int, default=24, help="pairs per family")
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", default=list(UNIT_KINDS), choices=UNIT_KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worst", type=int, default=2, help="most wrong cells listed per unit type")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    settings = task.settings()
    pipeline = LMPipeline(str(task.organism), device="cpu", max_new_tokens=task.max_new_tokens(settings))
    positions = task.token_positions(pipeline, settings)
    cells = sweep_cells(pipeline, positions, kinds=args.kinds)
    kinds = np.array([c.kind for c in cells])
    ids = [c.cell_id for c in cells]
    families = args.families or DEFAULT_FAMILIES.get(args.task) or task.families(settings)
    datasets = task.make_datasets(settings, families, args.pairs, args.seed)
    model = task.main_model(settings)
    variables = ["+".join(g) for g in task.default_targets(settings, [p.id for p in positions])]
    attribution = UnitAttribution(pipeline, cells)
    timing = {"estimate (with GradDrop)": 0.0, "exact": 0.0}
    per_variable: dict[str, dict[str, np.ndarray]] = {}
    for variable in tqdm(variables, desc="variables"):
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("est", "lin", "gd", "exact", "flips")}
        for dataset in datasets.values():
            examples = dataset.to_list()
            pairs = attribution.prepare([e["input"] for e in examples],
                                        [e["counterfactual_inputs"][0] for e in examples], model.label_data(dataset),
                                        model.label_counterfactual_data(dataset, variable.split("+")))
            start = time.perf_counter()
            result = attribution.estimate_prepared(pairs, graddrop=True)
            timing["estimate (with GradDrop)"] += time.perf_counter() - start
            start = time.perf_counter()
            exact = attribution.exact_prepared(pairs, result.metric_base)
            timing["exact"] += time.perf_counter() - start
            keep = pairs.informative
            base = result.metric_base[None, keep]
            parts["est"].append(result.estimates[:, keep])
            parts["lin"].append(result.linearised[:, keep])
            parts["gd"].append(result.graddrop_score[:, keep])
            parts["exact"].append(exact[:, keep])
            parts["flips"].append((np.sign(base) != np.sign(base + exact[:, keep])).astype(float))
        joined = {k: np.concatenate(v, 1) for k, v in parts.items()}
        if joined["est"].shape[1] == 0:
            print(f"{variable}: no pair's labels differ (the metric is 0 everywhere): skipped")
            continue
        per_variable[variable] = {
            "est": joined["est"].mean(1), "lin": joined["lin"].mean(1), "gd": joined["gd"].mean(1),
            "exact": joined["exact"].mean(1), "abs_est": np.abs(joined["est"]).mean(1),
            "abs_exact": np.abs(joined["exact"]).mean(1), "flips": joined["flips"].mean(1)}

    n_pairs = sum(len(d) for d in datasets.values())
    columns = [k for k in UNIT_KINDS if k in args.kinds]
    print(f"{args.task}: {len(cells)} cells ({', '.join(f'{(kinds == k).sum()} {k}' for k in columns)}), "
          f"{len(variables)} variables x {n_pairs} pairs ({', '.join(families)}); mean effect per cell over the "
          f"informative pairs\n")
    header = [*(f"{k} (AtP*)" if k == "pattern" else k for k in columns), *(["pattern, linearised"]
              if "pattern" in columns else []), "all cells"]
    print("Spearman (estimate vs exact, over cells) [exact best cell in the estimate's top 5: by estimate / "
          "by |estimate|]\n")
    print("| variable | " + " | ".join(header) + " |\n|---" + "|---" * len(header) + "|")
    summary: dict[str, dict[str, list[Any]]] = {h: {"rho": [], "top5": [], "abs": [], "gd": []} for h in header}
    worst: dict[str, list[tuple[float, str]]] = {k: [] for k in columns}
    for variable, v in per_variable.items():
        row = []
        for h in header:
            kind = h.split(" ")[0].rstrip(",")
            mask = np.ones(len(cells), bool) if h == "all cells" else kinds == kind
            est = v["lin"][mask] if h.endswith("linearised") else v["est"][mask]
            ex = v["exact"][mask]
            best = int(np.argmax(ex))
            by_est, by_abs = best in np.argsort(-est)[:5], best in np.argsort(-np.abs(est))[:5]
            r = rho(est, ex)
            s = summary[h]
            s["rho"].append(r)
            s["top5"].append((by_est, by_abs))
            s["abs"].append(rho(np.abs(est) if h.endswith("linearised") else v["abs_est"][mask], v["abs_exact"][mask]))
            s["gd"].append(rho(v["gd"][mask], v["abs_exact"][mask]))
            row.append(f"{r:.2f} [{'yes' if by_est else 'no'}/{'yes' if by_abs else 'no'}]")
            if kind in worst and not h.endswith("linearised"):
                k = int(np.argmax(np.abs(est - ex)))
                index = np.flatnonzero(mask)[k]
                line = (f"| {kind} | {variable} | `{ids[index]}` | {est[k]:.2f} / {ex[k]:.2f} | "
                        f"{reason(est[k], ex[k], v['flips'][index])} |")
                worst[kind].append((float(abs(est[k] - ex[k])), line))
        print(f"| {variable} | " + " | ".join(row) + " |")

    print("\nPer unit type, over the variables:\n")
    print("| unit type | Spearman, median [min, max] | exact best in top 5 (by estimate / by abs) | "
          "Spearman of mean abs estimate vs mean abs exact, median | GradDrop score vs mean abs exact, median |")
    print("|---|---|---|---|---|")
    for h, s in summary.items():
        r = np.array(s["rho"], dtype=float)
        top = np.array(s["top5"])
        print(f"| {h} | {np.nanmedian(r):.2f} [{np.nanmin(r):.2f}, {np.nanmax(r):.2f}] | {top[:, 0].sum()} / "
              f"{top[:, 1].sum()} of {len(r)} | {np.nanmedian(s['abs']):.2f} | {np.nanmedian(s['gd']):.2f} |")

    print("\nMost wrong cells (largest |estimate - exact| of each unit type):\n")
    print("| unit type | variable | cell | estimate / exact | reason |\n|---|---|---|---|---|")
    for kind in columns:
        for _, line in sorted(worst[kind], reverse=True)[: args.worst]:
            print(line)
    print(f"\ntimes: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items())
          + f" ({len(cells)} cells, {len(variables)} variables x {n_pairs} pairs)")
    report = {"task": args.task, "cells": ids, "kinds": kinds.tolist(), "families": families, "pairs": n_pairs,
              "timing": timing, "per_variable": {k: {kk: vv.tolist() for kk, vv in v.items()}
                                                 for k, v in per_variable.items()}}
    if args.json:
        args.json.write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
