"""``python -m experiments.analyze``: attention, logit-lens, probing, ablation, patching, circuit and gain
analyses of a model on a task, written to one report folder (PNG, JSON, CSV/parquet, index.md, index.html).

Example::

    python -m experiments.analyze --model organism --task general_addition --all \\
        --examples "59+73" "12+34" --out reports/organism

Flags override ``--config analysis.yaml`` (keys: the fields of ``AnalyzeConfig``). ``--compare OTHER``
writes ``compare.html`` with this report and OTHER side by side (with no analysis flag, only that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import yaml
from pydantic import ValidationError

from experiments.analysis.config import ANALYSES, AnalyzeConfig

FLAG_HELP = {
    "attention": "attention profiles per head, all heads of every layer for each example",
    "observational": "EXP0: query norm vs attention entropy across prompts (Pearson/Spearman, BH)",
    "lens": "logit lens: prediction, entropy and first decodable layer per answer token",
    "probing": "linear probes across layers and positions with a shuffled-label control",
    "interventions": "zero/mean ablation of attention, MLPs and heads; cumulative head ablation",
    "patching": "activation patching clean vs corrupted, layer × position recovery",
    "circuits": "heads attending to task roles from the answer position; class-separating neurons",
    "gain": "EXP1-3: Q/K scaling sweeps, per-head gain, query vs key sensitivity",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.analyze", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with AnalyzeConfig fields")
    parser.add_argument("--model", help="hub name, local folder, or 'organism'")
    parser.add_argument("--task")
    parser.add_argument("--out", type=Path, help="report folder")
    parser.add_argument("--examples", nargs="+", help='examples shown one by one, e.g. "59+73" "12+34"')
    parser.add_argument("--n-examples", type=int, dest="n_examples", help="sampled prompts for the statistics")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--batch-size", type=int, dest="batch_size")
    parser.add_argument("--sink-tokens", type=int, dest="sink_tokens")
    parser.add_argument("--factors", type=float, nargs="+", help="scale factors for the gain study")
    parser.add_argument("--gain-target", type=int, nargs=2, dest="gain_target", metavar=("LAYER", "HEAD"))
    parser.add_argument("--probe-variables", nargs="+", dest="probe_variables")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--all", action="store_true", help="every analysis")
    for name in ANALYSES:
        parser.add_argument(f"--{name}", action="store_true", help=FLAG_HELP[name])
    parser.add_argument("--compare", type=Path, help="another report folder to put side by side with this one")
    return parser


def config_from_args(args: argparse.Namespace) -> AnalyzeConfig:
    """The YAML config (if any) with every given flag on top, validated."""
    data = {}
    if args.config is not None:
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: the YAML must be a mapping of AnalyzeConfig fields")
        data.update(loaded)
    for key in ("model", "task", "out", "examples", "n_examples", "seed", "device", "dtype", "batch_size",
                "sink_tokens", "factors", "gain_target", "probe_variables", "threads"):
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.no_progress:
        data["progress"] = False
    flags = [name for name in ANALYSES if getattr(args, name)]
    if args.all:
        data["analyses"] = list(ANALYSES)
    elif flags:
        data["analyses"] = flags
    return AnalyzeConfig(**data)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if cfg.out is None:
        print("error: --out (or out: in the config) is required", file=sys.stderr)
        return 2
    only_compare = args.compare is not None and not cfg.analyses and args.config is None
    if not only_compare:
        from experiments.analysis.runner import run_analysis

        report = run_analysis(cfg)
        print(f"report: {report.root / 'index.html'}")
    if args.compare is not None:
        from experiments.analysis.report import compare_reports

        print(f"comparison: {compare_reports(cfg.out, args.compare, cfg.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
