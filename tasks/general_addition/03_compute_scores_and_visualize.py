"""Step 3 of the addition study: score raw results against the carry graph and the competing
tens-without-carry graph (no network, no torch), draw heatmaps, write summary.md.

    python tasks/general_addition/03_compute_scores_and_visualize.py --results results/addition/organism/2d [--target-vars carry_0 raw_output] [--include-pairs]

The generic step (``experiments.steps.score``) with ``--task general_addition``: see its docstring for
what is scored and how the scores folder is replaced.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.steps.common import run_step
from experiments.steps.score import StudyRecordError, listed_experiments, scores_folder_name  # noqa: F401
from experiments.steps import score as step
from tasks.general_addition.task import AdditionSettings
from tasks.general_addition.task import default_targets as _task_default_targets
from tasks.general_addition.task import own_position  # noqa: F401


def default_targets(n_digits: int, position_ids: list[str] | None = None) -> list[list[str]]:
    """The default target groups for ``n_digits``-digit addends (joint per addend for multi-digit tokens)."""
    return _task_default_targets(AdditionSettings(digits=n_digits), position_ids)


def main(argv: list[str] | None = None) -> Path:
    return step.main(argv, task="general_addition")


if __name__ == "__main__":
    sys.exit(run_step(main))
