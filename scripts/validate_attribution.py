"""How well attribution patching (AtP) predicts exact residual-stream patching on the addition organism.

    .venv/bin/python scripts/validate_attribution.py [--pairs 24] [--families random flip_carry_0 flip_carry_1]

For every variable of the carry graph and every (layer, position) cell: the mean estimated and the mean exact
effect on the metric log p(cf label) - log p(base label) (answers scored whole, teacher-forced) over the pairs.
Prints per variable the Spearman correlation between the two over cells, whether the exact best cell is in the
estimate's top 5, and the cell where the estimate is most wrong; plus the time of estimate vs exact.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats
from tqdm import tqdm

from experiments.attribution import ResidualAttribution, ResidualCell
from experiments.pipeline import LMPipeline
from tasks.general_addition.task import TASK, AdditionSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=24, help="pairs per family")
    parser.add_argument("--families", nargs="+", default=["random", "flip_carry_0", "flip_carry_1"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = AdditionSettings()
    pipeline = LMPipeline(str(TASK.organism), device="cpu")
    positions = TASK.token_positions(pipeline, settings)
    cells = [ResidualCell(layer, p) for layer in range(-1, pipeline.num_layers) for p in positions]
    datasets = TASK.make_datasets(settings, args.families, args.pairs, args.seed)
    model = TASK.main_model(settings)
    variables = [g[0] for g in TASK.default_targets(settings, [p.id for p in positions])]
    attribution = ResidualAttribution(pipeline, cells)
    print(f"| variable | Spearman (cells) | exact best cell (effect) | in estimate's top 5 | most wrong cell "
          f"(estimate / exact) |\n|---|---|---|---|---|")
    timing = {"estimate": 0.0, "exact": 0.0}
    for variable in tqdm(variables, desc="variables", leave=False):
        estimates, exact = [], []
        for dataset in datasets.values():
            examples = dataset.to_list()
            bases = [e["input"] for e in examples]
            sources = [e["counterfactual_inputs"][0] for e in examples]
            base_labels = model.label_data(dataset)
            cf_labels = model.label_counterfactual_data(dataset, [variable])
            start = time.perf_counter()
            result = attribution.estimate(bases, sources, base_labels, cf_labels)
            timing["estimate"] += time.perf_counter() - start
            start = time.perf_counter()
            exact.append(attribution.exact(bases, sources, base_labels, cf_labels, result))
            timing["exact"] += time.perf_counter() - start
            estimates.append(result.estimates)
        est, ex = np.concatenate(estimates, 1).mean(1), np.concatenate(exact, 1).mean(1)
        rho = stats.spearmanr(est, ex).statistic
        best = int(np.argmax(ex))
        worst = int(np.argmax(np.abs(est - ex)))
        ids = [c.cell_id for c in cells]
        print(f"| {variable} | {rho:.2f} | `{ids[best]}` ({ex[best]:.2f}) | {'yes' if best in np.argsort(-est)[:5] else 'no'} "
              f"| `{ids[worst]}` ({est[worst]:.2f} / {ex[worst]:.2f}) |")
    print(f"\nestimate (all {len(cells)} cells): {timing['estimate']:.1f} s; exact: {timing['exact']:.1f} s "
          f"({len(variables)} variables x {sum(len(d) for d in datasets.values())} pairs)")


if __name__ == "__main__":
    main()
