"""How well attribution patching (AtP; AtP* on attention patterns) predicts exact patching, per unit type, on a
task's shipped organism.

    .venv/bin/python scripts/validate_attribution.py [--task general_addition] [--pairs 24] [--families ...]
        [--kinds residual attention mlp head pattern] [--threads 1] [--json out.json]
        [--screen [--fractions 0.05 0.1 0.2]]

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

``--screen``: how well each screening score (`experiments.attribution.screen.SCORES`) predicts the verdicts. The
ground truth is one full exact sweep through the engine (every cell, greedy answers), judged per variable by the
verdict rule (Holm over all cells of that variable). Per variable and score: how many of the located cells the
top ``--fractions`` of the ranking hold (recall), the rank of the verdict's best cell, the smallest top fraction
holding every located cell, and the Spearman correlation over cells of the score with the exact counterpart of
what it estimates (teacher-forced; all cells and residual cells) and with the verdict's effect (IIA - floor).
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

from experiments.attribution.units import UNIT_KINDS, UnitAttribution, sweep_cells
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


def study_setup(args: argparse.Namespace) -> tuple[Any, Any, LMPipeline, list, list, list[str], dict, Any, list[str]]:
    """The task's organism, positions, cells of ``--kinds``, datasets of the families, main model and variables."""
    task = get_task(args.task)
    settings = task.settings()
    pipeline = LMPipeline(str(task.organism), device="cpu", max_new_tokens=task.max_new_tokens(settings))
    positions = task.token_positions(pipeline, settings)
    cells = sweep_cells(pipeline, positions, kinds=args.kinds)
    families = args.families or DEFAULT_FAMILIES.get(args.task) or task.families(settings)
    datasets = task.make_datasets(settings, families, args.pairs, args.seed)
    variables = ["+".join(g) for g in task.default_targets(settings, [p.id for p in positions])]
    return task, settings, pipeline, positions, cells, families, datasets, task.main_model(settings), variables


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="general_addition")
    parser.add_argument("--pairs", type=int, default=24, help="pairs per family")
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--kinds", nargs="+", default=list(UNIT_KINDS), choices=UNIT_KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--path-steps", type=int, default=0,
                        help="average the activation cells' gradients over this many points of the path from base "
                             "to source (integrated gradients per site; 0: plain AtP)")
    parser.add_argument("--worst", type=int, default=2, help="most wrong cells listed per unit type")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--screen", action="store_true", help="compare the screening scores against the verdicts "
                        "of a full exact sweep (see above)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1], help="--screen: top fractions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.screen:
        return screen_comparison(args)
    task, settings, pipeline, positions, cells, families, datasets, model, variables = study_setup(args)
    kinds = np.array([c.kind for c in cells])
    ids = [c.cell_id for c in cells]
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
            result = attribution.estimate_prepared(pairs, graddrop=True, path_steps=args.path_steps)
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


def exact_counterparts(rows: np.ndarray, result: Any, informative: np.ndarray) -> dict[str, np.ndarray]:
    """(C, N) per pair the exact counterpart of every score, from the patched log-probabilities ``rows``
    (C, 2, N) and the unpatched ones in ``result``."""
    cf, base = result.logp_cf[None], result.logp_base[None]
    m_base, m_patched = cf - base, rows[:, 0] - rows[:, 1]
    sig = lambda x: 0.5 * (1 + np.tanh(0.5 * x))  # noqa: E731
    effect = m_patched - m_base
    out = {"abs": np.abs(effect), "signed": effect, "toward": rows[:, 0] - cf,
           "prob": np.exp(rows[:, 0]) - np.exp(cf), "flip": (m_patched > 0).astype(float) - (m_base > 0),
           "soft_flip": sig(m_patched) - sig(m_base), "informative": effect, "graddrop": np.abs(effect)}
    return {k: v[:, informative] if k != "informative" else v[:, informative & ~result.greedy_cf]
            for k, v in out.items()}


def best_location(verdicts: Any) -> str | None:
    """The pooled best cell of the one variable of ``verdicts`` when located (full or partial), else None."""
    from causal.verdicts import POOLED

    row = verdicts.best[verdicts.best["scope"] == POOLED].iloc[0]
    return str(row["cell_id"]) if row["grade"] in ("full", "partial") else None


