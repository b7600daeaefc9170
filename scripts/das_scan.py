"""A learned-featurizer scan over the cells of an addition organism (residual stream by default; attention
output, MLP output or every head with ``--component``): at each cell, train a
featurizer for one variable (`experiments.featurizers.training.train_featurizer`), judge it on held-out pairs
next to full-vector patching and the controls, and correct across cells.

    .venv/bin/python scripts/das_scan.py [--model organism|planted-aligned|planted-rotated|PATH]
        [--variable carry_0] [--method das|boundless_das|dbm|dbm_hard_concrete|pca] [--k 2] [--pairs 256]
        [--steps 300] [--families random flip_carry_0] [--component residual|attention|mlp|head]
        [--layers 0 1 2] [--positions digit_1_0 last]
        [--joint 1:digit_0_0+digit_1_0 ...] [--controls untrained permuted_labels random_weights]
        [--parametrisation low_rank] [--save DIR] [--threads 2]

Cells: every layer × position (``--layers``/``--positions`` narrow them), then the joint units of ``--joint``
(``LAYER:POS+POS…``: the positions' residual vectors at that layer learned together, in their concatenated
space; default: the two ones digits at layers 0 and 1; ``--joint`` with nothing after it: none). Residual cells
train through the layers above them only (`experiments.featurizers.suffix_training`); the other components through the full
forward.

Per cell: held-out test IIA and informative IIA (pairs whose label differs from the unpatched output), the
full-vector IIA of the same cell on the same pairs, each control's IIA, the method's paired effect over the
unpatched run with its CI, and the cell's p-value: the largest of the one-sided exact p-values against the
unpatched run and against each control (intersection-union: the cell counts only if it beats all of them),
Holm-adjusted over every cell of the scan. **found** = adjusted p < 0.05.

``--save DIR`` writes each single-position cell's featurizer to ``DIR/<cell id>/`` (the folder
`experiments.featurizers.store.load_featurizers` reads for a featurized sweep) and joint units to
``DIR/joint/<cell id>/``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from causal.verdicts import adjust_p_values
from experiments.featurizers.training import (CONTROLS, LabelledPairs, TrainedFeaturizer, TrainingSettings,
                                             random_weight_pipeline, train_featurizer)
from experiments.model_identity import weights_identity
from experiments.pipeline import LMPipeline
from experiments.featurizers.das import UnitCell
from tasks.general_addition.organism import PLANTED_ALIGNED_DIR, PLANTED_ROTATED_DIR
from tasks.general_addition.task import TASK, AdditionSettings

DEFAULT_JOINT = ["0:digit_0_0+digit_1_0", "1:digit_0_0+digit_1_0"]
#: ``--component`` choices and the unit component each trains at.
COMPONENTS = {"residual": "block_output", "attention": "attention_output", "mlp": "mlp_output",
              "head": "head_attention_value_output"}
MODELS = {"organism": TASK.organism, "planted-aligned": PLANTED_ALIGNED_DIR, "planted-rotated": PLANTED_ROTATED_DIR}


def labelled_pairs(families: list[str], pairs: int, seed: int, variable: str) -> LabelledPairs:
    """Pairs of the 2-digit addition task with the main hypothesis' labels for ``variable``."""
    settings = AdditionSettings()
    return LabelledPairs.from_datasets(TASK.make_datasets(settings, families, pairs, seed), TASK.main_model(settings),
                                       variable)


