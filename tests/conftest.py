"""Shared fixtures: a full-size synthetic CIFAR-100 in the official format, and the real copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cifar_fixtures import write_cifar_folder  # pytest puts this folder on sys.path (rootdir conftest)

REAL_DATA_DIR = os.environ.get("DML_DATA_DIR")
needs_real_data = pytest.mark.skipif(
    not REAL_DATA_DIR, reason="set DML_DATA_DIR to a folder holding cifar-100-python/ to run real-data tests"
)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A data dir with a synthetic CIFAR-100 of official size (random pixels; use --skip-checksum)."""
    root = tmp_path_factory.mktemp("data")
    write_cifar_folder(root, "cifar100", n_train=50_000, n_test=10_000)
    return root
