"""DAS over the residual-stream cells of the addition organism, next to full-vector patching and an untrained
subspace of the same size, judged on held-out pairs.

    .venv/bin/python scripts/das_scan.py [--variable carry_0] [--k 2] [--pairs 256] [--steps 300]
        [--families random flip_carry_0] [--layers 0 1 2] [--positions digit_1_0 last]

Per cell: the held-out informative IIA (pairs whose label differs from the unpatched output) of DAS, of
full-vector patching and of the untrained subspace, and DAS's paired effect over the unpatched run with its CI
and one-sided exact p (uncorrected: a scan over many cells needs the Holm correction of causal.verdicts).
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from experiments.attribution import ResidualCell
from experiments.pipeline import LMPipeline
from experiments.residual_das import ResidualDAS
from tasks.general_addition.task import TASK, AdditionSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variable", default="carry_0")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=256, help="pairs per family")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--families", nargs="+", default=["random", "flip_carry_0"])
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--positions", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = AdditionSettings()
    pipeline = LMPipeline(str(TASK.organism), device="cpu")
    positions = [p for p in TASK.token_positions(pipeline, settings) if args.positions is None or p.id in args.positions]
    layers = args.layers if args.layers is not None else list(range(-1, pipeline.num_layers))
    datasets = TASK.make_datasets(settings, args.families, args.pairs, args.seed)
    model = TASK.main_model(settings)
    examples = [e for d in datasets.values() for e in d.to_list()]
    labels = [label for d in datasets.values() for label in model.label_counterfactual_data(d, [args.variable])]
    das = ResidualDAS(pipeline, [e["input"] for e in examples], [e["counterfactual_inputs"][0] for e in examples],
                      labels, seed=args.seed)
    print(f"{args.variable}: DAS k={args.k}, {args.steps} steps of 32, {len(das.train)} train / {len(das.test)} test "
          f"pairs ({', '.join(args.families)})\n")
    print("| cell | DAS informative IIA (n) | full-vector | untrained | DAS effect [95% CI] | p |\n|---|---|---|---|---|---|")
    start = time.perf_counter()
    for cell in tqdm([ResidualCell(layer, p) for layer in layers for p in positions], desc="cells", leave=False):
        r = das.fit(cell, k=args.k, steps=args.steps)
        print(f"| `{r.cell_id}` | {r.das.informative_iia:.2f} ({r.das.n_informative}) | {r.full_vector.informative_iia:.2f} | "
              f"{r.untrained.informative_iia:.2f} | {r.das.effect:+.3f} [{r.das.effect_ci[0]:+.3f}, "
              f"{r.das.effect_ci[1]:+.3f}] | {r.das.p_value:.2g} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
