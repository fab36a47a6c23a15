#!/usr/bin/env bash
# Train a cohort in ./.venv (created and installed on first use). Arguments go to `dml train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec .venv/bin/dml train "$@"
