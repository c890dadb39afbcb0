#!/usr/bin/env bash
# Creates .venv when missing, installs the pinned requirements, runs the test suite.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh tests/test_model.py -k cascade   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
