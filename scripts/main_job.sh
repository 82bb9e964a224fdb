#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job (scripts/main_job.py): detect
# landmarks with the bundled default model, or train-and-detect while none is bundled.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh plots  # the engine and its plots; the test tools are test.sh's
exec .venv/bin/python scripts/main_job.py "$@"
