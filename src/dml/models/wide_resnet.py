"""Wide ResNets (Zagoruyko & Komodakis, 2016): WRN-depth-k with pre-activation blocks.

Depth 6n+4; stages of 16k/32k/64k channels; a 1x1 convolution shortcut where the shape changes.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_like_seed


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # Where the shape changes, the shortcut also sees the pre-activated input.
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + residual


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 100, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, in_ch = [], 16
        for i, width in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if i > 0 and b == 0 else 1
                blocks.append(PreActBlock(in_ch, width, stride, dropout))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        init_like_seed(self, he_classifier=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

    # A split at a stage boundary, for branches on a shared trunk (dml.branches):
    # forward(x) == fc(pool(tail(trunk(x, s), s))) for every s in 1..stages - 1.
    stages = 3

    def trunk_modules(self, shared: int) -> list[str]:
        """The modules of the stem and the first ``shared`` stages, by name."""
        per_stage = len(self.blocks) // self.stages
        return ["conv1", *(f"blocks.{i}" for i in range(per_stage * shared))]

    def trunk_channels(self, shared: int) -> int:
        last = cast(PreActBlock, self.blocks[len(self.blocks) // self.stages * shared - 1])  # the trunk's last block
        return last.conv2.out_channels

    def trunk(self, x: torch.Tensor, shared: int) -> torch.Tensor:
        return self.blocks[: len(self.blocks) // self.stages * shared](self.conv1(x))

    def tail(self, h: torch.Tensor, shared: int) -> torch.Tensor:
        """The feature map after the last stage (its final BatchNorm and ReLU), from the trunk's output ``h``."""
        return F.relu(self.bn(self.blocks[len(self.blocks) // self.stages * shared :](h)))
