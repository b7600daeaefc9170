"""The addition study's plumbing: the generic step plumbing (``experiments.steps.common``) bound to this task.

A study folder (default ``results/addition/<model>/<D>d``) holds::

    metadata.json            # step 1: model, digits, seed, filter report per dataset; step 2: experiments
    datasets/<family>/       # step 1: filtered counterfactual datasets (HF save_to_disk)
    raw/<experiment>/        # step 2: raw intervention results (manifest + parquet)
    scores/                  # step 3: scores, heatmaps, summary.md
    report.md                # step 4 (the study runner, python -m experiments.study --task general_addition)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from experiments.steps import common
from experiments.steps.common import (  # noqa: F401 (the study's API)
    ORGANISM,
    add_debug_option,
    load_datasets,
    read_metadata,
    run_step,
    user_error_types,
    write_metadata,
)
from tasks.general_addition.task import TASK, AdditionSettings

STEP1_SETTINGS = common.step1_settings(TASK)
"""Settings of step 1 that step 2 must share: the datasets were filtered by this model on these prompts."""


def model_path(model: str) -> str:
    """A hub name or local folder; ``organism`` means the shipped checkpoint."""
    return common.model_path(TASK, model)


def study_parser(description: str | None, step: int | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The options of addition step ``step`` (1 or 2; None: both, as ``run_all.sh`` passes)."""
    return common.study_parser(TASK, description, step, prog)


def default_study_dir(model: str, n_digits: int, test: bool = False) -> Path:
    """``results/addition/<model>/<D>d`` (``<D>d_test`` for ``--test`` runs)."""
    return common.default_study_dir(TASK, model, AdditionSettings(digits=n_digits), test)


def study_dir(args: argparse.Namespace) -> Path:
    return common.study_dir(TASK, args)


def check_same_study(args: argparse.Namespace, metadata: dict[str, Any], keys: tuple[str, ...] = STEP1_SETTINGS) -> None:
    common.check_same_study(args, metadata, keys)


def load_pipeline(args: argparse.Namespace):
    """The LMPipeline for ``args`` (imports torch; step 3 never calls this)."""
    return common.load_pipeline(TASK, args)


RUN_ALL_DESCRIPTION = """All three steps of the addition study: datasets + filtering, interchange sweeps, scores and heatmaps.

    ./run_study.sh [--model M] [--digits D] [--device cuda --dtype bfloat16] [--chat] [--test] ...

Steps 1 and 2 get every argument; step 3 scores the study folder they write (printed by this script)."""

if __name__ == "__main__":  # print the study folder for a set of step arguments (for scripts)
    print(study_dir(study_parser(RUN_ALL_DESCRIPTION, prog="run_study.sh").parse_args(sys.argv[1:])))
