"""Step 1 of the addition study: sample counterfactual datasets and keep the pairs the model gets right.

    python tasks/general_addition/01_generate_and_filter_dataset.py --model organism --digits 2 [--size 128] [--test]

The generic step (``experiments.steps.filter``) with ``--task general_addition``; writes
<study>/datasets/<family>/ and <study>/metadata.json (filter accuracy per dataset).
"""

from __future__ import annotations

import sys
from pathlib import Path

from experiments.steps import filter as step
from experiments.steps.common import run_step


def main(argv: list[str] | None = None) -> Path:
    return step.main(argv, task="general_addition")


if __name__ == "__main__":
    sys.exit(run_step(main))
