"""scripts/setup-venv.sh, run in a copy of the project whose .venv/bin/python is a stand-in that records
pip's arguments instead of installing anything (nothing is downloaded); scripts/gpu-check.sh on the CPU."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Answers `-m pip ...` by recording its arguments (and marking the packages installed), and `-c ...`
# (the script's "can torch and dml be found" check) from that mark.
FAKE_PYTHON = """#!/usr/bin/env bash
venv="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
    shift 2
    echo "$*" >> "$venv/pip-calls"
    touch "$venv/installed"
    exit 0
fi
if [ "$1" = "-c" ]; then
    [ -f "$venv/installed" ]
    exit
fi
exit 1
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup-venv.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def setup(project: Path, *extras: str, **env: str) -> list[str]:
    """Run the script; the pip commands it ran this time."""
    calls = project / ".venv" / "pip-calls"
    before = calls.read_text().splitlines() if calls.exists() else []
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DML_TORCH_")}
    # a machine with an NVIDIA driver unless a test says otherwise (then PyPI's default torch is the right one)
    environment["DML_NVIDIA_DRIVER_FILE"] = str(ROOT / "pyproject.toml")
    # PYTHON=false: a venv is never created here (the stand-in is there)
    subprocess.run(["bash", str(project / "scripts" / "setup-venv.sh"), *extras], check=True, capture_output=True,
                   env={**environment, "PYTHON": "false", **env})
    after = calls.read_text().splitlines() if calls.exists() else []
    return after[len(before):]


def test_a_second_run_with_nothing_changed_skips_pip(project):
    assert setup(project, "test") == ["install -q torch>=2.4", "install -q -e .[test]"]
    assert setup(project, "test") == []
    assert setup(project) == ["install -q torch>=2.4", "install -q -e ."]  # other extras: installed once
    assert setup(project) == []
    assert setup(project, "test") == []


def test_pip_runs_again_when_pyproject_changes_or_the_package_is_gone(project):
    setup(project, "test")
    with open(project / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency\n")
    assert setup(project, "test") == ["install -q torch>=2.4", "install -q -e .[test]"]
    assert setup(project, "test") == []
    (project / ".venv" / "installed").unlink()  # e.g. pip uninstall deep-mutual-learning
    assert setup(project, "test") == ["install -q torch>=2.4", "install -q -e .[test]"]


def test_torch_spec_and_index_reach_the_torch_install_only(project):
    # CI's setting, on a fresh venv
    assert setup(project, "test", DML_TORCH_SPEC="torch==2.13.0") == [
        "install -q torch==2.13.0", "install -q -e .[test]"]
    assert setup(project, "test", DML_TORCH_SPEC="torch==2.13.0") == []
    # A local address that is never contacted: the stand-in pip only records it.
    index = "http://127.0.0.1:9/whl/cpu"
    assert setup(project, "test", DML_TORCH_SPEC="torch==2.13.0", DML_TORCH_INDEX_URL=index) == [
        f"install -q --index-url {index} torch==2.13.0", "install -q -e .[test]"]
    assert setup(project, "test", DML_TORCH_SPEC="torch==2.13.0", DML_TORCH_INDEX_URL=index) == []


def test_without_an_nvidia_driver_torch_comes_from_the_cpu_index_unless_an_index_is_set(project, tmp_path):
    no_driver = {"DML_NVIDIA_DRIVER_FILE": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin"}  # no nvidia-smi
    assert setup(project, "test", **no_driver) == [
        "install -q --index-url https://download.pytorch.org/whl/cpu torch>=2.4", "install -q -e .[test]"]
    # set, even empty (pip's own configuration, as CI): the user's choice
    assert setup(project, "test", DML_TORCH_INDEX_URL="", **no_driver) == ["install -q torch>=2.4",
                                                                            "install -q -e .[test]"]


# --- scripts/gpu-check.sh ------------------------------------------------------------------------------

def _gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **env}, timeout=600)


def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check runs instead of declining")
    done = _gpu_check("--out", str(tmp_path / "summary.json"))
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("gpu-check: no CUDA device here (torch ") and done.stdout.count("\n") == 1
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.processes  # the check starts pytest, dml train and dml bench
def test_gpu_check_runs_every_step_on_the_cpu_and_writes_its_summary(tmp_path):
    data = os.environ.get("DML_DATA_DIR", "")
    out = tmp_path / "summary.json"
    done = _gpu_check("--device", "cpu", "--quick", "--out", str(out), DML_DATA_DIR=data)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    steps = summary["steps"]
    assert summary["ok"] and summary["environment"]["device"] == "cpu"
    assert steps["tests"]["counts"] == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0}
    if data:  # the real data: one small epoch, its seconds and accuracies read back from the run
        assert steps["train"]["status"] == "passed"
        [epoch] = steps["train"]["epochs"]
        assert epoch["epoch"] == 1 and epoch["seconds"] > 0 and len(epoch["peers_test_acc"]) == 2
    else:
        assert steps["train"]["status"] == "skipped" and "cifar-100-python" in steps["train"]["reason"]
    assert steps["bench"]["status"] == "passed" and steps["bench"]["results"]
    assert done.stdout.strip().splitlines()[-1].startswith("all steps passed in ")


@pytest.mark.processes
def test_gpu_check_reports_a_failing_step_and_fails(tmp_path):
    """A bench that cannot run (an unknown model is refused by dml bench): the step and the whole check fail."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    result = gpu_check.run_step("bench", [sys.executable, "-m", "dml", "bench", "--models", "resnet33"], tmp_path, 60)
    assert result["status"] == "failed (exit code 2)" and "unknown model 'resnet33'" in result["log_tail"][-1]
    result = gpu_check.run_step("slow", [sys.executable, "-c", "import time; time.sleep(5)"], tmp_path, 0.5)
    assert result["status"] == "failed (over its 0.5 s)"
