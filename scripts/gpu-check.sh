#!/usr/bin/env bash
# Check and measure dml on a GPU in one command (under 8 minutes on one H100/H200): the environment,
# the tests marked `device`, a 2-epoch real-data run of 2 x ResNet-32 and `dml bench` against the
# seed-style loop; one JSON summary (--out, default gpu-check.json). Without CUDA it says so in one line.
#   scripts/gpu-check.sh --data-dir /data            # on a GPU machine
#   scripts/gpu-check.sh --device cpu --quick        # this script's own logic, on the CPU
# Python: ./.venv where there is one, else python3 (PYTHON overrides); dml from src/ where it is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
if ! "$python" -c "import dml" 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
exec "$python" scripts/gpu_check.py "$@"
