"""scripts/setup-venv.sh, run in a copy of the project whose .venv/bin/python is a stand-in that records
pip's arguments instead of installing anything (nothing is downloaded)."""

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
