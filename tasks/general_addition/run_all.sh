#!/usr/bin/env bash
# All three steps of the addition study. Usage: run_all.sh [--model M] [--digits D] [--test] [--device cuda] ...
# The same arguments go to steps 1 and 2; step 3 scores the study folder they wrote.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
"$python" "$here/01_generate_and_filter_dataset.py" "$@"
"$python" "$here/02_run_interventions.py" "$@"
"$python" "$here/03_compute_scores_and_visualize.py" --results "$("$python" "$here/study.py" "$@")"
