#!/usr/bin/env bash
# Set up ./.venv if needed, then run the addition study end to end on the shipped organism:
# datasets + filtering, residual-stream and attention-head interchange sweeps, scores against
# two causal models, heatmaps, a summary and report.md under results/addition/organism/<D>d/, through the
# study runner (python -m experiments.study --task general_addition; every task runs the same way).
# Extra arguments go to the runner (e.g. --digits 3, --device cuda, --model <hub name>, --steps score report).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
exec "$root/.venv/bin/python" -m experiments.study --task general_addition "$@"
