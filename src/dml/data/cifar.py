"""CIFAR-100 / CIFAR-10 in the official "python version" format: the two datasets' specs (files,
keys, checksums, URLs) and the reading and checking of their files.

``load_cifar`` finds the data under a root folder (extracted folder, else archive, else a
download through download.py), checks it and returns an ``ImageData`` (dataset.py) of uint8
image tensors of shape (N, 3, 32, 32) with int64 labels.

Safety: the files are pickles, and unpickling can run code. So by default every file's MD5 is
compared with the official table *before* it is unpickled, and the unpickler (safe_pickle.py) only
accepts the few numpy globals that a CIFAR file needs, which also covers ``skip_checksum=True``.
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .augment import NORMALISATION
from .dataset import ImageData, ImageSplit
from .download import download_archive, extract_folder, md5sum, resolve_url
from .safe_pickle import ArrayUnpickler, ForbiddenGlobal

DATASETS = ("cifar100", "cifar10")

_PIXELS = 3 * 32 * 32  # one flat row: 1024 R, 1024 G, 1024 B, each 32x32 row-major


@dataclass(frozen=True)
class _Spec:
    """Everything that differs between CIFAR-100 and CIFAR-10."""

    title: str
    num_classes: int
    folder: str
    archive: str
    url: str
    meta_file: str
    names_key: str
    labels_key: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    md5: dict[str, str]  # file name (archive included) -> official md5


_SPECS = {
    "cifar100": _Spec(
        title="CIFAR-100",
        num_classes=100,
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        meta_file="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
        train_files=("train",),
        test_files=("test",),
        md5={
            "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
    "cifar10": _Spec(
        title="CIFAR-10",
        num_classes=10,
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        meta_file="batches.meta",
        names_key="label_names",
        labels_key="labels",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        md5={
            "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
}

_OFFICIAL_COUNTS = {"train": 50000, "test": 10000}


def load_cifar(
    root: str | os.PathLike,
    dataset: str = "cifar100",
    *,
    download: bool = True,
    url: str | None = None,
    skip_checksum: bool = False,
    progress: bool = True,
    checksums: dict[str, str] | None = None,
    expected_counts: dict[str, int] | None = None,
) -> ImageData:
    """Load CIFAR-100 or CIFAR-10 from ``root``, extracting or downloading it when needed.

    Looks for, in order: the extracted folder (e.g. ``root/cifar-100-python/``), the archive
    (``root/cifar-100-python.tar.gz``), then downloads the archive when ``download`` is true.
    ``root`` may also be the extracted folder itself (named ``cifar-100-python``, or holding all
    its files); then the archive is looked for, or downloaded, beside it.
    ``url`` replaces the official URL; when it is None the environment variable
    ``DML_DOWNLOAD_URL`` does. A URL ending in "/" names a mirror folder and gets the archive
    name appended.

    ``skip_checksum`` accepts files whose MD5 differs from the official release (a re-created
    copy); their structure is still validated. ``checksums`` (file name -> md5) and
    ``expected_counts`` ({"train": n, "test": m}) override the official values, for tests with
    small synthetic files. Every problem a user can fix is raised as ``UserError``.
    """
    if dataset not in _SPECS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    spec = _SPECS[dataset]
    md5_table = {**spec.md5, **(checksums or {})}
    counts = {**_OFFICIAL_COUNTS, **(expected_counts or {})}
    root = Path(root).expanduser()
    folder = root / spec.folder
    if not folder.is_dir() and _is_extracted_folder(root, spec):
        # root names the extracted folder itself (--data-dir data/cifar-100-python): read it there,
        # and extract or download into it, not into a cifar-100-python/ below it
        root, folder = root.parent, root
    archive = root / spec.archive

    if not folder.is_dir():
        if archive.is_file():
            if not skip_checksum:
                _check_md5(archive, md5_table[spec.archive], spec)
        elif download:
            download_archive(
                resolve_url(url, spec.url, spec.archive),
                archive,
                title=spec.title,
                folder=spec.folder,
                md5=None if skip_checksum else md5_table[spec.archive],
                progress=progress,
            )
        else:
            raise UserError(
                f"{spec.title} not found under {root}: place the extracted folder {spec.folder}/ "
                f"at {folder} or the archive {spec.archive} at {archive} (download it from "
                f"{spec.url}), or allow downloading"
            )
        extract_folder(archive, root, spec.folder, kind=f"{spec.title} python-version archive", url=spec.url)
    return _read_folder(folder, dataset, spec, md5_table, counts, skip_checksum)


def _is_extracted_folder(path: Path, spec: _Spec) -> bool:
    """Whether ``path`` is the extracted folder: it bears its name, or holds every one of its files."""
    names = (spec.meta_file, *spec.train_files, *spec.test_files)
    return path.name == spec.folder or all((path / name).is_file() for name in names)


# --- reading and validating the pickles --------------------------------------------------


def _check_md5(path: Path, expected: str, spec: _Spec) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise UserError(
            f"{path} has md5 {actual}, but the official {spec.title} file {path.name} has md5 "
            f"{expected}; if this is a deliberately re-created, non-official copy, pass "
            f"--skip-checksum to accept it, otherwise delete it and download it again"
        )


def _read_folder(
    folder: Path,
    dataset: str,
    spec: _Spec,
    md5_table: dict[str, str],
    counts: dict[str, int],
    skip_checksum: bool,
) -> ImageData:
    names = (spec.meta_file, *spec.train_files, *spec.test_files)
    for name in names:
        if not (folder / name).is_file():
            raise UserError(
                f"{spec.title} file {folder / name} is missing; restore it, or delete the "
                f"incomplete folder {folder} so it is extracted or downloaded again"
            )
    if not skip_checksum:
        # All checksums before any unpickling: a tampered pickle could run code when loaded.
        for name in names:
            _check_md5(folder / name, md5_table[name], spec)

    meta = _unpickle(folder / spec.meta_file)
    class_names = _class_names(meta, folder / spec.meta_file, spec)
    train = _read_split(folder, spec.train_files, counts["train"], spec)
    test = _read_split(folder, spec.test_files, counts["test"], spec)
    mean, std = NORMALISATION[dataset]
    return ImageData(dataset, spec.num_classes, class_names, train, test, mean, std)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files come from Python 2; their str keys arrive as
            # bytes (b"data"), while copies written by Python 3 keep str keys. _get accepts both.
            return ArrayUnpickler(f, encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise UserError(
            f"file {path} refers to {e}, which a CIFAR file never holds; refusing to load it "
            f"(replace it with a copy from the official archive)"
        ) from e
    except OSError as e:
        raise UserError(f"could not read {path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise almost anything
        raise UserError(
            f"file {path} is truncated or corrupt ({type(e).__name__}: {e}); delete its folder "
            f"and extract or download the data again"
        ) from e


# A damaged pickle can nest thousands of levels deep, where plain repr() raises RecursionError.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 40, 40


def _short(obj: Any) -> str:
    """A bounded repr() for error messages about file content."""
    return _SHORT_REPR.repr(obj)


def _get(obj: Any, key: str, path: Path) -> Any:
    """``obj[key]`` for a str- or bytes-keyed dict, with a UserError naming the file."""
    if not isinstance(obj, dict):
        raise UserError(f"file {path} holds a {type(obj).__name__}, expected a dict")
    for k in (key, key.encode()):
        if k in obj:
            return obj[k]
    found = ", ".join(sorted(_short(k) for k in obj))
    raise UserError(f"file {path} lacks the key {key!r} (found: {found})")


def _class_names(meta: Any, path: Path, spec: _Spec) -> list[str]:
    names = _get(meta, spec.names_key, path)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        got = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise UserError(f"file {path}: {spec.names_key!r} should list {spec.num_classes} class names, got {got}")
    out = []
    for name in names:
        if isinstance(name, bytes):
            name = name.decode("latin1")  # the official names are ASCII; latin1 never fails
        if not isinstance(name, str):
            raise UserError(f"file {path}: class name {_short(name)} is not a string")
        out.append(name)
    return out


def _read_split(folder: Path, files: tuple[str, ...], expected: int, spec: _Spec) -> ImageSplit:
    # A split spread over several equal batches (CIFAR-10's data_batch_1..5) is checked per file.
    per_file = expected // len(files) if expected % len(files) == 0 else None
    datas, labels = [], []
    for name in files:
        data, lab = _read_batch(folder / name, spec, per_file)
        datas.append(data)
        labels.append(lab)
    total = sum(len(lab) for lab in labels)
    if total != expected:
        raise UserError(f"{spec.title} files {', '.join(files)} in {folder} hold {total} images, expected {expected}")
    data = datas[0] if len(datas) == 1 else np.concatenate(datas)
    if not (data.flags.c_contiguous and data.flags.writeable):
        data = np.array(data, order="C")  # torch.from_numpy wants a writable, dense array
    # Each row is 1024 R, 1024 G, 1024 B values, each plane 32x32 row-major: a plain reshape.
    images = torch.from_numpy(data).reshape(-1, 3, 32, 32)
    return ImageSplit(images=images, labels=torch.from_numpy(np.concatenate(labels)))


def _read_batch(path: Path, spec: _Spec, expected: int | None) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = _get(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"file {path}: 'data' should be a uint8 array of shape (N, {_PIXELS}), got {desc}")
    n = data.shape[0]
    if expected is not None and n != expected:
        raise UserError(f"file {path} holds {n} images, expected {expected}")

    raw = _get(batch, spec.labels_key, path)
    try:
        labels = np.asarray(raw)
    except Exception as e:  # noqa: BLE001 - ragged or odd objects
        raise UserError(f"file {path}: {spec.labels_key!r} is not a list of integers ({e})") from e
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"file {path}: {spec.labels_key!r} should be a list of integers")
    if len(labels) != n:
        raise UserError(f"file {path} has {n} images but {len(labels)} labels")
    if n and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(
            f"file {path}: labels must lie in 0..{spec.num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    return data, labels.astype(np.int64)
