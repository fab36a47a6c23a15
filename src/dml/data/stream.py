"""Image folders streamed from disk: files listed once, images decoded, augmented and batched in the worker
processes of torch's DataLoader, each process loading only the rows of every batch that it computes.

For folders whose decoded images do not fit in memory (ImageNet's 1.28 M training images at 224 x 224 are
about 190 GB). Training images get ImageNet's standard augmentation: a random-resized crop (scale 0.08-1,
aspect ratio 3/4-4/3) to ``size`` x ``size`` and a horizontal flip with p = 0.5; evaluation resizes the short
side to ``size`` x 8/7 and takes the centre crop. With augmentation off a training image is resized to
``size`` x ``size``, exactly as the in-memory path decodes it (folder.py). Normalisation runs on the device,
as for the in-memory path.

Order and randomness come from the run's data generator in the main process, as the in-memory path's: every
epoch one permutation of the training images and, with augmentation, one seed per image drawn from it. Every
process draws the same; each loads its own rows of each batch. So the batches do not depend on the number of
workers or replicas, and the generator's state (saved with every checkpoint) resumes them exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ..errors import UserError
from .augment import Normalise
from .folder import decode, open_rgb

STATS_SAMPLE = 1000  # training images the normalisation statistics of a streamed folder are estimated from
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # ImageNet's random-resized crop
EVAL_RESIZE = 8 / 7  # evaluation: short side to size x 8/7 (256 for 224), then the centre crop
UNREADABLE = -1  # the label a worker gives an image it cannot read, so that the main process names the file


@dataclass
class FileSplit:
    """A split as image files and int64 labels (N,), decoded only when a batch needs them."""

    files: list[Path]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> FileSplit:
        return FileSplit([self.files[i] for i in index.tolist()], self.labels[index])


def default_workers() -> int:
    """DataLoader workers per process: the cores this process may use, less one for the training loop, shared
    with the other processes of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)


def random_resized_crop(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) of ImageNet's training crop: up to 10 draws of an area fraction in
    SCALE and a log-uniform aspect ratio in RATIO that fit the image, else the centre crop of the ratio clamped
    to RATIO."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def centre_crop_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The evaluation transform: (the size the image is resized to, the box of the centre crop in it)."""
    short = round(size * EVAL_RESIZE)
    scale = short / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    return (w, h), (left, top, left + size, top + size)


class DecodedImages(torch.utils.data.Dataset):
    """One image per item (index, seed): uint8 (3, size, size), or (views, 3, size, size), and its label.

    ``mode`` is "train" (random-resized crop and flip, seeded by the item's seed; one augmentation per view),
    "plain" (resized to size x size: training without augmentation) or "eval" (short side to size x 8/7, then
    the centre crop)."""

    def __init__(self, split: FileSplit, size: int, mode: str, views: int = 1):
        self.files, self.labels, self.size, self.mode, self.views = split.files, split.labels, size, mode, views

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._decode(*item)
        except UserError:  # told by the main process, which knows the file (UNREADABLE)
            shape = (
                (3, self.size, self.size)
                if self.views == 1 or self.mode != "train"
                else (self.views, 3, self.size, self.size)
            )
            return torch.zeros(shape, dtype=torch.uint8), torch.tensor(UNREADABLE)

    def _decode(self, index: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.files[index]
        if self.mode == "plain":
            pixels = decode(path, self.size)
        elif self.mode == "eval":
            pixels = self._eval(path)
        else:
            rng = np.random.default_rng(seed)
            image = open_rgb(path)
            views = [self._augment(image, rng) for _ in range(self.views)]
            pixels = views[0] if self.views == 1 else np.stack(views)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(pixels, -1, -3))), self.labels[index]

    def _augment(self, image, rng: np.random.Generator) -> np.ndarray:
        from PIL import Image

        width, height = image.size
        left, top, w, h = random_resized_crop(width, height, rng)
        # BILINEAR and FLIP_LEFT_RIGHT are set at import, out of the type checker's sight (as in folder.py)
        out = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))  # type: ignore[attr-defined]
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)  # type: ignore[attr-defined]
        return np.asarray(out, dtype=np.uint8)

    def _eval(self, path: Path) -> np.ndarray:
        from PIL import Image

        image = open_rgb(path)
        width, height = image.size
        resized, box = centre_crop_box(width, height, self.size)
        return np.asarray(image.resize(resized, Image.BILINEAR).crop(box), dtype=np.uint8)  # type: ignore[attr-defined]


