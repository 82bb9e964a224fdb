#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. 'bash scripts/test.sh -m "not slow"'.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest Testing -q -ra "$@"
