"""One entry point for every dataset ``dml`` reads: CIFAR's official files or an image folder."""

from __future__ import annotations

from .cifar import load_cifar
from .dataset import ImageData
from .folder import load_image_folder


def load_dataset(
    dataset: str,
    data_dir: str,
    *,
    image_size: int | None = None,
    download: bool = True,
    url: str | None = None,
    skip_checksum: bool = False,
    progress: bool = True,
) -> ImageData:
    if dataset == "folder":
        return load_image_folder(data_dir, image_size, progress)
    return load_cifar(data_dir, dataset, download=download, url=url, skip_checksum=skip_checksum, progress=progress)
