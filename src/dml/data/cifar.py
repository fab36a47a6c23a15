"""CIFAR-100 / CIFAR-10 in the official "python version" format.

``load_cifar`` finds the data under a root folder (extracted folder, else archive, else a
download), checks it and returns uint8 image tensors of shape (N, 3, 32, 32) with int64 labels.

Safety: the files are pickles, and unpickling can run code. So by default every file's MD5 is
compared with the official table *before* it is unpickled, and the unpickler only accepts the
few numpy globals that a CIFAR file needs, which also covers ``skip_checksum=True``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import reprlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .augment import NORMALISATION

DATASETS = ("cifar100", "cifar10")

#: Environment variable that replaces the default download URL (for mirrors).
DOWNLOAD_URL_ENV = "DML_DOWNLOAD_URL"
#: Seconds to wait on the network before giving up (connect and each read).
DOWNLOAD_TIMEOUT_S = 60.0

_PIXELS = 3 * 32 * 32  # one flat row: 1024 R, 1024 G, 1024 B, each 32x32 row-major


@dataclass
class CifarSplit:
    """Images as uint8 (N, 3, 32, 32), contiguous, CPU; labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class CifarData:
    """A dataset as uint8 image tensors: CIFAR's official files or an image folder."""

    dataset: str  # "cifar100", "cifar10" or "folder"
    num_classes: int
    class_names: list[str]
    train: CifarSplit
    test: CifarSplit
    mean: tuple[float, ...] = ()  # per-channel normalisation of images scaled to [0, 1]
    std: tuple[float, ...] = ()
    val: CifarSplit | None = None  # held out of the training images (--val-samples)


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


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks so large files never sit in memory whole."""
    # usedforsecurity=False: MD5 is an integrity check here, and FIPS builds refuse it otherwise.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


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
) -> CifarData:
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
            _download(_resolve_url(url, spec), archive, spec, md5_table, skip_checksum, progress)
        else:
            raise UserError(
                f"{spec.title} not found under {root}: place the extracted folder {spec.folder}/ "
                f"at {folder} or the archive {spec.archive} at {archive} (download it from "
                f"{spec.url}), or allow downloading"
            )
        _extract(archive, root, spec)
    return _read_folder(folder, dataset, spec, md5_table, counts, skip_checksum)


def _is_extracted_folder(path: Path, spec: _Spec) -> bool:
    """Whether ``path`` is the extracted folder: it bears its name, or holds every one of its files."""
    names = (spec.meta_file, *spec.train_files, *spec.test_files)
    return path.name == spec.folder or all((path / name).is_file() for name in names)


# --- download and extraction -------------------------------------------------------------


def _resolve_url(url: str | None, spec: _Spec) -> str:
    if url is None:
        url = os.environ.get(DOWNLOAD_URL_ENV) or spec.url
    if url.endswith("/"):
        url += spec.archive
    return url


def _download(
    url: str,
    dest: Path,
    spec: _Spec,
    md5_table: dict[str, str],
    skip_checksum: bool,
    progress: bool,
) -> None:
    """Download ``url`` to ``dest``. A failed download leaves nothing behind: no partial archive
    (which a later run would mistake for a complete one), and none of the folders it created."""
    created = []  # the folders above dest that do not exist yet, deepest first
    folder = dest.parent
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        _fetch(url, dest, spec, md5_table, skip_checksum, progress)
    except BaseException:  # Ctrl-C too
        for folder in created:
            try:
                folder.rmdir()  # only if still empty: never what someone else put there meanwhile
            except OSError:
                break
        raise


def _fetch(
    url: str,
    dest: Path,
    spec: _Spec,
    md5_table: dict[str, str],
    skip_checksum: bool,
    progress: bool,
) -> None:
    """Download ``url`` to ``dest`` via a temporary file, renamed into place once complete and checked."""
    from tqdm.auto import tqdm  # imported here: only downloads need it

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise UserError(f"cannot write the {spec.title} download into {dest.parent}: {e}") from e
    tmp = Path(tmp_name)
    try:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "dml-cifar-loader"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
                request, timeout=DOWNLOAD_TIMEOUT_S
            ) as response:
                size = response.headers.get("Content-Length")
                with tqdm(
                    total=int(size) if size and size.isdigit() else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"downloading {spec.archive}",
                    disable=not progress,
                ) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (OSError, http.client.HTTPException, ValueError) as e:
            # OSError covers URLError/HTTPError, refused connections and timeouts;
            # HTTPException a connection cut mid-body; ValueError a malformed URL.
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code} {e.reason}"
            else:
                reason = getattr(e, "reason", None) or e
            raise UserError(
                f"could not download {spec.title} from {url} ({reason}); download "
                f"{spec.archive} yourself and place it at {dest} (or its extracted folder at "
                f"{dest.parent / spec.folder}), or use --download-url URL to name a mirror"
            ) from e
        if not skip_checksum:
            actual, expected = md5sum(tmp), md5_table[spec.archive]
            if actual != expected:
                raise UserError(
                    f"the archive downloaded from {url} has md5 {actual}, but the official "
                    f"{spec.archive} has md5 {expected}; the download is damaged, or the mirror "
                    f"serves a non-official copy, which --skip-checksum accepts"
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _extract(archive: Path, root: Path, spec: _Spec) -> None:
    """Extract ``spec.folder`` from ``archive`` into ``root``, refusing unsafe members.

    Members are written one by one instead of via ``extractall`` so the safety checks do not
    depend on ``tarfile``'s ``filter=`` (missing in older Python 3.10/3.11 patch releases).
    Everything lands in a temporary folder first and is renamed into place at the end, so an
    interrupted extraction never leaves a half-filled folder that would be taken as complete.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", suffix=".extract", dir=root))
    except OSError as e:
        raise UserError(f"cannot extract {archive} into {root}: {e}") from e
    try:
        staging_resolved = staging.resolve()
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    target = staging / _safe_member_path(member, archive)
                    # Belt and braces: the normalised path must still lie inside staging.
                    if not target.resolve().is_relative_to(staging_resolved):
                        raise UserError(f"archive {archive} has an unsafe member {member.name!r}")
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # regular file, checked above
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
            extracted = staging / spec.folder
            if not extracted.is_dir():
                raise UserError(
                    f"archive {archive} does not contain the folder {spec.folder}/; it is not a "
                    f"{spec.title} python-version archive ({spec.url})"
                )
            os.replace(extracted, root / spec.folder)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UserError(
                f"archive {archive} is truncated or corrupt ({e}); delete it and download it again "
                f"from {spec.url}"
            ) from e
        except OSError as e:
            raise UserError(f"could not extract {archive} into {root}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe_member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's relative path; UserError for links, devices, absolute paths or ``..``."""
    if not (member.isfile() or member.isdir()):
        # Links could point outside the target; devices and FIFOs never belong in CIFAR.
        raise UserError(
            f"archive {archive} has member {member.name!r} that is not a regular file or folder "
            f"(a link or device); refusing to extract it"
        )
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name or not member.name:
        raise UserError(
            f"archive {archive} has member {member.name!r} with an absolute or parent-relative "
            f"path; refusing to extract it"
        )
    return path


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
) -> CifarData:
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
    return CifarData(dataset, spec.num_classes, class_names, train, test, mean, std)


