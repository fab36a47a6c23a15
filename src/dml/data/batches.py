"""Training and test batches straight from uint8 image tensors: no DataLoader, no per-image work."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .augment import Normalise, augment_batch


class TrainBatches:
    """Shuffled, augmented training batches; the last partial batch is dropped.

    Shuffling and augmentation draw from one generator, so the batch sequence depends only on its
    seed (and its state, which a checkpoint stores to resume mid-run).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        generator: torch.Generator,
        normalise: Normalise,
        views: int = 1,
        augment: bool = True,
    ):
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.generator = generator
        self.normalise = normalise
        self.views = views  # > 1: each batch as that many augmentations of its images, stacked (views, batch, ...)
        self.augment = augment  # False: the images as they are (nothing drawn but the order)

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.images.shape[0], generator=self.generator, device=self.generator.device)
        order = order.to(self.images.device)
        for step in range(len(self)):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            if not self.augment:
                batch = self.normalise(self.images[idx])
                yield (batch if self.views == 1 else torch.stack([batch] * self.views)), self.labels[idx]
            elif self.views == 1:
                yield self.normalise(augment_batch(self.images[idx], self.generator)), self.labels[idx]
            else:
                batch = self.images[idx]
                yield (
                    torch.stack([self.normalise(augment_batch(batch, self.generator)) for _ in range(self.views)]),
                    self.labels[idx],
                )


def test_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalise: Normalise
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Test images in order, normalised only."""
    for start in range(0, images.shape[0], batch_size):
        yield normalise(images[start : start + batch_size]), labels[start : start + batch_size]


# not a pytest test despite its name (mypy knows no attributes of a function; ruff prefers this to setattr)
test_batches.__test__ = False  # type: ignore[attr-defined]
