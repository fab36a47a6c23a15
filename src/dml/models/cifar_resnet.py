"""CIFAR ResNets of He et al. (2016), section 4.2: depth 6n+2, three stages of 16/32/64 channels.

Shortcuts are "option A": the identity, and where the shape changes a stride-2 subsampling whose
missing channels are zeros. This parameter-free shortcut is what gives resnet32 its 470,004
parameters for 100 classes (a 1x1-convolution shortcut trains measurably differently).
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .init import init_like_seed


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 in space; channels ``in_ch..out_ch-1`` are zeros.

    The zeros go after the input's channels, as in the seed system: with the same weights the two
    networks then compute the same function (zeros on both sides would be a channel permutation).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = ZeroPadShortcut(in_ch, out_ch) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_ch = [], 16
        for i, width in enumerate((16, 32, 64)):
            for b in range(blocks_per_stage):
                stride = 2 if i > 0 and b == 0 else 1
                stages.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        init_like_seed(self, he_classifier=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

    # A split at a stage boundary, for branches on a shared trunk (dml.branches):
    # forward(x) == fc(pool(tail(trunk(x, s), s))) for every s in 1..stages - 1.
    stages = 3

    def trunk_modules(self, shared: int) -> list[str]:
        """The modules of the stem and the first ``shared`` stages, by name."""
        per_stage = len(self.blocks) // self.stages
        return ["conv1", "bn1", *(f"blocks.{i}" for i in range(per_stage * shared))]

    def trunk_channels(self, shared: int) -> int:
        last = cast(BasicBlock, self.blocks[len(self.blocks) // self.stages * shared - 1])  # the trunk's last block
        return last.conv2.out_channels

    def trunk(self, x: torch.Tensor, shared: int) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.blocks[: len(self.blocks) // self.stages * shared](out)

    def tail(self, h: torch.Tensor, shared: int) -> torch.Tensor:
        """The feature map after the last stage, from the trunk's output ``h``."""
        return self.blocks[len(self.blocks) // self.stages * shared :](h)

    @torch.no_grad()
    def folded(self) -> CifarResNet:
        """An evaluation-mode copy with every BatchNorm folded into the convolution before it.

        The same function of the input (up to rounding) with a third fewer operations; it uses the
        running statistics as they are now, so fold again after more training.
        """
        model = copy.deepcopy(self).eval()
        for owner in (model, *model.blocks):
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
                if isinstance(getattr(owner, bn, None), nn.modules.batchnorm._BatchNorm):  # synced ones too
                    setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
                    setattr(owner, bn, nn.Identity())
        return model
