"""Helpers that write small synthetic CIFAR files in the official "python version" layout.

The files are random but structurally real, so ``load_cifar`` can read them when given
``expected_counts=SMALL_COUNTS`` (or the counts used) and either ``skip_checksum=True`` or
``checksums=md5_table(...)``. Reused by other test files; import with
``from cifar_fixtures import ...``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import pickle
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SMALL_COUNTS = {"train": 200, "test": 50}

# Per dataset: folder, archive, meta file, names key, labels key, train files, test files, classes.
LAYOUTS = {
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        meta="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
        train=("train",),
        test=("test",),
        num_classes=100,
    ),
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        meta="batches.meta",
        names_key="label_names",
        labels_key="labels",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        num_classes=10,
    ),
}


@dataclass
class SyntheticCifar:
    """What was written: the folder and, per file name, the raw data and labels."""

    dataset: str
    folder: Path
    data: dict[str, np.ndarray]  # file name -> uint8 (n, 3072)
    labels: dict[str, list[int]]  # file name -> labels
    class_names: list[str]

    def split_data(self, split: str) -> np.ndarray:
        return np.concatenate([self.data[f] for f in LAYOUTS[self.dataset][split]])

    def split_labels(self, split: str) -> np.ndarray:
        return np.concatenate([self.labels[f] for f in LAYOUTS[self.dataset][split]])


def write_cifar_folder(
    root: Path,
    dataset: str = "cifar100",
    *,
    n_train: int = SMALL_COUNTS["train"],
    n_test: int = SMALL_COUNTS["test"],
    bytes_keys: bool = False,
    seed: int = 0,
) -> SyntheticCifar:
    """Write ``root/<folder>/`` with random images and cycling labels (every class appears
    when n >= num_classes). ``bytes_keys`` writes b"data"-style keys and bytes names, as the
    official Python 2 files appear when unpickled with ``encoding="bytes"``."""
    layout = LAYOUTS[dataset]
    folder = Path(root) / layout["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    text = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    k = layout["num_classes"]

    names = [f"class_{i:03d}" for i in range(k)]
    _dump(folder / layout["meta"], {key(layout["names_key"]): [text(s) for s in names]})

    data, labels = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        files = layout[split]
        per_file = n // len(files)
        for i, name in enumerate(files):
            count = per_file if i < len(files) - 1 else n - per_file * (len(files) - 1)
            data[name] = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
            labels[name] = [int(x) for x in rng.permutation(np.arange(count) % k)]
            _dump(
                folder / name,
                {
                    key("batch_label"): text(f"{split} batch {i + 1}"),
                    key(layout["labels_key"]): labels[name],
                    key("data"): data[name],
                    key("filenames"): [text(f"img_{j}.png") for j in range(count)],
                },
            )
    return SyntheticCifar(dataset, folder, data, labels, names)


def write_pickle(path: Path, obj) -> None:
    """Overwrite one file with ``obj`` (for tests that damage a file's structure)."""
    _dump(Path(path), obj)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def make_archive(folder: Path, archive: Path) -> Path:
    """Pack ``folder`` as ``archive`` (tar.gz) with the folder name as the top-level entry."""
    folder = Path(folder)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return Path(archive)


def file_md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def md5_table(folder: Path, archive: Path | None = None) -> dict[str, str]:
    """``checksums=`` override holding the real md5 of every file (and the archive, if given)."""
    table = {p.name: file_md5(p) for p in Path(folder).iterdir() if p.is_file()}
    if archive is not None:
        table[Path(archive).name] = file_md5(archive)
    return table


@contextlib.contextmanager
def serve_directory(directory: Path):
    """Serve ``directory`` over HTTP on 127.0.0.1 (ephemeral port) in a thread; yields the
    base URL ending in "/"."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # keep pytest output clean
            pass

    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def make_cohort(num_nodes: int, *, model: str = "resnet20", num_classes: int = 10, seed: int = 0, lr: float = 0.1,
                precision: str = "fp32", channels_last: bool = False, runner=None, update: str = "simultaneous"):
    """A ``dml.Cohort`` of the recipe's peers on the CPU, with the runtime settings a test pins down:
    precision, memory format and runner (one thread in turn by default); nothing else of the fast path."""
    import torch

    from dml.config import TrainConfig
    from dml.distributed import LocalExchange
    from dml.engine import build_cohort
    from dml.runtime import Runtime

    cfg = TrainConfig(models=[model], num_nodes=num_nodes, seed=seed, lr=lr, precision=precision, device="cpu",
                      update=update)
    runtime = Runtime(torch.device("cpu"), precision, plain=True, num_peers=num_nodes)
    runtime.channels_last = channels_last
    if runner is not None:
        runtime.runner = runner
    return build_cohort(cfg, LocalExchange(num_nodes), runtime, num_classes)
