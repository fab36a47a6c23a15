"""Model registry: ``create_model(name, num_classes)`` for every network a cohort may hold."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cifar_resnet import CifarResNet
from .wide_resnet import WideResNet

MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": lambda num_classes: CifarResNet(20, num_classes),
    "resnet32": lambda num_classes: CifarResNet(32, num_classes),
    "resnet44": lambda num_classes: CifarResNet(44, num_classes),
    "resnet56": lambda num_classes: CifarResNet(56, num_classes),
    "resnet110": lambda num_classes: CifarResNet(110, num_classes),
    "wrn28_2": lambda num_classes: WideResNet(28, 2, num_classes),
    "wrn28_10": lambda num_classes: WideResNet(28, 10, num_classes),
}
MODEL_NAMES = tuple(MODELS)


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build the network registered as ``name`` with a ``num_classes``-way classifier."""
    try:
        build = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
    return build(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