class _CifarUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays only.

    A CIFAR pickle needs nothing else, and refusing every other global means a tampered file
    cannot call arbitrary functions, even with the checksums skipped.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 and the official files
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol <= 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files come from Python 2; their str keys arrive as
            # bytes (b"data"), while copies written by Python 3 keep str keys. _get accepts both.
            return _CifarUnpickler(f, encoding="bytes").load()
    except _ForbiddenGlobal as e:
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
        raise UserError(
            f"file {path}: {spec.names_key!r} should list {spec.num_classes} class names, got {got}"
        )
    out = []
    for name in names:
        if isinstance(name, bytes):
            name = name.decode("latin1")  # the official names are ASCII; latin1 never fails
        if not isinstance(name, str):
            raise UserError(f"file {path}: class name {_short(name)} is not a string")
        out.append(name)
    return out


def _read_split(folder: Path, files: tuple[str, ...], expected: int, spec: _Spec) -> CifarSplit:
    # A split spread over several equal batches (CIFAR-10's data_batch_1..5) is checked per file.
    per_file = expected // len(files) if expected % len(files) == 0 else None
    datas, labels = [], []
    for name in files:
        data, lab = _read_batch(folder / name, spec, per_file)
        datas.append(data)
        labels.append(lab)
    total = sum(len(lab) for lab in labels)
    if total != expected:
        raise UserError(
            f"{spec.title} files {', '.join(files)} in {folder} hold {total} images, expected "
            f"{expected}"
        )
    data = datas[0] if len(datas) == 1 else np.concatenate(datas)
    if not (data.flags.c_contiguous and data.flags.writeable):
        data = np.array(data, order="C")  # torch.from_numpy wants a writable, dense array
    # Each row is 1024 R, 1024 G, 1024 B values, each plane 32x32 row-major: a plain reshape.
    images = torch.from_numpy(data).reshape(-1, 3, 32, 32)
    return CifarSplit(images=images, labels=torch.from_numpy(np.concatenate(labels)))


