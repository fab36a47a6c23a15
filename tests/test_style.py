"""Lint of the package and its tests, format of the package, settings in pyproject.toml: a violation fails CI."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check", "src"], ["format", "--check", "src"], ["check", "tests"]],
                         ids=["lint", "format", "lint-tests"])
def test_ruff_finds_nothing_in_the_package(command):
    done = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_finds_no_type_error_in_the_package():
    """mypy over src/dml with the [tool.mypy] settings of pyproject.toml (run from the root, which it reads)."""
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
