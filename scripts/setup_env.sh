#!/usr/bin/env bash
# Create or refresh ./.venv with the project installed (editable) and its dev tools.
# torch is installed first from TORCH_SPEC (default torch==2.13.0): a CPU wheel on CPU-only
# machines that carry it, the regular CUDA build from the registry elsewhere.
# Set TORCH_SPEC to pick another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
stamp="$venv/.installed-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1) $torch_spec"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing into $venv (first run takes a minute or two)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet $torch_spec
fi
"$venv/bin/python" -m pip install --quiet -e "$root[dev]"
echo "$want" > "$stamp"
