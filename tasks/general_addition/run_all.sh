#!/usr/bin/env bash
# All three steps of the addition study. Usage: run_all.sh [--model M] [--digits D] [--test] [--device cuda] ...
# The same arguments go to steps 1 and 2 (each accepts and ignores the other's options); step 3
# scores the study folder they wrote. --help lists the options; --debug shows tracebacks.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
debug=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) exec "$python" "$here/study.py" --help ;;
    --debug) debug=(--debug) ;;
  esac
done
study="$("$python" "$here/study.py" "$@")"  # the study folder; a bad argument stops here, before any work
"$python" "$here/01_generate_and_filter_dataset.py" "$@"
"$python" "$here/02_run_interventions.py" "$@"
"$python" "$here/03_compute_scores_and_visualize.py" --results "$study" ${debug[@]+"${debug[@]}"}
