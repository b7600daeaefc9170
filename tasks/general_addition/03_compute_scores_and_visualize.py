"""Step 3: score raw results against causal models (no network needed), draw heatmaps, write a summary.

    python tasks/general_addition/03_compute_scores_and_visualize.py --results results/addition/organism/2d [--target-vars carry_0 raw_output] [--include-pairs]

Each raw-results folder under <study>/raw/ is scored against the carry graph and against the
competing hypothesis (tens digit without carry). Writes <study>/scores/: one JSON of scores per
(experiment, causal model), layer × position and layer × head heatmaps (PNG), and summary.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pandas as pd  # noqa: E402

from causal.interchange_scores import InterchangeScores, compute_interchange_scores  # noqa: E402
from causal.raw_results import RawResults, atomic_write_bytes  # noqa: E402
from experiments.visualizations import save_heatmaps  # noqa: E402
from tasks.general_addition.causal_models import (  # noqa: E402
    build_addition_model,
    build_tens_without_carry_model,
    carry_var,
    digit_vars,
    output_digit_var,
)
from tasks.general_addition.checker import addition_checker  # noqa: E402
from tasks.general_addition.study import add_debug_option, load_datasets, read_metadata, run_step  # noqa: E402


def default_targets(n_digits: int) -> list[str]:
    return [*digit_vars(n_digits), *(carry_var(p) for p in range(n_digits)),
            *(output_digit_var(p) for p in range(n_digits + 1)), "raw_output"]


def best_rows(averaged: pd.DataFrame, top_k: int = 1) -> pd.DataFrame:
    ranked = averaged.sort_values(["target_variables", "accuracy", "layer"], ascending=[True, False, True])
    return ranked.groupby("target_variables", sort=False).head(top_k)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="study folder written by steps 1 and 2")
    parser.add_argument("--target-vars", nargs="*", default=None, help="variables to score, one group each (default: all)")
    parser.add_argument("--include-pairs", action="store_true", help="also score every pair of the target variables jointly")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    folder = args.results
    metadata = read_metadata(folder)
    n_digits = int(metadata["digits"])
    datasets = load_datasets(folder)
    targets = [[v] for v in (args.target_vars or default_targets(n_digits))]
    hypotheses = {"carry": build_addition_model(n_digits), "tens_no_carry": build_tens_without_carry_model(n_digits)}
    raw_folders = sorted((p for p in (folder / "raw").iterdir() if (p / "manifest.json").exists()),
                         key=lambda p: (p.name != "residual_stream", p.name)) if (folder / "raw").exists() else []
    if not raw_folders:
        raise SystemExit(f"no raw results under {folder / 'raw'}: run 02_run_interventions.py first")
    out = folder / "scores"
    lines = [f"# Addition study: {metadata['model']}, {n_digits}-digit addends", ""]
    lines += ["## Filtering (step 1)", "", "| dataset | model accuracy on inputs | pairs kept |", "|---|---|---|"]
    lines += [f"| {r['dataset_id']} | {r['input_accuracy']:.1%} | {r['kept_pairs']}/{r['total_pairs']} |" for r in metadata["filter"]]
    for raw_folder in raw_folders:
        raw = RawResults(raw_folder)
        experiment = raw.manifest.experiment_id
        kind = "heads" if raw.manifest.experiment_type == "patch_attention_heads" else "positions"
        position_order = list(dict.fromkeys(u.position_id for c in raw.manifest.cells for u in c.units))
        for name, causal_model in hypotheses.items():
            scores: InterchangeScores = compute_interchange_scores(
                raw, causal_model, datasets, targets, addition_checker, include_pairs=args.include_pairs)
            scores.save(out / f"{experiment}__{name}.json")
            averaged = scores.averaged()
            if name == "carry":
                save_heatmaps(averaged, out / "heatmaps" / experiment, kind=kind, position_order=position_order)
            lines += ["", f"## {experiment}: hypothesis `{causal_model.id}`", ""]
            lines += ["Best cell per variable (accuracy averaged over all datasets, 95% Wilson CI):", "",
                      "| variable | best cell | accuracy | 95% CI | n |", "|---|---|---|---|---|"]
            for _, row in best_rows(averaged).iterrows():
                lines.append(f"| {row['target_variables']} | {row['cell_id']} | {row['accuracy']:.3f} | "
                             f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] | {row['n']} |")
            if name == "carry" and kind == "positions":
                lines += ["", "Accuracy of each digit variable at its own token position, by layer:", ""]
                layers = sorted(averaged["layer"].unique())
                lines += ["| variable | " + " | ".join(f"L{l}" for l in layers) + " |", "|---" * (len(layers) + 1) + "|"]
                for var in digit_vars(n_digits):
                    own = averaged[(averaged["target_variables"] == var) & (averaged["position_id"] == var)]
                    if own.empty:
                        continue
                    acc = dict(zip(own["layer"], own["accuracy"]))
                    lines.append(f"| {var} | " + " | ".join(f"{acc.get(l, float('nan')):.2f}" for l in layers) + " |")
    atomic_write_bytes(out / "summary.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    print(f"\nscores, heatmaps and summary written to {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_step(main))
