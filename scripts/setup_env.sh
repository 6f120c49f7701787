#!/usr/bin/env bash
# Creates .venv and installs the suite into it, idempotently.
# torch is installed first and only if absent (so a user's CUDA torch is never replaced);
# everything else is installed under a constraint pinning that torch, so pip picks the
# matching torchvision and never pulls a second torch with CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
TORCH_VERSION=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS="$VENV/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
echo "setup: installing the suite against torch $TORCH_VERSION"
"$VPY" -m pip install -q -c "$CONSTRAINTS" -e ".[dev]"
touch "$STAMP"
