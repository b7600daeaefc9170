"""Deprecated entry point: the decimal study runs through the study runner.

    python -m experiments.study --task decimal_comparison [--format qa] [--test] [--model M --device cuda]

This command (``python -m tasks.decimal_comparison.study``) keeps its old options for one release: it translates
them into the runner's (one study per buggy format, ``--n-patch`` -> ``--size``, ``--formats`` ->
``--bug-formats``, its old ``--steps`` names -> the runner's) and warns. Its functions moved to
``tasks.decimal_comparison.analyses``; importing them from here warns too. See MIGRATION_GUIDE.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

OLD_STEPS = {"bug_rate": ["bug_rate"], "patching": ["intervene", "patching"], "generalisation": ["generalisation"],
             "attention": ["attention"], "transplant": ["transplant"], "ablation": ["ablation"],
             "causal_models": ["score"], "figures": ["report"]}
"""The old study's steps -> the runner's (step 1, the datasets, always runs)."""


def runner_arguments(argv: list[str] | None = None) -> list[list[str]]:
    """The runner's argument lists (one per buggy format) for the old command line ``argv``."""
    p = argparse.ArgumentParser(prog="python -m tasks.decimal_comparison.study (deprecated)")
    for name in ("--model", "--out", "--device", "--dtype", "--split", "--neurons", "--subset-layer",
                 "--neuron-layer", "--n-bug", "--n-general", "--n-attention", "--subset-draws", "--batch-size",
                 "--max-rows", "--seed", "--max-new-tokens"):
        p.add_argument(name, default=None)
    for name in ("--formats", "--buggy-formats", "--layers", "--roles", "--transplant-layers", "--subset-pools",
                 "--subset-modes", "--ablation-layers", "--steps"):
        p.add_argument(name, nargs="*", default=None)
    p.add_argument("--format", action="append", default=[], metavar="NAME=TEMPLATE")
    p.add_argument("--n-patch", default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    common: list[str] = []
    for option in a.format:  # a user format: registered, and a choice of --format / --bug-formats
        from tasks.decimal_comparison.formats import parse_format_option
        from tasks.decimal_comparison.task import TASK

        added = parse_format_option(option)
        TASK.prompt_formats[added.name] = added.template
    for name in ("model", "device", "dtype", "split", "neurons", "subset_layer", "neuron_layer", "n_bug", "n_general",
                 "n_attention", "subset_draws", "batch_size", "max_rows", "seed"):
        if getattr(a, name) is not None:
            common += ["--" + name.replace("_", "-"), str(getattr(a, name))]
    for name in ("layers", "transplant_layers", "subset_pools", "subset_modes", "ablation_layers"):
        if getattr(a, name):
            common += ["--" + name.replace("_", "-"), *getattr(a, name)]
    if a.roles:
        common += ["--roles", " ".join(a.roles)]
    if a.n_patch is not None:
        common += ["--size", str(a.n_patch)]
    if a.chat:
        common.append("--chat")
    formats = a.formats if a.formats is not None else ["simple", "qa", "chat", *(o.split("=", 1)[0].strip() for o in a.format)]
    common += ["--bug-formats", *formats]
    if a.max_new_tokens is not None:
        print("note: --max-new-tokens is no longer an option (the task's answer length is used)", file=sys.stderr)
    if a.quick:
        steps = ["filter", "bug_rate"]
        common += ["--n-bug", "1"] if a.n_bug is None else []
    elif a.steps is not None:
        unknown = [s for s in a.steps if s not in OLD_STEPS]
        if unknown:
            raise ValueError(f"unknown steps {unknown}; known: {', '.join(OLD_STEPS)}")
        steps = ["filter", *(new for old in a.steps for new in OLD_STEPS[old])]
    else:
        steps = None
    if steps is not None:
        common += ["--steps", *dict.fromkeys(steps)]
    buggy = a.buggy_formats or ["qa"]
    runs = []
    for fmt in buggy:
        out = ["--out", f"{a.out}/{fmt}" if len(buggy) > 1 else a.out] if a.out else []
        runs.append(["--format", fmt, *out, *common])
    return runs


def main(argv: list[str] | None = None) -> list[Any]:
    """Run the study (one per buggy format) through the runner; returns the study folders."""
    from experiments import study

    message = ("python -m tasks.decimal_comparison.study is deprecated and will be removed in the next release: use "
               "python -m experiments.study --task decimal_comparison (see MIGRATION_GUIDE.md)")
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    print(f"note: {message}", file=sys.stderr)
    return [study.main(args, task="decimal_comparison") for args in runner_arguments(argv)]


class StudyConfig:
    """Deprecated: the old study's settings record, kept for the engine options of `run_cells`."""

    def __init__(self, batch_size: int = 64, max_rows: int = 2048, **_: Any):
        warnings.warn("StudyConfig is deprecated: the study's options are the runner's (python -m experiments.study "
                      "--task decimal_comparison --help); pass batch_size= and max_rows= to run_cells",
                      DeprecationWarning, stacklevel=2)
        self.batch_size, self.max_rows = batch_size, max_rows


def run_cells(pipeline: Any, cells: Any, datasets: Any, folder: Any, exp_id: str, cfg: StudyConfig | None = None
              ) -> list[dict]:
    """Deprecated: `tasks.decimal_comparison.analyses.run_cells` (``batch_size=``, ``max_rows=``)."""
    from tasks.decimal_comparison import analyses

    warnings.warn("tasks.decimal_comparison.study.run_cells moved to tasks.decimal_comparison.analyses.run_cells "
                  "(batch_size=, max_rows= instead of a StudyConfig)", DeprecationWarning, stacklevel=2)
    engine = {"batch_size": cfg.batch_size, "max_rows": cfg.max_rows} if cfg is not None else {}
    return analyses.run_cells(pipeline, cells, datasets, folder, exp_id, **engine)


def __getattr__(name: str) -> Any:
    """The old module's functions, from ``tasks.decimal_comparison.analyses``, with a DeprecationWarning."""
    from tasks.decimal_comparison import analyses

    if name.startswith("__") or not hasattr(analyses, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"tasks.decimal_comparison.study.{name} moved to tasks.decimal_comparison.analyses.{name} (this "
                  f"alias will be removed in the next release)", DeprecationWarning, stacklevel=2)
    return getattr(analyses, name)


if __name__ == "__main__":
    from experiments.steps.common import run_step

    sys.exit(run_step(main))
