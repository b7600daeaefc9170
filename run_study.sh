#!/usr/bin/env bash
# Set up ./.venv if needed, then run the addition study end to end on the shipped organism:
# datasets + filtering, residual-stream and attention-head interchange sweeps, scores against
# two causal models, heatmaps and a summary under results/addition/organism/<D>d/.
# Extra arguments go to the step scripts (e.g. --digits 3, --device cuda, --model <hub name>).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/setup_env.sh"
cd "$root"
PYTHON="$root/.venv/bin/python" exec "$root/tasks/general_addition/run_all.sh" "$@"