def _read_batch(path: Path, spec: _Spec, expected: int | None) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    data = _get(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) \
            else type(data).__name__
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
            f"file {path}: labels must lie in 0..{spec.num_classes - 1}, found "
            f"{labels.min()}..{labels.max()}"
        )
    return data, labels.astype(np.int64)


# --- subsets -------------------------------------------------------------------------------


def balanced_subset(split: CifarSplit, n: int, seed: int, num_classes: int) -> CifarSplit:
    """A seeded, class-balanced subset of ``n`` samples, in the split's original order.

    Each class gets ``n // num_classes`` samples; the remainder goes one each to the first
    classes of a seeded random class order. A class with too few samples gives all it has and
    the shortfall is spread the same way over the classes that still have samples. With
    ``n == len(split)`` the split itself is returned.
    """
    if n == len(split.labels) and n >= 1:
        return split
    return _take(split, _balanced_indices(split, n, seed, num_classes))


def hold_out(split: CifarSplit, n: int, seed: int, num_classes: int) -> tuple[CifarSplit, CifarSplit]:
    """(the rest, the held-out part): ``n`` samples chosen as :func:`balanced_subset` chooses them,
    and every other sample, each in the split's original order."""
    total = len(split.labels)
    if not 1 <= n < total:
        raise UserError(f"cannot hold out {n} of {total} training samples; choose between 1 and {total - 1}")
    held = _balanced_indices(split, n, seed, num_classes)
    keep = torch.ones(total, dtype=torch.bool)
    keep[held] = False
    return _take(split, keep.nonzero().flatten()), _take(split, held)


def _take(split: CifarSplit, index: torch.Tensor) -> CifarSplit:
    return CifarSplit(images=split.images[index].contiguous(), labels=split.labels[index])


def _balanced_indices(split: CifarSplit, n: int, seed: int, num_classes: int) -> torch.Tensor:
    """Sorted indices of the seeded, class-balanced choice of ``n`` samples (see balanced_subset)."""
    total = len(split.labels)
    if not 1 <= n <= total:
        raise UserError(f"a subset of {n} samples is impossible; choose between 1 and {total}")
    labels = split.labels
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels lie outside 0..{num_classes - 1}")

    g = torch.Generator().manual_seed(seed)
    class_order = torch.randperm(num_classes, generator=g).tolist()
    # Shuffle each class's indices once; the first `quota[c]` of them are taken.
    pools = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        pools.append(members[torch.randperm(len(members), generator=g)])
    available = [len(p) for p in pools]

    # Water-filling: share what is left equally among classes that still have samples.
    quota = [0] * num_classes
    remaining = n
    active = [c for c in class_order if available[c] > 0]
    while remaining > 0:
        share, extra = divmod(remaining, len(active))
        for i, c in enumerate(active):
            give = min(share + (1 if i < extra else 0), available[c] - quota[c])
            quota[c] += give
            remaining -= give
        active = [c for c in active if quota[c] < available[c]]

    return torch.cat([pools[c][: quota[c]] for c in range(num_classes)]).sort().values
