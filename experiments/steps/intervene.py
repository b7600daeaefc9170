"""Step 2: the task's intervention sweeps on the filtered datasets; writes raw results only (no causal model).

    python -m experiments.steps.intervene --task general_addition [--model organism] [--batch-size 64] [--layers -1 0 1] [--backend hooks|pyvene] [--test]

Runs ``task.sweeps`` (for addition: a residual-stream sweep over every layer incl. -1 = embeddings × every
token position, and a single-head sweep at the last position). A killed run, rerun with the same
arguments, resumes where it stopped. Each finished experiment is recorded in the study's metadata.json
under ``experiments`` (id, type, folder relative to the study): step 3 scores exactly those.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.steps.common import (
    check_same_study,
    load_datasets,
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


def record_experiment(out: Path, experiment_id: str, experiment_type: str, folder: Path) -> None:
    """Add (or refresh) one finished experiment in ``metadata["experiments"]``, keeping the others listed."""
    metadata = read_metadata(out)
    entry = {"id": experiment_id, "type": experiment_type, "folder": folder.relative_to(out).as_posix()}
    listed = [e for e in metadata.get("experiments", []) if e.get("id") != experiment_id]
    write_metadata(out, {**metadata, "experiments": [*listed, entry]})


def main(argv: list[str] | None = None, task: str | None = None) -> Path:
    chosen, rest = split_task(argv, task)
    args = study_parser(chosen, __doc__, step=2).parse_args(rest)
    settings = task_settings(chosen, args)
    out = study_dir(chosen, args)
    metadata = read_metadata(out)
    if metadata.get("task", chosen.name) != chosen.name:
        raise SystemExit(f"{out} holds a study of task {metadata['task']!r}, not {chosen.name!r}")
    check_same_study(args, metadata, step1_settings(chosen))
    datasets = load_datasets(out)
    pipeline = load_pipeline(chosen, args)  # torch from here on
    positions = chosen.token_positions(pipeline, settings)
    config = {"batch_size": args.batch_size, "max_rows_per_forward": args.max_rows, "backend": args.backend}
    if args.layers is not None and not [layer for layer in args.layers if layer >= 0] and not args.no_heads:
        print("attention heads: skipped (no layer >= 0 among --layers)")
    pairs = sum(len(d) for d in datasets.values())
    for experiment in chosen.sweeps(pipeline, settings, positions, config, layers=args.layers, heads=not args.no_heads):
        folder = out / "raw" / experiment.config.id
        experiment.perform_interventions(datasets, results_dir=folder)
        record_experiment(out, experiment.config.id, experiment.experiment_type, folder)
        print(f"{experiment.config.id}: {len(experiment.cells)} cells × {pairs} pairs")
    print(f"raw results written to {out / 'raw'}")
    return out


if __name__ == "__main__":
    sys.exit(run_step(main))
