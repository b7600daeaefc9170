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
    if args.merge_shards is not None:
        return merge(out, args.merge_shards)
    if chosen.sweeps is None:
        print(f"task {chosen.name!r} declares no sweeps: nothing to run here (its interventions are extra steps of "
              f"the study runner, python -m experiments.study)")
        return out
    datasets = load_datasets(out)
    pipeline = load_pipeline(chosen, args)  # torch from here on
    positions = chosen.token_positions(pipeline, settings)
    config = {"batch_size": args.batch_size, "max_rows_per_forward": args.max_rows, "backend": args.backend,
              "pack_sites": args.pack_sites}
    if args.layers is not None and not [layer for layer in args.layers if layer >= 0] and not args.no_heads:
        print("attention heads: skipped (no layer >= 0 among --layers)")
    pairs = sum(len(d) for d in datasets.values())
    for experiment in chosen.sweeps(pipeline, settings, positions, config, layers=args.layers, heads=not args.no_heads):
        name = experiment.config.id
        if args.shard is not None:  # a shard writes its own folder; --merge-shards assembles and records them
            from experiments.engine.fleet import shard_dir

            folder = shard_dir(out / "raw" / "shards" / name, args.shard)
            experiment.perform_interventions(datasets, results_dir=folder, shard=args.shard, cell_blocks=args.cell_blocks,
                                             restart=args.restart)
            write_shard_note(out, name, experiment.experiment_type)
            print(f"{name}: shard {args.shard[0]}/{args.shard[1]} written to {folder}")
            continue
        folder = out / "raw" / name
        experiment.perform_interventions(datasets, results_dir=folder, restart=args.restart)
        record_experiment(out, name, experiment.experiment_type, folder)
        print(f"{name}: {len(experiment.cells)} cells × {pairs} pairs")
    print(f"raw results written to {out / 'raw'}")
    return out


def write_shard_note(out: Path, name: str, experiment_type: str) -> None:
    """Remember which sweeps were sharded (and their type), so the merge can record them for step 3."""
    metadata = read_metadata(out)
    sharded = {**metadata.get("sharded", {}), name: experiment_type}
    write_metadata(out, {**metadata, "sharded": sharded})


def merge(out: Path, count: int) -> Path:
    """Merge the ``count`` shards of every sharded sweep into ``raw/<sweep>`` and record it (no model needed)."""
    from experiments.engine.fleet import merge_shards, shard_dir

    sharded = read_metadata(out).get("sharded", {})
    if not sharded:
        raise ValueError(f"{out} records no sharded sweep: run step 2 with --shard I/{count} first")
    for name, experiment_type in sharded.items():
        merge_shards([shard_dir(out / "raw" / "shards" / name, (i, count)) for i in range(count)], out / "raw" / name)
        record_experiment(out, name, experiment_type, out / "raw" / name)
        print(f"{name}: merged {count} shards into {out / 'raw' / name}")
    return out


if __name__ == "__main__":
    sys.exit(run_step(main))
