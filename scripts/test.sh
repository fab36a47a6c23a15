#!/usr/bin/env bash
# Run the test suite in ./.venv (created and installed on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
exec .venv/bin/python -m pytest "$@"
