"""Screen-then-verify vs the full exact sweep, on the same study, in one run.

    .venv/bin/python benchmarks/attribution_screen.py [--pairs 24] [--variables carry_0 | all] [--top 0.1]
        [--score prob] [--exact-metric] [--path-steps 0] [--kinds residual attention mlp head] [--repeats 2] [--threads 1]
        [--json out.json] [--no-pack]

The study: the addition organism, every cell of ``--kinds`` (every layer × position; every head), the families
random, flip_carry_0 and flip_carry_1 with ``--pairs`` pairs each, the main hypothesis' ``--variables`` (``all``:
every default target).

Both variants pack cells of different sites into shared forwards (``pack_sites``; ``--no-pack``: one forward
per site group, as before), so (A) is the fastest exact sweep the engine has.

(A) full exact sweep: the engine's interchange of every cell (`InterventionExperiment.perform_interventions`,
    greedy answers into a results folder) once, then per variable scored (`compute_interchange_scores`) and
    judged (`causal.verdicts`, Holm over all cells);
(B) screen then verify, per variable (`experiments.attribution.screen.screen_and_verify`): estimates of every
    cell, then the engine's interchange of the top ``--top`` fraction by ``--score`` only (no random sample),
    scored and judged (Holm over the verified cells); with ``--exact-metric`` also the verified cells' exact
    effect on the metric (not needed for the verdicts).

Checks, per variable: on every verified cell and pair the engine's answer token ids are identical in (A) and (B)
(top-k logits within 1e-4) and so are the verdict counts (gained, lost); which of (A)'s located cells (B)
verified, their ranks; whether (B) locates the variable at the same cell with the same grade as (A) (the verdicts
of the located variables). The variants run ``--repeats`` times, interleaved (A, B, A, B), best time kept. Times:
per variable (A) = the sweep + that variable's verdicts, (B) = its screen; for the study (A) = the sweep + every
variable's verdicts (one sweep serves every variable), (B) = the sum of the screens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from causal.interchange_scores import compute_interchange_scores
from causal.results import RawResults
from causal.verdicts import POOLED
from experiments.attribution.screen import Score, ScreenConfig, screen_and_verify
from experiments.attribution.units import UNIT_KINDS, UnitAttribution, sweep_cells
from experiments.engine.intervention_experiment import ExperimentConfig, InterventionExperiment
from experiments.pipeline import LMPipeline
from tasks.general_addition.task import TASK, AdditionSettings

FAMILIES = ["random", "flip_carry_0", "flip_carry_1"]


def full_sweep(attribution: UnitAttribution, datasets: dict[str, Any], folder: Path, batch_size: int,
               pack_sites: bool) -> tuple[Any, float]:
    """(A)'s engine run: every cell. Returns (raw results, seconds)."""
    start = time.perf_counter()
    experiment = InterventionExperiment(attribution.pipeline, [c.engine_cell() for c in attribution.cells],
                                        ExperimentConfig(id="full", batch_size=batch_size,
                                                         max_rows_per_forward=attribution.max_rows_per_forward,
                                                         pack_sites=pack_sites))
    raw = experiment.perform_interventions(datasets, results_dir=folder, verbose=False)
    return raw, time.perf_counter() - start


def full_verdicts(raw: Any, model: Any, datasets: dict[str, Any], variable: str) -> tuple[Any, float]:
    """(A)'s verdicts of one variable (Holm over all cells). Returns (pooled tests by cell, seconds)."""
    start = time.perf_counter()
    scores = compute_interchange_scores(raw, model, datasets, [variable.split("+")], TASK.checker)
    tests = scores.verdicts().tests
    return tests[tests["scope"] == POOLED].set_index("cell_id"), time.perf_counter() - start


def location(tests: Any) -> tuple[str | None, str]:
    """(cell, grade) where pooled tests locate the variable: best grade, then largest effect; (None, "none")."""
    located = tests[tests["grade"].isin(["full", "partial"])]
    if located.empty:
        return None, "none"
    order = located.assign(_g=located["grade"].map({"full": 0, "partial": 1}), _e=-located["effect"])
    best = order.sort_values(["_g", "_e"], kind="stable").index[0]
    return str(best), str(located.loc[best, "grade"])


