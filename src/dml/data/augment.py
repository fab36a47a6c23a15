"""Batched CIFAR augmentation on uint8 tensors, on whatever device the images live.

One gather does the whole training transform of a batch: every sample gets its own crop offset
(0..2*pad in each direction of the zero-padded image) and its own horizontal flip, drawn from a
torch.Generator so that the same seed yields the same batches.
"""

from __future__ import annotations

import torch

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NORMALISATION = {"cifar100": (CIFAR100_MEAN, CIFAR100_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}


def draw_crop_and_flip(
    batch: int, pad: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample offsets (dy, dx) uniform over 0..2*pad and flips with p = 0.5."""
    device = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=device)
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    return offsets[0], offsets[1], flips


def crop_and_flip(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor, pad: int
) -> torch.Tensor:
    """Random-crop of zero-padded images, then optional horizontal flip, as one gather.

    out[b, c, y, x] = padded[b, c, dy[b] + y, dx[b] + (W-1-x if flips[b] else x)]
    where ``padded`` is ``images`` with ``pad`` zero pixels on each side.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    ys = torch.arange(h, device=images.device)
    xs = torch.arange(w, device=images.device)
    rows = dy[:, None] + ys  # (B, H)
    cols = dx[:, None] + torch.where(flips[:, None], (w - 1) - xs, xs)  # (B, W)
    b_idx = torch.arange(n, device=images.device)[:, None, None, None]
    c_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[b_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


class Normalise:
    """uint8 images -> float (x/255 - mean) / std, optionally in channels_last memory format."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = images.float() * self.scale - self.shift
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The seed's training transform minus normalisation: pad-4 random 32x32 crop, random flip."""
    dy, dx, flips = draw_crop_and_flip(images.shape[0], pad, generator)
    return crop_and_flip(images, dy, dx, flips, pad)
