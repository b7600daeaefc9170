"""Screen-then-verify vs the full exact sweep, on the same study, in one run.

    .venv/bin/python benchmarks/attribution_screen.py [--pairs 24] [--variable carry_0] [--top 0.1]
        [--kinds residual attention mlp head] [--repeats 2] [--threads 1] [--json out.json]

The study: the addition organism, every cell of ``--kinds`` (every layer × position; every head), the families
random, flip_carry_0 and flip_carry_1 with ``--pairs`` pairs each, the main hypothesis' ``--variable``.

(A) full exact sweep: the engine's interchange of every cell (`InterventionExperiment.perform_interventions`,
    greedy answers into a results folder), scored (`compute_interchange_scores`) and judged (`causal.verdicts`,
    Holm over all cells);
(B) screen then verify (`experiments.attribution_screen.screen_and_verify`): estimates of every cell, then the
    exact effect on the metric and the engine's interchange of the top ``--top`` fraction only (no random sample),
    scored and judged (Holm over the verified cells).

Checks: on every verified cell and pair the engine's answer token ids are identical in (A) and (B) (top-k logits
within 1e-4) and so are the verdict counts (n, gained, lost); the report says which of (A)'s located cells (B)
verified. The variants run ``--repeats`` times, interleaved (A, B, A, B), best time kept. The raw results of (A)
serve every variable of every hypothesis, while (B) is per variable: the last line says what screening all the
task's default targets would cost next to one full sweep.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from causal.interchange_scores import compute_interchange_scores
from causal.results import RawResults
from causal.verdicts import POOLED
from experiments.attribution_screen import ScreenConfig, estimate_study, screen_and_verify
from experiments.attribution_units import UNIT_KINDS, UnitAttribution, sweep_cells
from experiments.intervention_experiment import ExperimentConfig, InterventionExperiment
from experiments.pipeline import LMPipeline
from tasks.general_addition.task import TASK, AdditionSettings

FAMILIES = ["random", "flip_carry_0", "flip_carry_1"]


def full_sweep(attribution: UnitAttribution, model: Any, datasets: dict[str, Any], variable: str, folder: Path,
               batch_size: int) -> tuple[Any, float]:
    """(A): every cell through the engine, scored and judged. Returns (verdict tests pooled, seconds)."""
    start = time.perf_counter()
    experiment = InterventionExperiment(attribution.pipeline, [c.engine_cell() for c in attribution.cells],
                                        ExperimentConfig(id=f"full-{variable}", batch_size=batch_size,
                                                         max_rows_per_forward=attribution.max_rows_per_forward))
    raw = experiment.perform_interventions(datasets, results_dir=folder, verbose=False)
    scores = compute_interchange_scores(raw, model, datasets, [[variable]], TASK.checker)
    tests = scores.verdicts().tests
    return tests[tests["scope"] == POOLED].set_index("cell_id"), time.perf_counter() - start


def outputs(folder: Path, cell_ids: list[str]) -> Any:
    table = RawResults(folder).intervened_outputs()
    table = table[table["cell_id"].isin(cell_ids)]
    return table.sort_values(["dataset_id", "cell_id", "example_index"]).reset_index(drop=True)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=24, help="pairs per family")
    parser.add_argument("--variable", default="carry_0")
    parser.add_argument("--top", type=float, default=0.1, help="fraction of the cells verified")
    parser.add_argument("--kinds", nargs="+", default=["residual", "attention", "mlp", "head"], choices=UNIT_KINDS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = AdditionSettings()
    pipeline = LMPipeline(str(TASK.organism), device="cpu", max_new_tokens=TASK.max_new_tokens(settings))
    cells = sweep_cells(pipeline, TASK.token_positions(pipeline, settings), kinds=args.kinds)
    attribution = UnitAttribution(pipeline, cells)
    datasets = TASK.make_datasets(settings, FAMILIES, args.pairs, args.seed)
    model = TASK.main_model(settings)
    batch_size = args.pairs  # one part per family
    config = ScreenConfig(top_fraction=args.top, random_fraction=0.0, seed=args.seed)

    best: dict[str, tuple[float, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            tests, seconds = full_sweep(attribution, model, datasets, args.variable, Path(tmp) / f"full{repeat}",
                                        batch_size)
            if "full" not in best or seconds < best["full"][0]:
                best["full"] = (seconds, (tests, Path(tmp) / f"full{repeat}"))
            start = time.perf_counter()
            screen = screen_and_verify(attribution, model, datasets, [args.variable], TASK.checker, config,
                                       results_dir=Path(tmp) / f"screen{repeat}", batch_size=batch_size)
            seconds = time.perf_counter() - start
            if "screen" not in best or seconds < best["screen"][0]:
                best["screen"] = (seconds, screen)

        full_seconds, (full_tests, full_folder) = best["full"]
        screen_seconds, screen = best["screen"]
        verified = screen.table[screen.table["chosen"] != ""]["cell_id"].tolist()
        a, b = outputs(full_folder, verified), outputs(Path(screen.results_dir), verified)
        same_ids = len(a) == len(b) == len(verified) * sum(len(d) for d in datasets.values()) and all(
            list(x) == list(y) for x, y in zip(a["output_token_ids"], b["output_token_ids"]))
        logit_diff = max(float(np.abs(np.asarray(x[0]) - np.asarray(y[0])).max())
                         for x, y in zip(a["topk_logits"], b["topk_logits"]))
        mine = screen.table.set_index("cell_id").loc[verified]
        same_counts = all(int(full_tests.loc[c, k]) == int(mine.loc[c, k])
                          for c in verified for k in ("gained", "lost"))
    located_full = full_tests.index[full_tests["grade"].isin(["full", "partial"])].tolist()
    caught = [c for c in located_full if c in verified]
    table = screen.table.set_index("cell_id")
    signed_rank = table["estimate_mean"].rank(ascending=False, method="first").astype(int) - 1
    ranks = {c: (int(table.loc[c, "rank"]), int(signed_rank[c])) for c in located_full}

    # what screening every default target costs, next to the one full sweep that serves them all
    variables = ["+".join(g) for g in TASK.default_targets(settings)]
    start = time.perf_counter()
    for variable in variables:
        estimate_study(attribution, model, datasets, variable.split("+"))
    estimate_all = time.perf_counter() - start
    verify_per_variable = screen_seconds - screen.seconds["estimate"]

    n_pairs = sum(len(d) for d in datasets.values())
    kinds = ", ".join(f"{sum(c.kind == k for c in cells)} {k}" for k in args.kinds)
    print(f"study: addition organism, {len(cells)} cells ({kinds}), {n_pairs} pairs ({', '.join(FAMILIES)}), "
          f"variable {args.variable}; {args.threads} thread(s); best of {args.repeats} interleaved runs")
    print(f"  (A) full exact sweep ({len(cells)} cells through the engine) + verdicts: {full_seconds:7.2f} s")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in screen.seconds.items())
    print(f"  (B) estimate all + exact on the top {args.top:.0%} ({len(verified)} cells) + verdicts: "
          f"{screen_seconds:7.2f} s  [{stages}]")
    print(f"  (A) / (B) = {full_seconds / screen_seconds:.1f}x")
    print(f"  check on the {len(verified)} verified cells x {n_pairs} pairs: answer token ids identical: {same_ids}; "
          f"max top-1 logit difference {logit_diff:.1e}; gained/lost identical: {same_counts}")
    print(f"  located by (A) (Holm over {len(cells)} cells): {len(located_full)} {located_full}; "
          f"verified by (B): {len(caught)} {caught}; their ranks (from 1) by mean |estimate| / by mean estimate: "
          + ", ".join(f"{c} {a + 1} / {b + 1}" for c, (a, b) in ranks.items()))
    screening = estimate_all + len(variables) * verify_per_variable
    print(f"  all {len(variables)} default targets: estimates {estimate_all:.2f} s + verification about "
          f"{verify_per_variable:.2f} s per variable = about {screening:.1f} s of screening, vs {full_seconds:.2f} s "
          f"for one full sweep (its raw results score every variable)")
    report = {"cells": len(cells), "pairs": n_pairs, "variable": args.variable, "verified": verified,
              "seconds": {"full": full_seconds, "screen": screen_seconds, **{f"screen_{k}": v for k, v in
                                                                           screen.seconds.items()},
                          "estimates_all_variables": estimate_all},
              "ratio": full_seconds / screen_seconds, "same_token_ids": same_ids, "max_logit_diff": logit_diff,
              "same_counts": same_counts, "located_full": located_full, "located_full_verified": caught,
              "located_full_ranks_abs_signed": ranks}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not (same_ids and same_counts and logit_diff < 1e-4):
        raise SystemExit("the verified cells' outputs differ between the full sweep and the screen")
    return report


if __name__ == "__main__":
    main()
