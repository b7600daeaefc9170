"""Step 1: sample counterfactual datasets for a task and keep the pairs the model gets right.

    python -m experiments.steps.filter --task general_addition [--model organism] [--size 128] [--test] [task settings]

Writes <study>/datasets/<family>/ and <study>/metadata.json (task, settings, filter accuracy per dataset).
A task with ``filter_pairs=False`` keeps every pair and loads no model here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from experiments.steps.common import (
    check_same_study,
    load_pipeline,
    read_metadata,
    run_step,
    split_task,
    step1_settings,
    study_dir,
    study_parser,
    task_settings,
    write_metadata,
)

TEST_PAIRS = 24
"""Pairs per family in a ``--test`` run."""


def main(argv: list[str] | None = None, task: str | None = None) -> Path:
    chosen, rest = split_task(argv, task)
    args = study_parser(chosen, __doc__, step=1).parse_args(rest)
    settings = task_settings(chosen, args)
    if chosen.filter_pairs:
        from experiments.engine.filter_experiment import FilterExperiment  # torch: after parsing, so --help is instant

    size = min(args.size, TEST_PAIRS) if args.test else args.size
    out = study_dir(chosen, args)
    experiments = []
    if (out / "metadata.json").exists() and (out / "raw").exists():
        # new datasets would orphan the raw results already computed on the old ones
        previous = read_metadata(out)
        check_same_study(args, previous, (*step1_settings(chosen), "seed", "size", "families", "test"))
        experiments = previous.get("experiments", [])  # same datasets: step 2's records stay valid
    families = args.families or chosen.families(settings)
    datasets = chosen.make_datasets(settings, families, size, args.seed)
    if chosen.filter_pairs:
        causal_model = chosen.main_model(settings)
        kept, reports = FilterExperiment(load_pipeline(chosen, args), causal_model, chosen.checker).filter(datasets)
    else:  # the task studies inputs the model gets wrong: every pair is kept, no model is run
        kept, reports = unfiltered(datasets)
    saved = []
    for report in reports:
        accuracy = "  (not filtered)" if report.input_accuracy is None else f"{report.input_accuracy:6.1%}"
        print(f"{report.dataset_id:18s} model accuracy on inputs {accuracy}   "
              f"kept {report.kept_pairs}/{report.total_pairs} pairs")
        if report.kept_pairs == 0:
            print(f"  dropping {report.dataset_id}: no pair survives filtering")
            continue
        kept[report.dataset_id].save(out / "datasets" / report.dataset_id)
        saved.append(report.dataset_id)
    if not saved:
        raise SystemExit("the model is wrong on every pair: nothing to study (check --model and the task settings)")
    write_metadata(out, {
        "task": chosen.name, "model": args.model, **settings.model_dump(), "seed": args.seed, "size": args.size,
        "families": args.families, "pairs_per_family": size,
        "chat": args.chat, "test": args.test, "datasets": saved,
        "filter": [r.model_dump() for r in reports],
        **({"experiments": experiments} if experiments else {}),
    })
    print(f"datasets and metadata written to {out}")
    return out


class UnfilteredReport(BaseModel):
    """Step 1's record of a dataset of a task that keeps every pair (``Task.filter_pairs=False``)."""

    dataset_id: str
    total_pairs: int
    kept_pairs: int
    input_accuracy: float | None = None
    inputs_checked: int = 0


def unfiltered(datasets: dict[str, Any]) -> tuple[dict[str, Any], list[UnfilteredReport]]:
    """Every dataset as it is, with a report that says so."""
    return dict(datasets), [UnfilteredReport(dataset_id=name, total_pairs=len(d), kept_pairs=len(d))
                            for name, d in datasets.items()]


if __name__ == "__main__":
    sys.exit(run_step(main))
