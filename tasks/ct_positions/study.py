"""Deprecated entry point: the CT-position study runs through the study runner.

    python -m experiments.study --task ct_positions [--n-ops 3] [--test] [--model DIR [--codi-base NAME]]

This command (``python -m tasks.ct_positions.study``) keeps its old options for one release: it translates them
into the runner's and warns. Old -> new: ``--organism-dir D`` / ``--codi-checkpoint D`` -> ``--model D`` (with
``--codi-base``), ``--patching-size N`` -> ``--size N``, ``--no-patching`` -> no ``ct_patching`` step; the patching
runs for ``--n-ops`` (one study folder per number of operations; this command runs 2, 3 and 4 as before, each in
``<out>/<n>ops``). Its functions moved to ``tasks.ct_positions.analyses``. See MIGRATION_GUIDE.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from experiments.steps.common import device_name


def runner_arguments(argv: Sequence[str] | None = None) -> list[list[str]]:
    """The runner's argument lists for the old command line ``argv``."""
    p = argparse.ArgumentParser(prog="python -m tasks.ct_positions.study (deprecated)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--organism-dir", type=Path)
    p.add_argument("--codi-checkpoint", type=Path)
    p.add_argument("--codi-base")
    p.add_argument("--codi-masked", action="store_true")
    p.add_argument("--gsm8k", type=Path)
    p.add_argument("--limit", type=int)
    p.add_argument("--n-problems", type=int, default=600)
    p.add_argument("--style", default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--layers", type=int, nargs="*")
    p.add_argument("--heads", type=int, nargs="*")
    p.add_argument("--no-patching", action="store_true")
    p.add_argument("--patching-size", type=int, default=64)
    p.add_argument("--device", default="cpu", type=device_name)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    common = ["--n-problems", str(a.n_problems), "--batch-size", str(a.batch_size), "--device", a.device,
              "--seed", str(a.seed), "--size", str(a.patching_size),
              "--style", a.style or ("words" if a.codi_checkpoint else "compact")]
    model = a.codi_checkpoint or a.organism_dir
    common += ["--model", str(model)] if model else []
    common += ["--codi-base", a.codi_base] if a.codi_base else []
    common += ["--codi-masked"] if a.codi_masked else []
    common += ["--gsm8k", str(a.gsm8k)] if a.gsm8k else []
    common += ["--limit", str(a.limit)] if a.limit else []
    common += ["--layers", *map(str, a.layers)] if a.layers else []
    common += ["--heads", *map(str, a.heads)] if a.heads else []
    out = a.out or Path("results/ct_positions") / ("organism" if model is None else Path(model).name)
    if a.no_patching or a.gsm8k is not None:  # the CT graphs are scored on generated problems only
        return [["--out", str(out), *common, "--steps", "filter", "blocking", "report"]]
    runs = [["--out", str(out / f"{n}ops"), "--n-ops", str(n), *common] for n in (2, 3, 4)]
    for run in runs[1:]:  # the blocking study does not depend on --n-ops: run it once
        run += ["--steps", "filter", "ct_patching", "score", "report"]
    return runs


def main(argv: Sequence[str] | None = None) -> list[Any]:
    """Run the study through the runner; returns the study folders."""
    from experiments import study

    message = ("python -m tasks.ct_positions.study is deprecated and will be removed in the next release: use "
               "python -m experiments.study --task ct_positions (see MIGRATION_GUIDE.md)")
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    print(f"note: {message}", file=sys.stderr)
    return [study.main(args, task="ct_positions") for args in runner_arguments(argv)]


def __getattr__(name: str) -> Any:
    """The old module's functions, from ``tasks.ct_positions.analyses``, with a DeprecationWarning."""
    from tasks.ct_positions import analyses

    if name.startswith("__") or not hasattr(analyses, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"tasks.ct_positions.study.{name} moved to tasks.ct_positions.analyses.{name} (this alias will be "
                  f"removed in the next release)", DeprecationWarning, stacklevel=2)
    return getattr(analyses, name)


if __name__ == "__main__":
    from experiments.steps.common import run_step

    sys.exit(run_step(main))