def cell_p_value(result: TrainedFeaturizer) -> float:
    """Intersection-union p: the largest of the p against the unpatched run and against each control."""
    return max([result.test.p_value, *(c.p_value for c in result.controls.values())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism", help=f"{', '.join(MODELS)} or a model folder")
    parser.add_argument("--variable", default="carry_0")
    parser.add_argument("--method", default="das", choices=["das", "boundless_das", "dbm", "dbm_hard_concrete", "pca"])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=256, help="pairs per family")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--families", nargs="+", default=["random", "flip_carry_0"])
    parser.add_argument("--component", default="residual", choices=list(COMPONENTS),
                        help="what the cells are: residual stream, attention output, MLP output or every head")
    parser.add_argument("--layers", type=int, nargs="*", default=None)
    parser.add_argument("--positions", nargs="*", default=None)
    parser.add_argument("--joint", nargs="*", default=DEFAULT_JOINT, help="joint units LAYER:POS+POS…")
    parser.add_argument("--controls", nargs="*", default=list(CONTROLS), choices=list(CONTROLS))
    parser.add_argument("--parametrisation", default="low_rank",
                        choices=["matrix_exp", "cayley", "householder", "low_rank"])
    parser.add_argument("--save", type=Path, default=None, help="save every cell's featurizer under this folder")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipeline = LMPipeline(str(MODELS.get(args.model, args.model)), device="cpu")
    all_positions = {p.id: p for p in TASK.token_positions(pipeline, AdditionSettings())}
    unknown = [p for p in args.positions or [] if p not in all_positions]
    if unknown:
        raise SystemExit(f"unknown position(s) {unknown}; the task's are {sorted(all_positions)}")
    positions = [p for p in all_positions.values() if args.positions is None or p.id in args.positions]
    component = COMPONENTS[args.component]
    low = -1 if component == "block_output" else 0
    layers = args.layers if args.layers is not None else list(range(low, pipeline.num_layers))
    heads = list(range(pipeline.num_heads)) if args.component == "head" else [None]
    cells = [UnitCell(layer, (p,), component, h) for layer in layers for h in heads for p in positions]
    for spec in args.joint:
        layer, names = spec.split(":")
        unknown = [n for n in names.split("+") if n not in all_positions]
        if unknown:
            raise SystemExit(f"--joint {spec}: unknown position(s) {unknown}; the task's are {sorted(all_positions)}")
        cells += [UnitCell(int(layer), tuple(all_positions[n] for n in names.split("+")), component, h) for h in heads]
    bad = [c.cell_id for c in cells if not low <= c.layer < pipeline.num_layers]
    if bad:
        raise SystemExit(f"cells {bad} are outside layers {low}..{pipeline.num_layers - 1} of this model's {component}")
    pairs = labelled_pairs(args.families, args.pairs, args.seed, args.variable)
    settings = TrainingSettings(method=args.method, k=args.k, steps=args.steps, orthogonal_map=args.parametrisation,
                                seed=args.seed, controls=tuple(args.controls))
    randomised = random_weight_pipeline(pipeline, args.seed) if "random_weights" in args.controls else None
    model_sha = weights_identity(pipeline.model, pipeline.weight_files)["weights_sha256"] if args.save else ""
    results = []
    for cell in tqdm(cells, desc="cells"):
        result = train_featurizer(pipeline, pairs, cell, settings, random_pipeline=randomised, progress=False)
        results.append(result)
        if args.save:
            where = args.save / ("joint" if len(cell.positions) > 1 else "") / result.cell_id
            result.save(where, model_sha256=model_sha)
    adjusted = adjust_p_values([cell_p_value(r) for r in results], "holm")
    controls = list(args.controls)
    print(f"{args.variable} on {args.model}, {component} units: {args.method} (k={args.k}, {args.parametrisation}), "
          f"{args.steps} steps, "
          f"{len(pairs.bases)} pairs ({', '.join(args.families)}), split by base example; Holm over {len(cells)} "
          f"cells\n")
    print("| cell | test IIA | informative IIA (n) | full-vector | " + " | ".join(controls)
          + " | effect [95% CI] | Holm p | found |\n" + "|---" * (7 + len(controls)) + "|")
    for r, p in zip(results, adjusted):
        print(f"| `{r.cell_id}` | {r.test.iia:.2f} | {r.test.informative_iia:.2f} ({r.test.n_informative}) | "
              f"{r.full_vector.iia:.2f} | " + " | ".join(f"{r.controls[c].held_out.iia:.2f}" for c in controls)
              + f" | {r.test.effect:+.3f} [{r.test.effect_ci[0]:+.3f}, {r.test.effect_ci[1]:+.3f}] | {p:.2g} | "
              f"{'**found**' if p < 0.05 else '–'} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s (model, data and {len(cells)} cells)")


if __name__ == "__main__":
    main()
