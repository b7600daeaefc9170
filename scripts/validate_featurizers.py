"""Do the learned featurizers find what is planted, and nothing where nothing can be? A table of methods ×
(organism, cell) on the addition organisms, for ``carry_0``.

    .venv/bin/python scripts/validate_featurizers.py [--organisms natural aligned rotated]
        [--methods das boundless_das dbm pca] [--components residual attention mlp head]
        [--pairs 128] [--steps 300] [--out validation.md]

Organisms: ``natural`` (the shipped addition organism), ``aligned`` and ``rotated`` (carry_0 planted by
interchange intervention training in a 2-d subspace of the residual after layer 0 at ``digit_1_0``: residual
dimensions 0 and 1, or a random 2-d subspace; see tasks/general_addition/organism/README.md). Cells:

- ``L0@digit_1_0``: the planted cell (the first token where carry_0 is computable);
- ``L-1@digit_1_0``: the embedding of the second operand's ones digit (one digit alone does not determine
  carry_0);
- ``L1@digit_1_1``: the second operand's tens digit, a position carry_0 has not reached (its ones digit comes
  later);
- ``L1@digit_1_0``: a downstream cell that must carry it on towards the answer.

``--components``: the units trained at each cell: ``residual`` (the residual stream after the layer; the rows
are named by method alone), ``attention`` / ``mlp`` (the layer's attention or MLP output at the position) and
``head`` (every head's output before the output projection, one row per head); the embeddings have only the
residual stream.

Each entry: held-out test IIA (all n test pairs; the first row gives the unpatched network's IIA on the same
pairs, and the control rows each control's IIA, trained and judged like the method) and whether the method *finds* carry_0 there (beats the
unpatched network and every control: untrained subspace of the same size, permuted labels, the same training on
a random-weight network; `experiments.featurizers.training`). For the planted cell the largest cosine
between the learned span and the planted one are reported too (``cos``: the largest; carry_0 is binary, so one
planted direction suffices). Nothing here is fixed in advance: the table is
what the methods do.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.featurizers.training import (CONTROLS, LabelledPairs, TrainedFeaturizer, TrainingSettings,
                                             random_weight_pipeline, train_featurizer)
from experiments.pipeline import LMPipeline
from experiments.featurizers.das import UnitCell
from experiments.steps.common import device_name
from tasks.general_addition.organism import (ORGANISM_DIR, PLANTED_ALIGNED_DIR, PLANTED_ROTATED_DIR,
                                             load_planted_spec)
from tasks.general_addition.task import TASK, AdditionSettings

ORGANISMS = {"natural": ORGANISM_DIR, "aligned": PLANTED_ALIGNED_DIR, "rotated": PLANTED_ROTATED_DIR}
CELLS = [(0, "digit_1_0"), (-1, "digit_1_0"), (1, "digit_1_1"), (1, "digit_1_0")]
COMPONENTS = {"residual": "block_output", "attention": "attention_output", "mlp": "mlp_output",
              "head": "head_attention_value_output"}


def units(layer: int, position, component: str, n_heads: int) -> list[tuple[str, UnitCell]]:
    """(row suffix, unit) of one component at one cell: nothing for a sublayer of the embeddings, every head."""
    if component == "residual":
        return [("", UnitCell(layer, (position,)))]
    if layer == -1:
        return []
    if component == "head":
        return [(f" · head {h}", UnitCell(layer, (position,), COMPONENTS[component], h)) for h in range(n_heads)]
    return [(f" · {COMPONENTS[component]}", UnitCell(layer, (position,), COMPONENTS[component]))]


def labelled_pairs(pairs: int, seed: int, variable: str = "carry_0") -> LabelledPairs:
    settings = AdditionSettings()
    datasets = TASK.make_datasets(settings, ["random", f"flip_{variable}"], pairs, seed)
    return LabelledPairs.from_datasets(datasets, TASK.main_model(settings), variable)


def best_cosine(planted: torch.Tensor, learned: torch.Tensor) -> float:
    """Largest cosine between a learned direction and the planted span: 1 when the learned subspace contains a
    planted direction (a binary variable needs only one of the planted two)."""
    q, _ = torch.linalg.qr(learned.double())
    return float(torch.linalg.svdvals(planted.double().T @ q).max())


def entry(result: TrainedFeaturizer, spec_basis: torch.Tensor | None) -> str:
    mark = "**found**" if result.found else "–"
    extra = f", {result.size} dims" if result.settings.method in ("boundless_das", "dbm", "dbm_hard_concrete") else ""
    if spec_basis is not None and result.size > 0:
        extra += f", cos {best_cosine(spec_basis, result.featurizer.basis):.2f}"
    return f"{result.test.iia:.2f} {mark}{extra}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--organisms", nargs="+", default=list(ORGANISMS), choices=list(ORGANISMS))
    parser.add_argument("--methods", nargs="+", default=["das", "boundless_das", "dbm", "pca"],
                        choices=["das", "boundless_das", "dbm", "dbm_hard_concrete", "pca"])
    parser.add_argument("--controls", nargs="*", default=list(CONTROLS), choices=list(CONTROLS))
    parser.add_argument("--components", nargs="+", default=["residual"], choices=list(COMPONENTS))
    parser.add_argument("--pairs", type=int, default=64, help="pairs per family (random, flip_carry_0)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", type=device_name)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    pairs = labelled_pairs(args.pairs, args.seed)
    start = time.perf_counter()
    floor, full_row = "unpatched (floor), n", "full-vector"
    table: dict[str, dict[str, str]] = {}  # column -> row -> entry; a row missing from a column reads "n/a"
    for organism in args.organisms:
        pipeline = LMPipeline(str(ORGANISMS[organism]), device=args.device)
        randomised = random_weight_pipeline(pipeline, args.seed) if "random_weights" in args.controls else None
        spec = load_planted_spec(ORGANISMS[organism]) if organism != "natural" else None
        positions = {p.id: p for p in TASK.token_positions(pipeline, AdditionSettings())}
        for layer, position in tqdm(CELLS, desc=organism, leave=False):
            planted = spec is not None and (layer, position) == (spec.layer, spec.position)
            column = table.setdefault(f"{organism} `L{layer}@{position}`{' (planted)' if planted else ''}", {})
            for component in args.components:
                residual = component == "residual"
                for suffix, cell in units(layer, positions[position], component, pipeline.num_heads):
                    for method in args.methods:
                        settings = TrainingSettings(method=method, steps=args.steps, seed=args.seed,
                                                    controls=tuple(args.controls))
                        result = train_featurizer(pipeline, pairs, cell, settings, random_pipeline=randomised)
                        column.setdefault(floor, f"{result.test.floor:.2f}, n = {result.test.n}")
                        if residual:  # full-vector patching is judged at residual cells
                            column.setdefault(full_row, f"{result.full_vector.iia:.2f}")
                        row = method + suffix
                        column[row] = entry(result, spec.basis_matrix() if planted and residual else None)
                        for name in args.controls:
                            column[f"{row} control: {name}"] = f"{result.controls[name].held_out.iia:.2f}"
    columns = list(table)
    rows = list(dict.fromkeys([floor, full_row] + [r for c in table.values() for r in c]))
    rows = [r for r in rows if any(r in c for c in table.values())]
    lines = [f"carry_0, {len(pairs.bases)} pairs (random + flip_carry_0), {args.steps} steps, controls: "
             f"{', '.join(args.controls) or 'none'}; test IIA, **found** = beats the unpatched network and every "
             f"control (one-sided exact paired tests, alpha 0.05)", "",
             "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(table[c].get(row, "n/a") for c in columns) + " |" for row in rows]
    lines.append(f"\n{time.perf_counter() - start:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
