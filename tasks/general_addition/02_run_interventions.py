"""Step 2: interchange interventions on the filtered datasets; writes raw results only (no causal model).

    python tasks/general_addition/02_run_interventions.py --model organism --digits 2 [--batch-size 64] [--layers -1 0 1] [--backend hooks|pyvene] [--test]

Runs a residual-stream sweep (every layer incl. -1 = embeddings × every addition token position)
and a single-head sweep at the last position. A killed run, rerun with the same arguments,
resumes where it stopped. Each finished experiment is recorded in the study's metadata.json under
``experiments`` (id, type, folder relative to the study): step 3 scores exactly those.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.general_addition.study import (  # noqa: E402
    check_same_study,
    load_datasets,
    load_pipeline,
    read_metadata,
    run_step,
    study_dir,
    study_parser,
    write_metadata,
)


def record_experiment(out: Path, experiment_id: str, experiment_type: str, folder: Path) -> None:
    """Add (or refresh) one finished experiment in ``metadata["experiments"]``, keeping the others listed."""
    metadata = read_metadata(out)
    entry = {"id": experiment_id, "type": experiment_type, "folder": folder.relative_to(out).as_posix()}
    listed = [e for e in metadata.get("experiments", []) if e.get("id") != experiment_id]
    write_metadata(out, {**metadata, "experiments": [*listed, entry]})


def main(argv: list[str] | None = None) -> Path:
    args = study_parser(__doc__, step=2).parse_args(argv)
    # torch: after parsing, so --help is instant
    from experiments.intervention_experiment import PatchAttentionHeads, PatchResidualStream
    from tasks.general_addition.token_positions import addition_token_positions

    out = study_dir(args)
    metadata = read_metadata(out)
    check_same_study(args, metadata)
    datasets = load_datasets(out)
    pipeline = load_pipeline(args)
    layers = args.layers if args.layers is not None else list(range(-1, pipeline.num_layers))
    positions = addition_token_positions(pipeline, args.digits, metadata["template"])
    config = {"batch_size": args.batch_size, "max_rows_per_forward": args.max_rows, "backend": args.backend}
    residual = PatchResidualStream(pipeline, layers, positions, config={**config, "id": "residual_stream"})
    residual.perform_interventions(datasets, results_dir=out / "raw" / "residual_stream")
    record_experiment(out, "residual_stream", residual.experiment_type, out / "raw" / "residual_stream")
    print(f"residual stream: {len(residual.cells)} cells × {sum(len(d) for d in datasets.values())} pairs")
    head_layers = [l for l in layers if l >= 0]
    if not args.no_heads and not head_layers:
        print("attention heads: skipped (no layer >= 0 among --layers)")
    elif not args.no_heads:
        heads = PatchAttentionHeads(pipeline, PatchAttentionHeads.every_head(pipeline, head_layers),
                                    [p for p in positions if p.id == "last"], config={**config, "id": "attention_heads"})
        heads.perform_interventions(datasets, results_dir=out / "raw" / "attention_heads")
        record_experiment(out, "attention_heads", heads.experiment_type, out / "raw" / "attention_heads")
        print(f"attention heads: {len(heads.cells)} cells")
    print(f"raw results written to {out / 'raw'}")
    return out


if __name__ == "__main__":
    sys.exit(run_step(main))
