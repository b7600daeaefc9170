"""DAS over the residual-stream cells of the addition organism, next to full-vector patching and an untrained
subspace of the same size, judged on held-out pairs.

    .venv/bin/python scripts/das_scan.py [--variable carry_0] [--k 2] [--pairs 256] [--steps 300]
        [--families random flip_carry_0] [--layers 0 1 2] [--positions digit_1_0 last]
        [--joint 1:digit_0_0+digit_1_0 ...] [--parametrisation low_rank] [--threads 2]

Cells: every layer × position (``--layers``/``--positions`` narrow them), then the joint units of ``--joint``
(``LAYER:POS+POS…``: the positions' residual vectors at that layer learned together, in their concatenated
space; default: the two ones digits at layers 0 and 1; ``--joint`` with nothing after it: none). Training runs
through the layers above each cell only (`experiments.suffix_training`); the sources and the base pass are
computed once for the whole scan.

Per cell: the held-out informative IIA (pairs whose label differs from the unpatched output) of DAS, of
full-vector patching and of the untrained subspace, and DAS's paired effect over the unpatched run with its CI
and one-sided exact p (uncorrected: a scan over many cells needs the Holm correction of causal.verdicts).

``--parametrisation``: ``low_rank`` (the default): a (m·d, k) basis under torch's orthogonal parametrisation
(Householder; pyvene's low-rank DAS, `residual_das.LowRankSubspace`); or the orthogonal map of a full
(m·d, m·d) rotation whose first k columns are the subspace (``matrix_exp``, `ResidualDAS.fit`'s default and the
parametrisation of the scan reported in the README; ``cayley``; ``householder``). A full rotation's matrix
exponential costs more per step than the rest of a step at most cells of the organism (the whole scan takes
about twice as long with it).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from experiments.attribution import ResidualCell
from experiments.pipeline import LMPipeline
from experiments.residual_das import JointResidualCell, LowRankSubspace, ResidualDAS
from tasks.general_addition.task import TASK, AdditionSettings

DEFAULT_JOINT = ["0:digit_0_0+digit_1_0", "1:digit_0_0+digit_1_0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variable", default="carry_0")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=256, help="pairs per family")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--families", nargs="+", default=["random", "flip_carry_0"])
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--positions", nargs="*", default=None)
    parser.add_argument("--joint", nargs="*", default=DEFAULT_JOINT, help="joint units LAYER:POS+POS…")
    parser.add_argument("--parametrisation", default="low_rank",
                        choices=["matrix_exp", "cayley", "householder", "low_rank"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    settings = AdditionSettings()
    pipeline = LMPipeline(str(TASK.organism), device="cpu")
    all_positions = {p.id: p for p in TASK.token_positions(pipeline, settings)}
    positions = [p for p in all_positions.values() if args.positions is None or p.id in args.positions]
    layers = args.layers if args.layers is not None else list(range(-1, pipeline.num_layers))
    cells: list[ResidualCell | JointResidualCell] = [ResidualCell(layer, p) for layer in layers for p in positions]
    for spec in args.joint:
        layer, names = spec.split(":")
        cells.append(JointResidualCell(int(layer), tuple(all_positions[name] for name in names.split("+"))))
    datasets = TASK.make_datasets(settings, args.families, args.pairs, args.seed)
    model = TASK.main_model(settings)
    examples = [e for d in datasets.values() for e in d.to_list()]
    labels = [label for d in datasets.values() for label in model.label_counterfactual_data(d, [args.variable])]
    das = ResidualDAS(pipeline, [e["input"] for e in examples], [e["counterfactual_inputs"][0] for e in examples],
                      labels, seed=args.seed)
    print(f"{args.variable}: DAS k={args.k} ({args.parametrisation}), {args.steps} steps of 32, {len(das.train)} train / "
          f"{len(das.test)} test pairs ({', '.join(args.families)})\n")
    print("| cell | DAS informative IIA (n) | full-vector | untrained | DAS effect [95% CI] | p |\n|---|---|---|---|---|---|")
    for cell in tqdm(cells, desc="cells", leave=False):
        if args.parametrisation == "low_rank":
            width = pipeline.hidden_size * (len(cell.positions) if isinstance(cell, JointResidualCell) else 1)
            r = das.fit(cell, k=args.k, steps=args.steps, module=LowRankSubspace(width, args.k, args.seed))
        else:
            r = das.fit(cell, k=args.k, steps=args.steps, orthogonal_map=args.parametrisation)
        print(f"| `{r.cell_id}` | {r.das.informative_iia:.2f} ({r.das.n_informative}) | {r.full_vector.informative_iia:.2f} | "
              f"{r.untrained.informative_iia:.2f} | {r.das.effect:+.3f} [{r.das.effect_ci[0]:+.3f}, "
              f"{r.das.effect_ci[1]:+.3f}] | {r.das.p_value:.2g} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s (model, data and {len(cells)} cells)")


if __name__ == "__main__":
    main()
