"""One entry point for every dataset ``dml`` reads: CIFAR's official files or an image folder, held in memory
or streamed from disk (the choice made here, once: ``choose_loader``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .cifar import load_cifar
from .dataset import ImageData
from .folder import list_folder, load_image_folder

MEMORY_SHARE = 0.25  # auto: decoded images may take this share of the memory available to each local process


def load_dataset(
    dataset: str,
    data_dir: str,
    *,
    image_size: int | None = None,
    download: bool = True,
    url: str | None = None,
    skip_checksum: bool = False,
    progress: bool = True,
    loader: str = "memory",
    workers: int = 0,
) -> ImageData:
    """The dataset, in memory (uint8 tensors) or, with ``loader="stream"`` (folders only), as image files that
    training decodes batch by batch (stream.py)."""
    if dataset == "folder" and loader == "stream":
        return _streamed_folder(Path(data_dir).expanduser(), image_size, workers)
    if dataset == "folder":
        return load_image_folder(data_dir, image_size, progress)
    return load_cifar(data_dir, dataset, download=download, url=url, skip_checksum=skip_checksum, progress=progress)


def choose_loader(dataset: str, data_dir: str, image_size: int | None, requested: str) -> tuple[str, str]:
    """("memory" or "stream", why): CIFAR is read whole; a folder is streamed where its decoded images would
    take more than MEMORY_SHARE of the memory available to each process of this machine, or where asked."""
    if dataset != "folder":
        if requested == "stream":
            raise UserError(f"--data-loader stream reads image folders; {dataset} is read whole (it fits in memory)")
        return "memory", f"{dataset} fits in memory"
    if requested == "stream" and image_size is None:
        raise UserError("a streamed folder crops every image to --image-size S; pass it (224 for ImageNet)")
    if requested != "auto":
        return requested, f"--data-loader {requested}"
    root = Path(data_dir).expanduser()
    _, files = list_folder(root)
    count = sum(len(v) for split in files.values() for v in split.values())
    if image_size is None:
        first = next(iter(files["train"].values()))[0]
        from .folder import open_rgb

        width, height = open_rgb(first).size
    else:
        width = height = image_size
    need, budget = count * 3 * width * height, _memory_budget()
    if need <= budget or image_size is None:  # without --image-size only the in-memory path can read it
        return "memory", f"{_gb(need)} decoded, within {_gb(budget)}"
    return "stream", f"{_gb(need)} decoded, more than {_gb(budget)}"


def _streamed_folder(root: Path, image_size: int | None, workers: int) -> ImageData:
    import torch

    from .stream import FileSplit, estimate_stats

    assert image_size is not None  # choose_loader requires it for a stream
    names, files = list_folder(root)
    splits = {}
    for split, classes in files.items():
        paths = [path for name in names for path in classes[name]]
        labels = [label for label, name in enumerate(names) for _ in classes[name]]
        splits[split] = FileSplit(paths, torch.tensor(labels, dtype=torch.int64))
    mean, std = estimate_stats(splits["train"], image_size, workers)
    return ImageData("folder", len(names), names, splits["train"], splits["test"], mean, std, image_size=image_size)


def _memory_budget() -> int:
    """MEMORY_SHARE of the memory available now, per process of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    available = None
    try:
        with open("/proc/meminfo") as info:
            available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(available * MEMORY_SHARE) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
