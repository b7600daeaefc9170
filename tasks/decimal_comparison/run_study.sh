#!/usr/bin/env bash
# The decimal comparison study end to end (default: the shipped organism on CPU, a few minutes).
# Arguments go to the study, e.g. --model meta-llama/Llama-3.1-8B-Instruct --device cuda --dtype bfloat16,
# --quick (one pair per format), --out DIR. Figures land in <out>/figures, numbers in <out>/summary.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python
cd "$root"
exec "$python" -m tasks.decimal_comparison.study "$@"
