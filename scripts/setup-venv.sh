#!/usr/bin/env bash
# Create (or refresh) ./.venv and install the package into it with the given extras.
# Usage: scripts/setup-venv.sh [EXTRAS]   e.g. "test"
# DML_TORCH_SPEC picks the torch build to install when the venv has none (default: torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "${DML_TORCH_SPEC:-torch>=2.4}"
fi
extras=${1:-}
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
