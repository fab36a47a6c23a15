"""The dataset types every loader returns, and the seeded subsets taken of them.

``ImageData`` is a whole dataset (its classes, normalisation and splits) and ``ImageSplit`` one
split of it: uint8 image tensors with int64 labels, read once into memory. ``load_cifar``
(cifar.py) and ``load_image_folder`` (folder.py) both return an ``ImageData``.
``balanced_subset`` and ``hold_out`` choose seeded, class-balanced parts of a split, for
``--train-samples`` / ``--test-samples`` and the validation split (``--val-samples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from .stream import FileSplit


@dataclass
class ImageSplit:
    """Images as uint8 (N, 3, H, W), contiguous, CPU (32x32 for CIFAR); labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> ImageSplit:
        return ImageSplit(images=self.images[index].contiguous(), labels=self.labels[index])


Split = Union[ImageSplit, "FileSplit"]  # in memory, or image files streamed from disk (stream.py)


@dataclass
class ImageData:
    """A dataset as uint8 image tensors: CIFAR's official files or an image folder."""

    dataset: str  # "cifar100", "cifar10" or "folder"
    num_classes: int
    class_names: list[str]
    train: Split
    test: Split
    mean: tuple[float, ...] = ()  # per-channel normalisation of images scaled to [0, 1]
    std: tuple[float, ...] = ()
    val: Split | None = None  # held out of the training images (--val-samples)
    image_size: int | None = None  # a streamed folder's: the side its images are cropped to
    how: str = ""  # how the run reads it, for its first console line ("in memory (...)", "streamed by ...")

    @property
    def streamed(self) -> bool:
        """Whether the images stay files on disk, decoded batch by batch (stream.py)."""
        return not isinstance(self.train, ImageSplit)


def balanced_subset(split: Split, n: int, seed: int, num_classes: int) -> Split:
    """A seeded, class-balanced subset of ``n`` samples, in the split's original order.

    Each class gets ``n // num_classes`` samples; the remainder goes one each to the first
    classes of a seeded random class order. A class with too few samples gives all it has and
    the shortfall is spread the same way over the classes that still have samples. With
    ``n == len(split)`` the split itself is returned.
    """
    if n == len(split.labels) and n >= 1:
        return split
    return split.take(_balanced_indices(split, n, seed, num_classes))


def hold_out(split: Split, n: int, seed: int, num_classes: int) -> tuple[Split, Split]:
    """(the rest, the held-out part): ``n`` samples chosen as :func:`balanced_subset` chooses them,
    and every other sample, each in the split's original order."""
    total = len(split.labels)
    if not 1 <= n < total:
        raise UserError(f"cannot hold out {n} of {total} training samples; choose between 1 and {total - 1}")
    held = _balanced_indices(split, n, seed, num_classes)
    keep = torch.ones(total, dtype=torch.bool)
    keep[held] = False
    return split.take(keep.nonzero().flatten()), split.take(held)


def _balanced_indices(split: Split, n: int, seed: int, num_classes: int) -> torch.Tensor:
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
