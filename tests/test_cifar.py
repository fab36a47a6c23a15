"""Tests for reading CIFAR: dml.data.cifar (reading, checking), dml.data.download (checksums,
extracting, downloading) and dml.data.dataset (subsetting).

Synthetic files keep these fast; the real local copy is used only when DML_DATA_DIR is set.
Downloads go to a throw-away HTTP server on 127.0.0.1 only.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_fixtures import (
    LAYOUTS,
    SMALL_COUNTS,
    file_md5,
    make_archive,
    md5_table,
    serve_directory,
    write_cifar_folder,
    write_pickle,
)
from dml.data.cifar import DATASETS, load_cifar
from dml.data.dataset import ImageSplit, balanced_subset
from dml.data.download import md5sum
from dml.errors import UserError


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    # No test may depend on the caller's mirror setting, and a configured proxy must never
    # receive the requests meant for the local server.
    monkeypatch.delenv("DML_DOWNLOAD_URL", raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")

    # Guard: if the loader ever picked the official URL by mistake, fail the test before any
    # socket opens instead of reaching out to the internet. pytest.fail is a BaseException,
    # so the loader's error handling cannot turn it into a UserError.
    real_urlopen = urllib.request.urlopen

    def local_only(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        if urllib.parse.urlsplit(url).hostname != "127.0.0.1":
            pytest.fail(f"test tried to download from a non-local URL: {url}")
        return real_urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only)


def _load(root, dataset="cifar100", **kw):
    kw.setdefault("expected_counts", SMALL_COUNTS)
    kw.setdefault("progress", False)
    kw.setdefault("download", False)
    return load_cifar(root, dataset, **kw)


def _archive_only(tmp_path, dataset="cifar100"):
    """A synthetic archive in ``tmp_path/src`` (the folder deleted) plus its checksum table."""
    src = tmp_path / "src"
    syn = write_cifar_folder(src, dataset)
    archive = make_archive(syn.folder, src / LAYOUTS[dataset]["archive"])
    table = md5_table(syn.folder, archive)
    for f in syn.folder.iterdir():
        f.unlink()
    syn.folder.rmdir()
    return syn, archive, table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- reading ------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_reads_both_key_flavours_and_pixel_layout(tmp_path, bytes_keys):
    syn = write_cifar_folder(tmp_path, bytes_keys=bytes_keys)
    data = _load(tmp_path, skip_checksum=True)

    assert data.dataset == "cifar100" and data.num_classes == 100
    assert data.class_names == syn.class_names  # bytes names decoded to str
    for split, n in SMALL_COUNTS.items():
        s = getattr(data, split)
        assert s.images.dtype == torch.uint8 and s.images.shape == (n, 3, 32, 32)
        assert s.images.is_contiguous() and s.images.device.type == "cpu"
        assert s.labels.dtype == torch.int64
        assert s.labels.tolist() == syn.split_labels(split).tolist()

    # A flat row is 1024 R, 1024 G, 1024 B, each 32x32 row-major: value at c*1024 + y*32 + x.
    raw = syn.split_data("train")
    for i, c, y, x in [(0, 0, 0, 0), (3, 1, 5, 7), (17, 2, 31, 30), (199, 2, 0, 31)]:
        assert data.train.images[i, c, y, x].item() == raw[i, c * 1024 + y * 32 + x]
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    expected = raw[:, (c * 1024 + y * 32 + x)]  # (N, 3, 32, 32) by explicit index arithmetic
    assert np.array_equal(data.train.images.numpy(), expected)


def test_cifar10_layout_concatenates_batches_in_order(tmp_path):
    syn = write_cifar_folder(tmp_path, "cifar10", bytes_keys=True)
    data = _load(tmp_path, "cifar10", skip_checksum=True)
    assert data.dataset == "cifar10" and data.num_classes == 10 and len(data.class_names) == 10
    assert data.train.images.shape == (200, 3, 32, 32) and data.test.images.shape == (50, 3, 32, 32)
    assert data.train.labels.tolist() == syn.split_labels("train").tolist()
    assert np.array_equal(data.train.images.reshape(200, -1).numpy(), syn.split_data("train"))


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="cifar100, cifar10"):
        _load(tmp_path, "mnist")
    assert DATASETS == ("cifar100", "cifar10")


def test_md5sum_matches_hashlib(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(os.urandom(3 * (1 << 20) + 5))  # spans several chunks
    assert md5sum(p) == file_md5(p)
    assert md5sum(p, chunk_size=7) == file_md5(p)


# --- archives ------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
def test_archive_is_extracted_when_folder_absent(tmp_path, dataset):
    syn, archive, table = _archive_only(tmp_path, dataset)
    data = _load(archive.parent, dataset, checksums=table)  # verifies archive and files
    assert (archive.parent / LAYOUTS[dataset]["folder"]).is_dir()
    assert data.train.labels.tolist() == syn.split_labels("train").tolist()
    assert np.array_equal(data.test.images.reshape(50, -1).numpy(), syn.split_data("test"))
    # Nothing of the staging folder is left behind.
    assert sorted(p.name for p in archive.parent.iterdir()) == sorted(
        [archive.name, LAYOUTS[dataset]["folder"]]
    )


def test_archive_checksum_mismatch_is_not_extracted(tmp_path):
    _, archive, table = _archive_only(tmp_path)
    table[archive.name] = "0" * 32
    with pytest.raises(UserError, match="--skip-checksum") as e:
        _load(archive.parent, checksums=table)
    assert archive.name in str(e.value)
    assert not (archive.parent / "cifar-100-python").exists()


def _tar_with(path: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-100-python/meta")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"m"))
        if member.isfile():
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        else:
            tar.addfile(member)
    return path


def _symlink(name, target):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = tarfile.SYMTYPE, target
    return m


@pytest.mark.parametrize(
    "member",
    [
        tarfile.TarInfo("cifar-100-python/../../evil"),
        tarfile.TarInfo("/tmp/dml-test-evil-absolute"),
        _symlink("cifar-100-python/train", "/etc/passwd"),
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_malicious_archive_member_is_refused(tmp_path, member):
    root = tmp_path / "root"
    root.mkdir()
    archive = _tar_with(root / "cifar-100-python.tar.gz", member)
    with pytest.raises(UserError, match="refusing to extract"):
        _load(root, skip_checksum=True)
    assert not (tmp_path / "evil").exists()
    assert not (root / "cifar-100-python").exists()  # nothing half-extracted
    assert [p.name for p in root.iterdir()] == [archive.name]


def test_corrupt_archive(tmp_path):
    _, archive, _ = _archive_only(tmp_path)
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(UserError, match="truncated or corrupt"):
        _load(archive.parent, skip_checksum=True)
    assert not (archive.parent / "cifar-100-python").exists()


# --- checksums and damaged files -------------------------------------------------------------


def test_checksum_mismatch_names_file_and_flag(tmp_path):
    syn = write_cifar_folder(tmp_path)
    with pytest.raises(UserError) as e:
        _load(tmp_path)  # official checksums: the synthetic files cannot match
    msg = str(e.value)
    assert "--skip-checksum" in msg and not msg.startswith("error")
    # meta is checked first; the message names it with both sums.
    assert "meta" in msg and file_md5(syn.folder / "meta") in msg
    assert "7973b15100ade9c7d40fb424638fde48" in msg

    assert len(_load(tmp_path, skip_checksum=True).train) == 200
    assert len(_load(tmp_path, checksums=md5_table(syn.folder)).test) == 50


def test_checksums_are_checked_before_unpickling(tmp_path, monkeypatch):
    write_cifar_folder(tmp_path)
    opened = []
    real_open = open

    def spy_open(file, mode="r", *a, **kw):
        opened.append((Path(file).name, mode))
        return real_open(file, mode, *a, **kw)

    table = md5_table(tmp_path / "cifar-100-python")
    table["test"] = "0" * 32  # the last file checked is wrong
    monkeypatch.setattr("builtins.open", spy_open)
    with pytest.raises(UserError, match="test has md5"):
        _load(tmp_path, checksums=table)
    # Every file was hashed once and none was opened a second time for unpickling.
    assert sorted(n for n, _ in opened) == ["meta", "test", "train"]


def test_pickle_with_foreign_globals_is_refused(tmp_path):
    write_cifar_folder(tmp_path)
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    write_pickle(tmp_path / "cifar-100-python" / "meta", {"fine_label_names": Evil()})
    with pytest.raises(UserError, match="refusing to load"):
        _load(tmp_path, skip_checksum=True)
    assert not marker.exists()


def _damage(folder: Path, how: str) -> str:
    """Damage the train file; returns a fragment the error message must contain."""
    train = folder / "train"
    obj = pickle.loads(train.read_bytes())
    if how == "truncated":
        train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
        return "truncated or corrupt"
    if how == "float-data":
        obj["data"] = obj["data"].astype(np.float32)
        expect = "uint8"
    elif how == "wrong-shape":
        obj["data"] = obj["data"][:, :3000]
        expect = "shape"
    elif how == "label-out-of-range":
        obj["fine_labels"][5] = 100
        expect = "0..99"
    elif how == "negative-label":
        obj["fine_labels"][0] = -1
        expect = "0..99"
    elif how == "label-count":
        obj["fine_labels"] = obj["fine_labels"][:-1]
        expect = "labels"
    elif how == "missing-key":
        del obj["fine_labels"]
        expect = "'fine_labels'"
    elif how == "image-count":
        obj["data"] = obj["data"][:-1]
        obj["fine_labels"] = obj["fine_labels"][:-1]
        expect = "expected 200"
    elif how == "not-a-dict":
        obj = [obj["data"]]
        expect = "dict"
    else:
        raise AssertionError(how)
    write_pickle(train, obj)
    return expect


@pytest.mark.parametrize(
    "how",
    [
        "truncated",
        "float-data",
        "wrong-shape",
        "label-out-of-range",
        "negative-label",
        "label-count",
        "missing-key",
        "image-count",
        "not-a-dict",
    ],
)
def test_damaged_file_is_a_user_error(tmp_path, how):
    syn = write_cifar_folder(tmp_path)
    expect = _damage(syn.folder, how)
    with pytest.raises(UserError) as e:
        _load(tmp_path, skip_checksum=True)  # structure is validated even without checksums
    msg = str(e.value)
    assert str(syn.folder / "train") in msg and expect in msg


def test_wrong_number_of_class_names(tmp_path):
    syn = write_cifar_folder(tmp_path)
    write_pickle(syn.folder / "meta", {"fine_label_names": ["a"] * 99})
    with pytest.raises(UserError, match="100 class names"):
        _load(tmp_path, skip_checksum=True)


def test_cifar10_batch_count_is_checked_per_file(tmp_path):
    syn = write_cifar_folder(tmp_path, "cifar10")
    # Move one image from batch 2 to batch 3: the total still matches, each batch does not.
    b2 = pickle.loads((syn.folder / "data_batch_2").read_bytes())
    b3 = pickle.loads((syn.folder / "data_batch_3").read_bytes())
    b3["data"] = np.concatenate([b3["data"], b2["data"][-1:]])
    b3["labels"] = b3["labels"] + b2["labels"][-1:]
    b2["data"], b2["labels"] = b2["data"][:-1], b2["labels"][:-1]
    write_pickle(syn.folder / "data_batch_2", b2)
    write_pickle(syn.folder / "data_batch_3", b3)
    with pytest.raises(UserError, match="data_batch_2 holds 39 images, expected 40"):
        _load(tmp_path, "cifar10", skip_checksum=True)


def test_missing_file_is_named(tmp_path):
    syn = write_cifar_folder(tmp_path)
    (syn.folder / "test").unlink()
    with pytest.raises(UserError, match="missing") as e:
        _load(tmp_path, skip_checksum=True)
    assert str(syn.folder / "test") in str(e.value)


@pytest.mark.parametrize("name", ["cifar-100-python", "my-cifar"])
def test_data_dir_may_be_the_extracted_folder_itself(tmp_path, name):
    syn = write_cifar_folder(tmp_path)
    folder = syn.folder.rename(tmp_path / name)
    data = _load(folder, skip_checksum=True)
    assert data.train.labels.tolist() == syn.split_labels("train").tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing extracted or created beside it
    assert not (folder / "cifar-100-python").exists()


def test_without_download_a_data_dir_named_like_the_folder_is_the_place_to_fill(tmp_path):
    folder = tmp_path / "cifar-100-python"
    with pytest.raises(UserError) as e:
        _load(folder)
    assert f"place the extracted folder cifar-100-python/ at {folder} or the archive" in str(e.value)
    assert "cifar-100-python/cifar-100-python" not in str(e.value)


def test_download_into_a_data_dir_named_like_the_folder_fills_that_folder(tmp_path):
    syn, archive, table = _archive_only(tmp_path)
    folder = tmp_path / "root" / "cifar-100-python"  # neither exists yet
    with serve_directory(archive.parent) as base:
        data = _load(folder, download=True, url=base + archive.name, checksums=table)
    assert data.train.labels.tolist() == syn.split_labels("train").tolist()
    assert sorted(p.name for p in folder.iterdir()) == ["meta", "test", "train"]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["cifar-100-python", archive.name]
    assert len(_load(folder, checksums=table).train) == len(data.train)  # and read from there next time


# --- downloading ----------------------------------------------------------------------------


def test_download_from_url(tmp_path, capsys):
    syn, archive, table = _archive_only(tmp_path)
    root = tmp_path / "root"  # does not exist yet
    with serve_directory(archive.parent) as base:
        data = _load(root, download=True, url=base + archive.name, checksums=table, progress=True)
    assert "downloading cifar-100-python.tar.gz" in capsys.readouterr().err  # the progress bar
    assert data.train.labels.tolist() == syn.split_labels("train").tolist()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python", archive.name]
    assert file_md5(root / archive.name) == table[archive.name]


def test_the_downloaded_archive_and_its_folder_honour_the_umask(tmp_path):
    _, archive, table = _archive_only(tmp_path)
    root = tmp_path / "root"
    previous = os.umask(0o022)
    try:
        with serve_directory(archive.parent) as base:
            _load(root, download=True, url=base + archive.name, checksums=table)
    finally:
        os.umask(previous)
    assert oct((root / archive.name).stat().st_mode & 0o777) == oct(0o644)  # readable by colleagues
    assert oct((root / "cifar-100-python").stat().st_mode & 0o777) == oct(0o755)


@pytest.mark.parametrize("as_folder", [False, True], ids=["file-url", "folder-url"])
def test_download_url_from_environment(tmp_path, monkeypatch, capsys, as_folder):
    _, archive, table = _archive_only(tmp_path, "cifar10")
    root = tmp_path / "root"
    with serve_directory(archive.parent) as base:
        monkeypatch.setenv("DML_DOWNLOAD_URL", base if as_folder else base + archive.name)
        data = _load(root, "cifar10", download=True, checksums=table)
    assert len(data.train) == 200 and (root / "cifar-10-batches-py").is_dir()
    assert capsys.readouterr().err == ""  # progress=False: no bar


def test_no_download_names_folder_archive_and_url(tmp_path):
    with pytest.raises(UserError) as e:
        _load(tmp_path)
    msg = str(e.value)
    assert "cifar-100-python/" in msg and "cifar-100-python.tar.gz" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_is_a_user_error(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/cifar-100-python.tar.gz"  # nothing listens there
    with pytest.raises(UserError) as e:
        _load(tmp_path, download=True, url=url)
    msg = str(e.value)
    assert "--download-url" in msg and url in msg and str(tmp_path / "cifar-100-python.tar.gz") in msg
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_a_failed_download_leaves_none_of_the_folders_it_created(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("a user's file")
    url = f"http://127.0.0.1:{_free_port()}/cifar-100-python.tar.gz"  # nothing listens there
    with pytest.raises(UserError, match="could not download"):
        _load(tmp_path / "x" / "y" / "z", download=True, url=url)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine.txt", "x"]  # x was there before: kept


def test_http_error_is_a_user_error(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    root = tmp_path / "root"
    with serve_directory(served) as base, pytest.raises(UserError, match="404"):
        _load(root, download=True, url=base + "missing.tar.gz")
    assert not root.exists()  # the folder the download created is gone with it


def test_downloaded_archive_md5_mismatch_leaves_nothing(tmp_path):
    _, archive, table = _archive_only(tmp_path)
    table[archive.name] = "0" * 32
    root = tmp_path / "root"
    with serve_directory(archive.parent) as base, pytest.raises(UserError) as e:
        _load(root, download=True, url=base + archive.name, checksums=table)
    assert "--skip-checksum" in str(e.value) and "0" * 32 in str(e.value)
    assert not root.exists()


# --- balanced_subset ----------------------------------------------------------------------


def _split(labels) -> ImageSplit:
    labels = torch.as_tensor(labels, dtype=torch.int64)
    images = torch.arange(len(labels), dtype=torch.int64).remainder(256).to(torch.uint8)
    return ImageSplit(images.view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous(), labels)


def _row_ids(split: ImageSplit) -> list[int]:
    return split.images[:, 0, 0, 0].tolist()  # image i was filled with i % 256


def test_balanced_subset_equal_class_counts():
    split = _split(torch.randperm(1000, generator=torch.Generator().manual_seed(1)) % 10)
    sub = balanced_subset(split, 200, seed=0, num_classes=10)
    assert len(sub) == 200 and sub.images.shape == (200, 3, 32, 32)
    assert torch.bincount(sub.labels, minlength=10).tolist() == [20] * 10
    assert sub.images.is_contiguous()


def test_balanced_subset_keeps_pairs_sorted_and_is_seeded():
    labels = torch.arange(250) % 10  # 25 per class; row i has label i % 10 (ids fit in uint8)
    split = _split(labels)
    a = balanced_subset(split, 50, seed=3, num_classes=10)
    b = balanced_subset(split, 50, seed=3, num_classes=10)
    c = balanced_subset(split, 50, seed=4, num_classes=10)
    ids_a = _row_ids(a)
    assert ids_a == sorted(ids_a)
    assert a.labels.tolist() == [i % 10 for i in ids_a]  # labels follow their images
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert ids_a != _row_ids(c)


def test_balanced_subset_remainder_and_scarce_class():
    split = _split(torch.arange(1000) % 10)
    sub = balanced_subset(split, 205, seed=0, num_classes=10)
    counts = torch.bincount(sub.labels, minlength=10).tolist()
    assert sorted(counts) == [20] * 5 + [21] * 5
    # The remainder goes to a seeded random choice of classes, not always the first five.
    extras = {
        tuple(torch.bincount(balanced_subset(split, 205, s, 10).labels, minlength=10).tolist())
        for s in range(6)
    }
    assert len(extras) > 1

    # Class 0 has only 3 samples: it gives all 3 and the others make up the difference evenly.
    labels = torch.cat([torch.zeros(3, dtype=torch.int64), torch.arange(1, 10).repeat(50)])
    sub = balanced_subset(_split(labels), 100, seed=0, num_classes=10)
    counts = torch.bincount(sub.labels, minlength=10).tolist()
    assert counts[0] == 3 and sum(counts) == 100 and max(counts[1:]) - min(counts[1:]) <= 1


def test_balanced_subset_bounds():
    split = _split(torch.arange(40) % 4)
    assert balanced_subset(split, 40, seed=0, num_classes=4) is split
    for bad in (0, 41):
        with pytest.raises(UserError, match="between 1 and 40"):
            balanced_subset(split, bad, seed=0, num_classes=4)
    one = balanced_subset(split, 1, seed=0, num_classes=4)
    assert len(one) == 1


# --- the real local copy ------------------------------------------------------------------

DATA_DIR = os.environ.get("DML_DATA_DIR")
needs_real_data = pytest.mark.skipif(
    not DATA_DIR, reason="set DML_DATA_DIR to a folder holding cifar-100-python/ to test the real copy"
)


@pytest.fixture(scope="module")
def real_cifar100():
    return load_cifar(DATA_DIR, "cifar100", download=False, skip_checksum=True, progress=False)


@needs_real_data
def test_real_copy_loads(real_cifar100):
    data = real_cifar100
    assert data.train.images.shape == (50000, 3, 32, 32)
    assert data.test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.train.labels, minlength=100).tolist() == [500] * 100
    assert torch.bincount(data.test.labels, minlength=100).tolist() == [100] * 100
    assert len(data.class_names) == 100
    assert data.class_names[0] == "apple" and data.class_names[99] == "worm"
    # Per-channel mean in chunks, so no float copy of the whole split is made.
    total = torch.zeros(3, dtype=torch.float64)
    for chunk in data.train.images.split(2000):
        total += chunk.to(torch.float64).sum(dim=(0, 2, 3))
    mean = total / (50000 * 32 * 32 * 255)
    assert torch.allclose(mean, torch.tensor([0.5071, 0.4867, 0.4408], dtype=torch.float64), atol=0.01)


@needs_real_data
def test_checksums_decide_whether_the_real_copy_loads_without_skip_checksum():
    """Whatever copy DML_DATA_DIR holds: files with the official MD5s load; any other copy is refused
    with one error that names the way out. The decision follows the files, not the machine."""
    folder = Path(DATA_DIR) / "cifar-100-python"
    official_md5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                    "meta": "7973b15100ade9c7d40fb424638fde48"}  # the release's published checksums
    official = all(file_md5(folder / name) == md5 for name, md5 in official_md5.items())
    if official:
        assert len(load_cifar(DATA_DIR, "cifar100", download=False, progress=False).train) == 50000
    else:
        with pytest.raises(UserError, match="--skip-checksum"):
            load_cifar(DATA_DIR, "cifar100", download=False, progress=False)
