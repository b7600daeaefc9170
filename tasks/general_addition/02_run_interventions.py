"""Step 2 of the addition study: interchange interventions on the filtered datasets (raw results only).

    python tasks/general_addition/02_run_interventions.py --model organism --digits 2 [--batch-size 64] [--layers -1 0 1] [--backend hooks|pyvene] [--test]

The generic step (``experiments.steps.intervene``) with ``--task general_addition``: a residual-stream
sweep (every layer incl. -1 = embeddings × every addition token position) and a single-head sweep at
the last position. A killed run, rerun with the same arguments, resumes where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.steps import intervene as step
from experiments.steps.common import run_step
from experiments.steps.intervene import record_experiment  # noqa: F401 (part of this script's API)


def main(argv: list[str] | None = None) -> Path:
    return step.main(argv, task="general_addition")


if __name__ == "__main__":
    sys.exit(run_step(main))
