#!/usr/bin/env bash
# Run the test suite in ./.venv, set up from the lock if needed (extra arguments go to pytest).
#   ./run_tests.sh            the whole suite on the locked environment
#   ./run_tests.sh --newest   canary: a throwaway environment with the newest releases pyproject.toml allows
#                             (torch kept at the lock's build), running the exactness tests (marker `exactness`)
#   ./run_tests.sh --lowest   the same on the lowest allowed releases (requirements/lowest.txt)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
case "${1:-}" in
  --newest|--lowest)
    mode="$1"; shift
    venv="${CANARY_VENV:-${TMPDIR:-/tmp}/causal-abstraction-${mode#--}-venv}"
    rm -rf "$venv"
    VENV="$venv" "$root/scripts/setup_env.sh" "$mode"
    exec "$venv/bin/python" -m pytest -m exactness -p no:cacheprovider "$@"
    ;;
esac
"$root/scripts/setup_env.sh"
exec "$root/.venv/bin/python" -m pytest "$@"
