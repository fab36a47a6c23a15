"""A network of your own: any callable that takes num_classes and returns an nn.Module.

    dml train --models mynets:small_cnn --num-nodes 2 ...     (run from this folder)
"""

from torch import nn


def small_cnn(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


class SplitCNN(nn.Module):
    """A network dml can split into a trunk and branches (dml.Branches, a graph file's [[trunk]]): a stem
    and `stages` stages, with the methods that say where each stage is. A [[trunk]] with shared = s
    shares the stem and the first s stages; every branch keeps the rest and its classifier `fc`."""

    stages = 2

    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList([_stage(16, 32), _stage(32, 64)])
        self.fc = nn.Linear(64, num_classes)

    def trunk_modules(self, shared: int) -> list[str]:
        """The names of the modules the trunk holds: the other branches use these in place of theirs."""
        return ["stem", *(f"blocks.{i}" for i in range(shared))]

    def trunk_channels(self, shared: int) -> int:
        return self.blocks[shared - 1][0].out_channels

    def trunk(self, x, shared: int):
        x = self.stem(x)
        for stage in self.blocks[:shared]:
            x = stage(x)
        return x

    def tail(self, h, shared: int):
        """The last feature map (before pooling) from the trunk's output."""
        for stage in self.blocks[shared:]:
            h = stage(h)
        return h

    def forward(self, x):  # fc(pool(tail(trunk(x, s), s))) for every s
        return self.fc(self.tail(self.trunk(x, 0), 0).mean((2, 3)))


def _stage(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=2, padding=1), nn.BatchNorm2d(outputs), nn.ReLU())


def split_cnn(num_classes: int) -> nn.Module:
    return SplitCNN(num_classes)
