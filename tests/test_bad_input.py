"""Bad data files through `dml train`: one `error:` line, status 2, nothing written.

The library-level checks live in test_cifar.py; these prove the same problems reach the command
line as one line. The data folder links the full-size synthetic train and meta files and gets
its own (damaged) copy of the file under test, so no case rewrites 150 MB.
"""

from __future__ import annotations

import numpy as np
import pytest

from cifar_fixtures import write_pickle
from dml.cli import main

FOLDER = "cifar-100-python"


@pytest.fixture
def data_dir(cifar_root, tmp_path):
    folder = tmp_path / "data" / FOLDER
    folder.mkdir(parents=True)
    for name in ("meta", "train", "test"):
        (folder / name).symlink_to(cifar_root / FOLDER / name)
    return folder


def _replace(folder, name, content=None, data=None, labels=None):
    """Put a file of our own in place of the link ``name``."""
    (folder / name).unlink()
    if content is not None:
        (folder / name).write_bytes(content)
    else:
        write_pickle(folder / name, {"data": data, "fine_labels": labels})


def _train_fails(data_dir, tmp_path, capsys, *extra) -> str:
    out = tmp_path / "runs"
    code = main(["train", "--data-dir", str(data_dir.parent), "--out-dir", str(out), "--no-download",
                 "--no-progress", "--train-samples", "64", "--test-samples", "100", "--batch-size", "32",
                 "--models", "resnet20", "--epochs", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()  # refused before anything was written
    return err


def test_truncated_file(cifar_root, data_dir, tmp_path, capsys):
    meta = (cifar_root / FOLDER / "meta").read_bytes()
    _replace(data_dir, "meta", content=meta[: len(meta) // 2])
    err = _train_fails(data_dir, tmp_path, capsys, "--skip-checksum")
    assert f"file {data_dir / 'meta'} is truncated or corrupt" in err


@pytest.mark.parametrize("data, expected", [
    (np.zeros((100, 3072), np.float32), "got float32 array of shape (100, 3072)"),
    (np.zeros((100, 32, 32, 3), np.uint8), "got uint8 array of shape (100, 32, 32, 3)"),
], ids=["wrong-dtype", "wrong-shape"])
def test_wrong_dtype_or_shape(data_dir, tmp_path, capsys, data, expected):
    _replace(data_dir, "test", data=data, labels=[0] * len(data))
    err = _train_fails(data_dir, tmp_path, capsys, "--skip-checksum")
    assert "'data' should be a uint8 array of shape (N, 3072)" in err and expected in err


def test_labels_out_of_range(data_dir, tmp_path, capsys):
    labels = [i % 100 for i in range(10_000)]
    labels[7] = 100
    _replace(data_dir, "test", data=np.zeros((10_000, 3072), np.uint8), labels=labels)
    err = _train_fails(data_dir, tmp_path, capsys, "--skip-checksum")
    assert "labels must lie in 0..99, found 0..100" in err


def test_non_official_checksums_need_skip_checksum(data_dir, tmp_path, capsys):
    err = _train_fails(data_dir, tmp_path, capsys)  # the synthetic files are not the official ones
    assert "7973b15100ade9c7d40fb424638fde48" in err and "pass --skip-checksum" in err
