#!/usr/bin/env bash
# Train a cohort with ./.venv (created and installed on first use). Arguments go to `dml train`;
# relative paths in them are taken from the directory you run this from.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bash "$repo/scripts/setup-venv.sh"
exec "$repo/.venv/bin/dml" train "$@"