def screen_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """``--screen`` (see the module docstring)."""
    import tempfile

    from causal.interchange_scores import compute_interchange_scores
    from causal.verdicts import POOLED
    from experiments.attribution.screen import SCORES, estimate_study
    from experiments.engine.intervention_experiment import ExperimentConfig, InterventionExperiment

    task, settings, pipeline, positions, cells, families, datasets, model, variables = study_setup(args)
    kinds = np.array([c.kind for c in cells])
    ids = [c.cell_id for c in cells]
    attribution = UnitAttribution(pipeline, cells)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        experiment = InterventionExperiment(pipeline, [c.engine_cell() for c in cells],
                                            ExperimentConfig(id="full-sweep", batch_size=args.pairs))
        raw = experiment.perform_interventions(datasets, results_dir=Path(tmp) / "full", verbose=False)
        timing["full exact sweep (engine)"] = time.perf_counter() - start
        truth: dict[str, Any] = {}
        for variable in variables:
            scores = compute_interchange_scores(raw, model, datasets, [variable.split("+")], task.checker)
            verdicts = scores.verdicts()
            tests = verdicts.tests[verdicts.tests["scope"] == POOLED].set_index("cell_id").loc[ids]
            truth[variable] = {"located": [c for c in ids if tests.loc[c, "grade"] in ("full", "partial")],
                               "best": best_location(verdicts),
                               "effect": tests["effect"].to_numpy(float), "fits": verdicts.fits}
    timing["verdicts"] = time.perf_counter() - start - timing["full exact sweep (engine)"]

    per: dict[str, dict[str, Any]] = {}
    timing["estimates"] = timing["exact"] = 0.0
    for variable in tqdm(variables, desc="variables"):
        start = time.perf_counter()
        estimates = estimate_study(attribution, model, datasets, variable.split("+"), graddrop=True,
                                   path_steps=args.path_steps)
        timing["estimates"] += time.perf_counter() - start
        start = time.perf_counter()
        exact_parts: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
        for dataset_id, dataset in datasets.items():
            examples = dataset.to_list()
            pairs = attribution.prepare([e["input"] for e in examples],
                                        [e["counterfactual_inputs"][0] for e in examples], model.label_data(dataset),
                                        model.label_counterfactual_data(dataset, variable.split("+")))
            result = estimates.results[dataset_id]
            for k, v in exact_counterparts(attribution.exact_rows(pairs), result, pairs.informative).items():
                exact_parts[k].append(v)
        timing["exact"] += time.perf_counter() - start
        exact = {k: np.concatenate(v, 1) for k, v in exact_parts.items()}
        if exact["signed"].shape[1] == 0:
            print(f"{variable}: no pair's labels differ: skipped")
            continue
        per[variable] = {"scores": {k: estimates.scores(k) for k in SCORES},
                         "exact": {k: v.mean(1) for k, v in exact.items()}}

    n_cells = len(cells)
    located_vars = [v for v in per if truth[v]["best"] is not None]
    print(f"{args.task}: {n_cells} cells ({', '.join(f'{(kinds == k).sum()} {k}' for k in args.kinds)}), "
          f"{len(variables)} variables x {sum(len(d) for d in datasets.values())} pairs ({', '.join(families)}); "
          f"ground truth: the full exact sweep's verdicts per variable (Holm over the {n_cells} cells); located: "
          + ", ".join(f"{v} {len(truth[v]['located'])} (best `{truth[v]['best']}`)" for v in located_vars) + "\n")
    summary = {}
    for score in SCORES:
        caught = {f: 0 for f in args.fractions}
        ranks, needed, rho_own, rho_res, rho_effect = [], [], [], [], []
        for variable in per:
            values = per[variable]["scores"][score]
            order = np.argsort(-values, kind="stable")
            rank = np.empty(n_cells, int)
            rank[order] = np.arange(n_cells)
            located = [ids.index(c) for c in truth[variable]["located"]]
            for f in args.fractions:
                caught[f] += sum(rank[k] < max(1, int(np.ceil(f * n_cells))) for k in located)
            if located:
                needed.append((rank[located].max() + 1) / n_cells)
                ranks.append(int(rank[ids.index(truth[variable]["best"])]) + 1)
            own = per[variable]["exact"][score]
            rho_own.append(rho(values, own))
            res = kinds == "residual"
            rho_res.append(rho(values[res], own[res]))
            rho_effect.append(rho(values, truth[variable]["effect"]))
        total = sum(len(truth[v]["located"]) for v in per)
        summary[score] = {"recall": {f: caught[f] / max(1, total) for f in args.fractions}, "best_ranks": ranks,
                          "needed": needed, "rho_own": rho_own, "rho_residual": rho_res, "rho_effect": rho_effect}
    fr = " | ".join(f"located cells in the top {f:.0%}" for f in args.fractions)
    print(f"| score | {fr} | rank of the best cell (per located variable) | best in top 5 | top fraction "
          "holding every located cell, median [max] | Spearman vs exact (own quantity), all cells / residual, "
          "median | Spearman vs verdict effect, median |")
    print("|---" * (6 + len(args.fractions)) + "|")
    total = sum(len(truth[v]["located"]) for v in per)
    for score, s in summary.items():
        rec = " | ".join(f"{round(s['recall'][f] * total)}/{total}" for f in args.fractions)
        need = np.array(s["needed"]) if s["needed"] else np.array([np.nan])
        print(f"| `{score}` | {rec} | {', '.join(map(str, s['best_ranks']))} | "
              f"{sum(r <= 5 for r in s['best_ranks'])}/{len(s['best_ranks'])} | {np.median(need):.0%} "
              f"[{np.max(need):.0%}] | {np.nanmedian(s['rho_own']):.2f} / {np.nanmedian(s['rho_residual']):.2f} | "
              f"{np.nanmedian(s['rho_effect']):.2f} |")
    print("\nlocated variables in the rank column's order: " + ", ".join(located_vars))
    print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
    report = {"task": args.task, "cells": ids, "variables": list(per), "timing": timing,
              "truth": {v: {"located": t["located"], "best": t["best"], "effect": t["effect"].tolist()}
                        for v, t in truth.items()},
              "scores": {v: {k: x.tolist() for k, x in p["scores"].items()} for v, p in per.items()},
              "exact": {v: {k: x.tolist() for k, x in p["exact"].items()} for v, p in per.items()},
              "summary": {k: {kk: ({str(f): x for f, x in vv.items()} if isinstance(vv, dict) else vv)
                              for kk, vv in v.items()} for k, v in summary.items()}}
    if args.json:
        args.json.write_text(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
