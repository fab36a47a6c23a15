"""Image folders: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (png, jpg), decoded once with
Pillow into the uint8 tensors that CIFAR uses, so training runs the same batched pipeline.

Class names are the sorted folder names, the same set in both splits. Every image must have one
size, or ``image_size`` resizes each to a square of that side. Normalisation statistics (per
channel mean and std) are computed from the training images. Hidden files (``.name``) are skipped;
anything else that is not a readable png or jpg is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from .dataset import ImageData, ImageSplit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")


def load_image_folder(root: str | Path, image_size: int | None = None, progress: bool = True) -> ImageData:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` into an ``ImageData`` (dml.data.dataset).

    Its ``train`` and ``test`` are each an ``ImageSplit``: ``images`` uint8 (N, 3, H, W), ``labels``
    int64 (N,), the index of the class in ``class_names`` (the sorted folder names). ``dataset`` is
    "folder", ``num_classes`` the number of classes, and ``mean`` / ``std`` the per-channel statistics
    of the training images scaled to [0, 1]. ``image_size`` resizes every image to a square of that
    side; ``progress`` shows a progress bar while decoding. A problem with the folder is a ``UserError``.
    """
    root = Path(root).expanduser()
    names, files = list_folder(root)
    total = sum(len(v) for split in SPLITS for v in files[split].values())
    with tqdm(
        total=total, desc=f"decoding {root.name or root}", unit="img", disable=None if progress else True, leave=False
    ) as bar:
        splits = {split: _decode_split(files[split], names, image_size, bar) for split in SPLITS}
    shapes = {split: tuple(splits[split].images.shape[1:]) for split in SPLITS}
    if shapes["train"] != shapes["test"]:
        raise UserError(
            f"{root}: training images are {_size(shapes['train'])} but test images "
            f"{_size(shapes['test'])}; pass --image-size to resize both"
        )
    mean, std = channel_stats(splits["train"].images)
    return ImageData("folder", len(names), names, splits["train"], splits["test"], mean, std)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (float64 sums: exact enough for 1e6 pixels)."""
    # in blocks of 1,000 images: the whole folder in float64 was 8 times its decoded size (2.4 GB for 20,000
    # images at 64 x 64, measured), the largest allocation of a run
    blocks = images.split(1000)
    pixels = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sum(b.to(torch.float64).sum(dim=(0, 2, 3)) for b in blocks) / (255.0 * pixels)
    centred = (((b.to(torch.float64) / 255.0 - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) for b in blocks)
    std = (sum(centred) / pixels).sqrt().clamp_min(1e-6)  # a constant channel would divide by zero
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def list_folder(root: Path) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """The class names (sorted) and, per split ("train", "test"), each class's image files (sorted). The test
    split is ``root/test``, or ``root/val`` where there is no test folder (ImageNet's layout)."""
    files = {split: _list_split(root, split) for split in SPLITS}
    classes = {split: sorted(files[split]) for split in SPLITS}
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        test = _split_folder(root, "test").name
        raise UserError(
            f"{root}: train/ and {test}/ hold different classes (only in train: {only_train or 'none'}; "
            f"only in {test}: {only_test or 'none'}); give both splits the same class folders"
        )
    return classes["train"], files


def _split_folder(root: Path, split: str) -> Path:
    if split == "test" and not (root / "test").is_dir() and (root / "val").is_dir():
        return root / "val"
    return root / split


def _list_split(root: Path, split: str) -> dict[str, list[Path]]:
    folder = _split_folder(root, split)
    if not folder.is_dir():
        raise UserError(
            f"{folder} is not a folder: an image folder dataset needs {root}/train/<class>/ and "
            f"{root}/test/<class>/ (or {root}/val/<class>/)"
        )
    classes = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise UserError(f"{entry} is not a class folder: {folder} may hold only one folder per class")
        images = []
        for path in sorted(entry.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{path} is not a png or jpg image; remove it from the class folder")
            images.append(path)
        if not images:
            raise UserError(f"class folder {entry} holds no images; remove it or add its images")
        classes[entry.name] = images
    if not classes:
        raise UserError(f"{folder} holds no class folders")
    return classes


def _decode_split(files: dict[str, list[Path]], names: list[str], image_size: int | None, bar) -> ImageSplit:
    images, labels = [], []
    first: tuple[Path, tuple[int, int]] | None = None
    for label, name in enumerate(names):
        for path in files[name]:
            pixels = decode(path, image_size)
            if first is None:
                first = (path, pixels.shape[:2])
            elif pixels.shape[:2] != first[1]:
                raise UserError(
                    f"{path} is {_size(pixels.shape[:2])} but {first[0]} is {_size(first[1])}; "
                    "pass --image-size to resize every image to one size"
                )
            images.append(pixels)
            labels.append(label)
            bar.update()
    array = np.stack(images).transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    return ImageSplit(torch.from_numpy(np.ascontiguousarray(array)), torch.tensor(labels, dtype=torch.int64))


def open_rgb(path: Path):
    """The image at ``path`` decoded as RGB (grayscale, palette, CMYK and alpha images converted), a PIL image;
    a file that is not a readable image is a UserError naming it."""
    from PIL import Image, UnidentifiedImageError  # imported here: only folder datasets need Pillow

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path} ({type(exc).__name__}); replace or remove the file") from None


def decode(path: Path, image_size: int | None) -> np.ndarray:
    """The image at ``path`` as uint8 (H, W, 3), resized to image_size x image_size where given."""
    from PIL import Image

    image = open_rgb(path)
    if image_size is not None and image.size != (image_size, image_size):
        # set from Image.Resampling at import, out of the type checker's sight (Resampling needs pillow 9.1)
        image = image.resize((image_size, image_size), Image.BILINEAR)  # type: ignore[attr-defined]
    return np.asarray(image, dtype=np.uint8)


def _size(shape) -> str:
    return f"{shape[-1]}x{shape[-2]}" if len(shape) == 3 else f"{shape[1]}x{shape[0]}"
