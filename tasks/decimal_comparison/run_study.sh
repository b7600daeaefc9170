#!/usr/bin/env bash
# The decimal comparison study end to end through the study runner (default: the shipped organism on CPU):
# python -m experiments.study --task decimal_comparison "$@", e.g. --model meta-llama/Llama-3.1-8B-Instruct
# --device cuda --dtype bfloat16, --format chat (the buggy format studied), --steps filter bug_rate, --out DIR.
# Numbers and tables land in <study>/report.md, figures in <study>/analyses/figures.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python
cd "$root"
exec "$python" -m experiments.study --task decimal_comparison "$@"