class _Plan:
    """The batch sampler of a DataLoader whose batches the main process lays out before each pass: a list of
    [(index, seed), ...] per batch (read in the main process, so workers that persist see the new plan)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _checked(loader: torch.utils.data.DataLoader, plan: _Plan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches; a file that is not a readable image stops the run with one line naming it (training
    on without it would make the epoch's batches depend on which files fail)."""
    dataset = cast(DecodedImages, loader.dataset)
    for step, (x, y) in enumerate(loader):
        if bool((y == UNREADABLE).any()):
            index = plan.batches[step][int((y == UNREADABLE).nonzero()[0])][0]
            raise UserError(
                f"cannot read image {dataset.files[index]} (not an image, or damaged); replace or remove the file, "
                "then run the same command again (with --resume once an epoch is saved)"
            )
        yield x, y


def _loader(dataset: DecodedImages, plan: _Plan, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=plan,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,  # started once per run, not once per epoch
        prefetch_factor=4 if workers > 0 else None,
    )


class StreamedTrainBatches:
    """Shuffled, augmented training batches of a FileSplit, this replica's rows of each (``rows(n)`` gives the
    first and past-the-end row of a batch of n); the last partial batch is dropped. ``global_batch`` tells the
    cohort that a batch holds only this replica's rows of a batch of that size."""

    def __init__(
        self,
        split: FileSplit,
        size: int,
        batch_size: int,
        generator: torch.Generator,
        normalise: Normalise,
        *,
        augment: bool = True,
        views: int = 1,
        workers: int = 0,
        rows: Callable[[int], tuple[int, int]] = lambda n: (0, n),
    ):
        self.n, self.batch_size, self.generator, self.normalise = len(split), batch_size, generator, normalise
        self.augment, self.views, self.rows = augment, views, rows
        self.global_batch = batch_size
        self.plan = _Plan()
        mode = "train" if augment else "plain"
        self.loader = _loader(DecodedImages(split, size, mode, views), self.plan, workers, normalise.scale.is_cuda)

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.generator.device
        order = torch.randperm(self.n, generator=self.generator, device=device).cpu()
        steps, b = len(self), self.batch_size
        seeds = (
            torch.randint(0, 2**62, (steps, b), generator=self.generator, device=device).cpu()
            if self.augment
            else torch.zeros(steps, b, dtype=torch.int64)
        )
        start, end = self.rows(b)
        self.plan.batches = [
            list(zip(order[s * b + start : s * b + end].tolist(), seeds[s, start:end].tolist())) for s in range(steps)
        ]
        target = self.normalise.scale.device
        for x, y in _checked(self.loader, self.plan):
            x = x.to(target, non_blocking=True)
            if self.views > 1:  # (batch, views, ...) from the workers -> (views, batch, ...)
                yield torch.stack([self.normalise(x[:, v]) for v in range(self.views)]), y.to(target)
            else:
                yield self.normalise(x), y.to(target, non_blocking=True)


class StreamedTestBatches:
    """The evaluation images of a FileSplit in order, in batches of ``batch_size``: this replica's rows of each
    (``rows`` as for StreamedTrainBatches), normalised on the device. Iterable once per evaluation."""

    def __init__(
        self,
        split: FileSplit,
        size: int,
        batch_size: int,
        normalise: Normalise,
        *,
        workers: int = 0,
        rows: Callable[[int], tuple[int, int]] = lambda n: (0, n),
    ):
        self.normalise, self.size = normalise, size
        self.rows_per_batch = []
        self.plan = _Plan()
        for begin in range(0, len(split), batch_size):
            start, end = rows(min(batch_size, len(split) - begin))
            self.rows_per_batch.append(end - start)
            if end > start:  # a replica may hold no row of a short last batch: it still joins that batch
                self.plan.batches.append([(i, 0) for i in range(begin + start, begin + end)])
        self.loader = _loader(DecodedImages(split, size, "eval"), self.plan, workers, normalise.scale.is_cuda)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        target = self.normalise.scale.device
        loaded = _checked(self.loader, self.plan)
        for rows in self.rows_per_batch:
            if rows == 0:
                empty = torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8, device=target)
                yield self.normalise(empty), torch.zeros(0, dtype=torch.int64, device=target)
                continue
            x, y = next(loaded)
            yield self.normalise(x.to(target, non_blocking=True)), y.to(target, non_blocking=True)


def estimate_stats(split: FileSplit, size: int, workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images scaled to [0, 1], from a fixed sample of at most
    STATS_SAMPLE of them resized to size x size (the same sample whenever the same folder is read; all of a small
    folder, whose statistics are then those the in-memory path computes)."""
    from .folder import channel_stats

    n = len(split)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: min(n, STATS_SAMPLE)].sort().values
    plan = _Plan()
    plan.batches = [[(int(i), 0) for i in part] for part in chosen.split(100)]
    images = torch.cat(
        [x for x, _ in _checked(_loader(DecodedImages(split, size, "plain"), plan, workers, False), plan)]
    )
    return channel_stats(images)
