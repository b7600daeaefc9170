"""Step 2: interchange interventions on the filtered datasets; writes raw results only (no causal model).

    python tasks/general_addition/02_run_interventions.py --model organism --digits 2 [--batch-size 64] [--layers -1 0 1] [--test]

Runs a residual-stream sweep (every layer incl. -1 = embeddings × every addition token position)
and a single-head sweep at the last position. A killed run, rerun with the same arguments,
resumes where it stopped. Across processes or machines: run ``--shard I/N`` for I = 0 … N-1
(each resumes on its own), then ``--merge-shards N`` (see scripts/slurm_sweep.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.fleet import merge_shards, shard_dir  # noqa: E402
from experiments.intervention_experiment import PatchAttentionHeads, PatchResidualStream  # noqa: E402
from tasks.general_addition.study import (  # noqa: E402
    check_same_study,
    load_datasets,
    load_pipeline,
    read_metadata,
    study_dir,
    study_parser,
)
from tasks.general_addition.token_positions import addition_token_positions  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    args = study_parser(__doc__).parse_args(argv)
    out = study_dir(args)
    metadata = read_metadata(out)
    check_same_study(args, metadata)
    sweeps = ["residual_stream"] + ([] if args.no_heads else ["attention_heads"])
    if args.merge_shards is not None:
        for name in sweeps:
            shards = [shard_dir(out / "raw" / "shards" / name, (i, args.merge_shards)) for i in range(args.merge_shards)]
            if name == "attention_heads" and not any(d.exists() for d in shards):
                continue  # no head sweep was run (e.g. no layer >= 0)
            merge_shards(shards, out / "raw" / name)
            print(f"{name}: merged {args.merge_shards} shards into {out / 'raw' / name}")
        return out

    def results_dir(name: str) -> Path:
        return out / "raw" / name if args.shard is None else shard_dir(out / "raw" / "shards" / name, args.shard)

    datasets = load_datasets(out)
    pipeline = load_pipeline(args)
    layers = args.layers if args.layers is not None else list(range(-1, pipeline.num_layers))
    positions = addition_token_positions(pipeline, args.digits, metadata["template"])
    config = {"batch_size": args.batch_size, "max_rows_per_forward": args.max_rows}
    residual = PatchResidualStream(pipeline, layers, positions, config={**config, "id": "residual_stream"})
    residual.perform_interventions(datasets, results_dir=results_dir("residual_stream"), shard=args.shard)
    print(f"residual stream: {len(residual.cells)} cells × {sum(len(d) for d in datasets.values())} pairs")
    head_layers = [l for l in layers if l >= 0]
    if not args.no_heads and not head_layers:
        print("attention heads: skipped (no layer >= 0 among --layers)")
    elif not args.no_heads:
        heads = PatchAttentionHeads(pipeline, PatchAttentionHeads.every_head(pipeline, head_layers),
                                    [p for p in positions if p.id == "last"], config={**config, "id": "attention_heads"})
        heads.perform_interventions(datasets, results_dir=results_dir("attention_heads"), shard=args.shard)
        print(f"attention heads: {len(heads.cells)} cells")
    shard_note = f" (shard {args.shard[0]}/{args.shard[1]}, under raw/shards)" if args.shard else ""
    print(f"raw results written to {out / 'raw'}{shard_note}")
    return out


if __name__ == "__main__":
    main()
