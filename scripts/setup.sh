#!/usr/bin/env bash
# Creates .venv with the engine and its CLI, plus the extras named as the argument (default:
# test, the test tools; the main job asks for plots only); safe to run again.
# TORCH_SPEC chooses the torch build: pip arguments, default torch==2.13.0 from your pip index (on
# Linux x86-64 PyPI's is the CUDA build, several GB); for the CPU build set
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086  # TORCH_SPEC holds several pip arguments
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q -e ".[${1:-test}]"
