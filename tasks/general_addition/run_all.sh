#!/usr/bin/env bash
# The addition study end to end through the study runner (python -m experiments.study --task general_addition):
# datasets + filtering, interchange sweeps, scores and heatmaps, report.md, in one process.
# Usage: run_all.sh [--model M] [--digits D] [--test] [--device cuda] [--steps filter intervene ...] ...
# --help lists the options; --debug shows tracebacks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-python}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m experiments.study --task general_addition "$@"
