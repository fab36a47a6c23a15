"""Shared fixtures: a full-size synthetic CIFAR-100 in the official format, and the real copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cifar_fixtures import write_cifar_folder  # pytest puts this folder on sys.path (rootdir conftest)

# Tests compare runs started at different moments (resumed against uninterrupted, one process against
# two) bit for bit. The thread count a peer computes with orders floating-point sums, and by default it
# is measured against the machine's load (threads.py): here every peer takes its share of the cores,
# as the environment of a reproducible run would say. tests/test_threads.py measures, with it removed.
os.environ["DML_MEASURE_THREADS"] = "0"

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


@pytest.fixture(autouse=True)
def torch_settings_are_given_back():
    """Every test leaves torch's intra-op thread count and denormal flushing as it found them: a cohort not
    closed, or closed out of order, would otherwise change the numbers and timings of the tests after it."""
    import torch

    from dml.peer_threads import flushes_denormals

    before = torch.get_num_threads(), flushes_denormals()
    yield
    after = torch.get_num_threads(), flushes_denormals()
    assert after == before, f"(threads, flush denormals) {before} -> {after}: close what the test made, last first"
