#!/usr/bin/env bash
# Creates .venv with the engine, its CLI and the test tools; safe to run again.
# TORCH_SPEC chooses the torch build (default torch==2.13.0; on a GPU machine install the
# CUDA build you want first, or set TORCH_SPEC).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
