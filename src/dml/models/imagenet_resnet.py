"""ImageNet ResNets of He et al. (2016): resnet18 (basic blocks) and resnet50 (bottlenecks).

The standard layout: a 7x7 stride-2 stem with 3x3 max pooling, four stages of 64/128/256/512 channels
(times 4 for bottlenecks), 1x1-convolution shortcuts where the shape changes, global average pooling and a
linear classifier; 11,689,512 and 25,557,032 parameters for 1,000 classes. The module and parameter names
follow the common layout (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``fc``), so a state_dict of that
layout loads. Convolutions start He-normal on their fan-out, BatchNorm at weight 1 and bias 0.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_conv_or_norm


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(in_ch, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # the stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ImageNetResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stage = []
            for b in range(blocks):
                stage.append(block(in_ch, width, 2 if i > 1 and b == 0 else 1))
                in_ch = width * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*stage))
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            init_conv_or_norm(m)  # the classifier keeps torch's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.tail(self.trunk(x, 0), 0), 1).flatten(1))

    # A split at a stage boundary, for branches on a shared trunk (dml.branches):
    # forward(x) == fc(pool(tail(trunk(x, s), s))) for every s in 1..stages - 1.
    stages = 4

    def _stage(self, i: int) -> nn.Sequential:
        return getattr(self, f"layer{i + 1}")

    def trunk_modules(self, shared: int) -> list[str]:
        """The modules of the stem and the first ``shared`` stages, by name."""
        return ["conv1", "bn1", *(f"layer{i + 1}" for i in range(shared))]

    def trunk_channels(self, shared: int) -> int:
        last = self._stage(shared - 1)[-1]
        return last.conv3.out_channels if isinstance(last, Bottleneck) else cast(BasicBlock, last).conv2.out_channels

    def trunk(self, x: torch.Tensor, shared: int) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(shared):
            out = self._stage(i)(out)
        return out

    def tail(self, h: torch.Tensor, shared: int) -> torch.Tensor:
        """The feature map after the last stage, from the trunk's output ``h``."""
        for i in range(shared, self.stages):
            h = self._stage(i)(h)
        return h


def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes)
