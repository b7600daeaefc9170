#!/usr/bin/env bash
# Create or refresh a virtual environment with the project installed (editable) and its dev tools.
#
#   scripts/setup_env.sh            ./.venv from the lock: requirements/lock-cpu.txt, or lock-cuda.txt where
#                                   nvidia-smi sees a GPU (TORCH_FLAVOR=cpu|cuda overrides the choice)
#   scripts/setup_env.sh --newest   $VENV (required) with the newest releases pyproject.toml allows, torch kept
#                                   at the lock's build (the canary of ./run_tests.sh --newest)
#   scripts/setup_env.sh --lowest   $VENV (required) with the lowest allowed releases (requirements/lowest.txt)
#
# The CPU torch build comes from the PyTorch CPU index when no local wheel satisfies it. Prints what it installs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mode="${1:---locked}"
python="${PYTHON:-python3}"
case "$mode" in
  --locked) venv="${VENV:-$root/.venv}" ;;
  --newest|--lowest) venv="${VENV:?set VENV to the throwaway environment folder}" ;;
  *) echo "setup_env.sh: unknown option $mode (use --locked, --newest or --lowest)" >&2; exit 2 ;;
esac
if [ -z "${TORCH_FLAVOR:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TORCH_FLAVOR=cuda; else TORCH_FLAVOR=cpu; fi
fi
case "$TORCH_FLAVOR" in
  cpu|cuda) ;;
  *) echo "setup_env.sh: TORCH_FLAVOR must be cpu or cuda, got $TORCH_FLAVOR" >&2; exit 2 ;;
esac
lock="$root/requirements/lock-$TORCH_FLAVOR.txt"
torch_pin="$(grep -E '^torch==' "$lock")"
stamp="$venv/.installed-stamp"
want="$mode $TORCH_FLAVOR $(cat "$lock" "$root/pyproject.toml" "$root/requirements/lowest.txt" \
  "$root/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "setup_env.sh: the locks are resolved for Python 3.11 and $python is $("$python" -V 2>&1);" \
         "set PYTHON to a python3.11 (or install the ranges of pyproject.toml with pip install -e .)" >&2
    exit 2
  fi
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
if [ "$mode" = "--locked" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
echo "[setup] installing into $venv ($mode, $TORCH_FLAVOR torch: $torch_pin; the first run takes a few minutes)"
if ! "${pip[@]}" install "$torch_pin" 2>/dev/null; then
  echo "[setup] $torch_pin is not on the default index; trying the PyTorch index"
  if [ "$TORCH_FLAVOR" = cpu ]; then
    "${pip[@]}" install "$torch_pin" --index-url https://download.pytorch.org/whl/cpu
  else
    "${pip[@]}" install "$torch_pin"  # show pip's error
  fi
fi
case "$mode" in
  --locked)
    "${pip[@]}" install -r "$lock"
    "${pip[@]}" install --no-deps -e "$root"
    ;;
  --newest)
    "${pip[@]}" install --upgrade --upgrade-strategy eager -c <(echo "$torch_pin") -e "$root[dev]"
    ;;
  --lowest)
    "${pip[@]}" install -c <(grep -v '^torch==' "$root/requirements/lowest.txt"; echo "$torch_pin") -e "$root[dev]"
    ;;
esac
if [ "$TORCH_FLAVOR" = cuda ] && ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
  # torch==X also matches a local X+cpu wheel (PEP 440): replace it with the registry's CUDA build
  echo "[setup] the installed torch is a CPU build; installing the CUDA build of $torch_pin"
  PIP_FIND_LINKS="" "${pip[@]}" install --force-reinstall --no-deps "$torch_pin"
  if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    echo "setup_env.sh: could not install a CUDA build of $torch_pin (pip found only a CPU build)" >&2
    exit 1
  fi
fi
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
print("[setup] " + ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "pyvene", "datasets")))
EOF
echo "$want" > "$stamp"