def outputs(folder: Path, cell_ids: list[str]) -> Any:
    table = RawResults(folder).intervened_outputs()
    table = table[table["cell_id"].isin(cell_ids)]
    return table.sort_values(["dataset_id", "cell_id", "example_index"]).reset_index(drop=True)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=24, help="pairs per family")
    parser.add_argument("--variables", nargs="+", default=["carry_0"], help="variables, or 'all' (every default "
                        "target)")
    parser.add_argument("--top", type=float, default=ScreenConfig().top_fraction, help="fraction of the cells verified")
    parser.add_argument("--score", default=ScreenConfig().score, choices=get_args(Score))
    parser.add_argument("--exact-metric", action="store_true", help="(B) also computes the exact metric")
    parser.add_argument("--path-steps", type=int, default=0, help="(B) estimates with gradients averaged over this "
                        "many points of the path from base to source (0: plain AtP)")
    parser.add_argument("--kinds", nargs="+", default=["residual", "attention", "mlp", "head"], choices=UNIT_KINDS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-pack", action="store_true", help="(A) and (B) run each site's cells in their own "
                        "forwards (the engine's default) instead of packing cells of different sites together")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = AdditionSettings()
    pipeline = LMPipeline(str(TASK.organism), device="cpu", max_new_tokens=TASK.max_new_tokens(settings))
    cells = sweep_cells(pipeline, TASK.token_positions(pipeline, settings), kinds=args.kinds)
    attribution = UnitAttribution(pipeline, cells)
    datasets = TASK.make_datasets(settings, FAMILIES, args.pairs, args.seed)
    model = TASK.main_model(settings)
    variables = (["+".join(g) for g in TASK.default_targets(settings)] if args.variables == ["all"]
                 else args.variables)
    batch_size = args.pairs  # one part per family
    config = ScreenConfig(top_fraction=args.top, random_fraction=0.0, seed=args.seed, score=args.score,
                          exact_metric=args.exact_metric, path_steps=args.path_steps)

    sweep_best: tuple[float, Path, Any] | None = None
    verdict_best: dict[str, tuple[float, Any]] = {}
    screen_best: dict[str, tuple[float, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            folder = Path(tmp) / f"full{repeat}"
            raw, seconds = full_sweep(attribution, datasets, folder, batch_size, pack_sites=not args.no_pack)
            if sweep_best is None or seconds < sweep_best[0]:
                sweep_best = (seconds, folder, raw)
            for variable in variables:
                tests, seconds = full_verdicts(raw, model, datasets, variable)
                if variable not in verdict_best or seconds < verdict_best[variable][0]:
                    verdict_best[variable] = (seconds, tests)
                start = time.perf_counter()
                screen = screen_and_verify(attribution, model, datasets, variable.split("+"), TASK.checker, config,
                                           results_dir=Path(tmp) / f"screen{repeat}-{variable}",
                                           batch_size=batch_size, pack_sites=not args.no_pack)
                seconds = time.perf_counter() - start
                if variable not in screen_best or seconds < screen_best[variable][0]:
                    screen_best[variable] = (seconds, screen)

        assert sweep_best is not None
        sweep_seconds, full_folder, _ = sweep_best
        n_pairs = sum(len(d) for d in datasets.values())
        rows: dict[str, dict[str, Any]] = {}
        for variable in variables:
            full_tests = verdict_best[variable][1]
            screen = screen_best[variable][1]
            verified = screen.table[screen.table["chosen"] != ""]["cell_id"].tolist()
            a, b = outputs(full_folder, verified), outputs(Path(screen.results_dir), verified)
            same_ids = len(a) == len(b) == len(verified) * n_pairs and all(
                list(x) == list(y) for x, y in zip(a["output_token_ids"], b["output_token_ids"]))
            logit_diff = max(float(np.abs(np.asarray(x[0]) - np.asarray(y[0])).max())
                             for x, y in zip(a["topk_logits"], b["topk_logits"]))
            mine = screen.table.set_index("cell_id").loc[verified]
            same_counts = all(int(full_tests.loc[c, k]) == int(mine.loc[c, k])
                              for c in verified for k in ("gained", "lost"))
            located_full = full_tests.index[full_tests["grade"].isin(["full", "partial"])].tolist()
            table = screen.table.set_index("cell_id")
            full_location = location(full_tests)
            screen_location = location(table.loc[verified])
            rows[variable] = {
                "full_seconds": sweep_seconds + verdict_best[variable][0], "screen_seconds": screen_best[variable][0],
                "screen_stages": screen.seconds, "verified": verified, "same_token_ids": same_ids,
                "max_logit_diff": logit_diff, "same_counts": same_counts, "located_full": located_full,
                "located_full_verified": [c for c in located_full if c in verified],
                "located_full_ranks": {c: int(table.loc[c, "rank"]) + 1 for c in located_full},
                "full_location": list(full_location), "screen_location": list(screen_location),
                "same_verdict": full_location == screen_location}

    n_cells = len(cells)
    kinds = ", ".join(f"{sum(c.kind == k for c in cells)} {k}" for k in args.kinds)
    print(f"study: addition organism, {n_cells} cells ({kinds}), {n_pairs} pairs ({', '.join(FAMILIES)}); screen: "
          f"top {args.top:.0%} by `{args.score}`{', with the exact metric' if args.exact_metric else ''}; "
          f"{args.threads} thread(s); best of {args.repeats} interleaved runs; full sweep (engine, "
          f"{n_cells} cells) {sweep_seconds:.2f} s\n")
    print("| variable | (A) sweep + verdicts | (B) screen [estimate, exact metric, engine, verdicts] | (A)/(B) | "
          "located by (A) (rank in (B)) | location (A) / (B) | outputs identical on the verified cells |")
    print("|---|---|---|---|---|---|---|")
    for variable, r in rows.items():
        stages = ", ".join(f"{r['screen_stages'].get(k, 0.0):.2f}" for k in ("estimate", "exact_metric",
                                                                          "interchange", "verdicts"))
        located = ", ".join(f"`{c}` ({k})" for c, k in r["located_full_ranks"].items()) or "none"
        where = lambda loc: f"`{loc[0]}` {loc[1]}" if loc[0] else "none"  # noqa: E731
        same = r["same_token_ids"] and r["same_counts"] and r["max_logit_diff"] < 1e-4
        print(f"| {variable} | {r['full_seconds']:.2f} s | {r['screen_seconds']:.2f} s [{stages}] | "
              f"{r['full_seconds'] / r['screen_seconds']:.1f}x | {located} | {where(r['full_location'])} / "
              f"{where(r['screen_location'])} | {'yes' if same else 'NO'} ({len(r['verified'])} cells, max top-1 "
              f"logit difference {r['max_logit_diff']:.0e}) |")
    study_full = sweep_seconds + sum(verdict_best[v][0] for v in variables)
    study_screen = sum(r["screen_seconds"] for r in rows.values())
    located_vars = [v for v, r in rows.items() if r["full_location"][0]]
    same = [v for v in located_vars if rows[v]["same_verdict"]]
    extra = [v for v, r in rows.items() if not r["full_location"][0] and r["screen_location"][0]]
    print(f"\nstudy ({len(variables)} variable(s)): (A) {study_full:.2f} s, (B) {study_screen:.2f} s, (A)/(B) = "
          f"{study_full / study_screen:.1f}x; same location and grade for {len(same)} of the {len(located_vars)} "
          f"variables (A) locates" + (f"; (B) also locates {', '.join(extra)} (Holm over fewer cells)" if extra
                                       else ""))
    report = {"cells": n_cells, "pairs": n_pairs, "score": args.score, "top": args.top, "sweep_seconds": sweep_seconds,
              "study_full_seconds": study_full, "study_screen_seconds": study_screen, "variables": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not all(r["same_token_ids"] and r["same_counts"] and r["max_logit_diff"] < 1e-4 for r in rows.values()):
        raise SystemExit("the verified cells' outputs differ between the full sweep and the screen")
    return report


if __name__ == "__main__":
    main()
