#!/usr/bin/env bash
# Create (or refresh) ./.venv and install the package into it with the given extras.
# Usage: scripts/setup-venv.sh [EXTRAS]   e.g. "test"
# DML_TORCH_SPEC: the torch requirement (default: torch>=2.4); an installed torch that meets it is kept.
# DML_TORCH_INDEX_URL: where torch comes from, e.g. https://download.pytorch.org/whl/cpu for the CPU build
#   (pip's --index-url for the torch install only; everything else comes from the usual index). Unset on a
#   machine without an NVIDIA driver, it is that CPU index (PyPI's torch for Linux is the CUDA build, GBs
#   a CPU cannot use); set it, even to "" (pip's own configuration), to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=${1:-}
torch_spec=${DML_TORCH_SPEC:-torch>=2.4}
nvidia_driver=${DML_NVIDIA_DRIVER_FILE:-/proc/driver/nvidia/version}  # present where a driver is loaded
if [ -z "${DML_TORCH_INDEX_URL+set}" ] && [ ! -e "$nvidia_driver" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    torch_index=https://download.pytorch.org/whl/cpu
    cpu_build="no NVIDIA driver here: torch's CPU build, from $torch_index (set DML_TORCH_INDEX_URL to choose)"
else
    torch_index=${DML_TORCH_INDEX_URL:-}
    cpu_build=""
fi
# pip takes about 5 s even when nothing changed: a stamp records what was installed (one per set of extras)
# and pip runs again only when pyproject.toml, this script, the extras or the torch settings change, or
# the package or torch cannot be found.
stamp=".venv/.dml-installed-${extras:-base}"
wanted=$(printf '%s\n' "extras=$extras" "torch=$torch_spec" "index=$torch_index" \
    | cat - pyproject.toml scripts/setup-venv.sh | cksum)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ] && .venv/bin/python -c \
    "import importlib.util as u, sys; sys.exit(not (u.find_spec('dml') and u.find_spec('torch')))" 2>/dev/null; then
    exit 0  # find_spec, not import: importing torch alone takes seconds
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
rm -f "$stamp"  # an interrupted install leaves no stamp
echo "installing into .venv (first use, or pyproject.toml, the extras or DML_TORCH_* changed)" >&2
[ -z "$cpu_build" ] || echo "$cpu_build" >&2
.venv/bin/python -m pip install -q ${torch_index:+--index-url "$torch_index"} "$torch_spec"
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
echo "$wanted" > "$stamp"
