"""Step 1: sample counterfactual datasets for D-digit addition and keep the pairs the model gets right.

    python tasks/general_addition/01_generate_and_filter_dataset.py --model organism --digits 2 [--size 128] [--test]

Writes <study>/datasets/<family>/ and <study>/metadata.json (filter accuracy per dataset).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tasks.general_addition.causal_models import build_addition_model  # noqa: E402
from tasks.general_addition.checker import addition_checker  # noqa: E402
from tasks.general_addition.counterfactuals import ADDITION_FAMILIES, make_addition_datasets  # noqa: E402
from tasks.general_addition.study import (  # noqa: E402
    STEP1_SETTINGS,
    check_same_study,
    load_pipeline,
    read_metadata,
    run_step,
    study_dir,
    study_parser,
    write_metadata,
)  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    args = study_parser(__doc__, step=1).parse_args(argv)
    from experiments.filter_experiment import FilterExperiment  # torch: after parsing, so --help is instant

    size = min(args.size, 24) if args.test else args.size
    out = study_dir(args)
    experiments = []
    if (out / "metadata.json").exists() and (out / "raw").exists():
        # new datasets would orphan the raw results already computed on the old ones
        previous = read_metadata(out)
        check_same_study(args, previous, (*STEP1_SETTINGS, "seed", "size", "families", "test"))
        experiments = previous.get("experiments", [])  # same datasets: step 2's records stay valid
    pipeline = load_pipeline(args)
    causal_model = build_addition_model(args.digits)
    families = args.families or ADDITION_FAMILIES(args.digits)
    datasets = make_addition_datasets(args.digits, size, args.seed, families, template=args.template, model=causal_model)
    kept, reports = FilterExperiment(pipeline, causal_model, addition_checker).filter(datasets)
    saved = []
    for report in reports:
        print(f"{report.dataset_id:18s} model accuracy on inputs {report.input_accuracy:6.1%}   "
              f"kept {report.kept_pairs}/{report.total_pairs} pairs")
        if report.kept_pairs == 0:
            print(f"  dropping {report.dataset_id}: no pair survives filtering")
            continue
        kept[report.dataset_id].save(out / "datasets" / report.dataset_id)
        saved.append(report.dataset_id)
    if not saved:
        raise SystemExit("the model is wrong on every pair: nothing to study (check --model, --digits, --template)")
    write_metadata(out, {
        "model": args.model, "digits": args.digits, "seed": args.seed, "size": args.size, "template": args.template,
        "families": args.families, "pairs_per_family": size,
        "chat": args.chat, "test": args.test, "datasets": saved,
        "filter": [r.model_dump() for r in reports],
        **({"experiments": experiments} if experiments else {}),
    })
    print(f"datasets and metadata written to {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_step(main))
