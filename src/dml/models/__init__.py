"""Model registry: ``create_model(name, num_classes)`` for every network a cohort may hold.

A name is a registered network (``resnet32``) or an import path ``package.module:factory`` of a
callable that takes ``num_classes`` and returns an ``nn.Module``, imported from the current
directory or PYTHONPATH. The registry itself imports no torch: the command line reads its names
for ``--help``, and torch loads with the first network built.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def _cifar_resnet(depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .cifar_resnet import CifarResNet

        return CifarResNet(depth, num_classes)

    return build


def _wide_resnet(depth: int, width: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .wide_resnet import WideResNet

        return WideResNet(depth, width, num_classes)

    return build


def _imagenet_resnet(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from . import imagenet_resnet

        return getattr(imagenet_resnet, name)(num_classes)

    return build


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet44": _cifar_resnet(44),
    "resnet56": _cifar_resnet(56),
    "resnet110": _cifar_resnet(110),
    "wrn28_2": _wide_resnet(28, 2),
    "wrn28_10": _wide_resnet(28, 10),
    "resnet18": _imagenet_resnet("resnet18"),  # ImageNet's: a 7x7 stride-2 stem, for large images
    "resnet50": _imagenet_resnet("resnet50"),
}
MODEL_NAMES = tuple(MODELS)


class ModelImportError(ValueError):
    """The module of a ``package.module:factory`` name cannot be imported (not found, or failing)."""


def is_import_path(name: str) -> bool:
    return ":" in name


def model_factory(name: str) -> Callable[[int], nn.Module]:
    """The callable that builds ``name``; ValueError naming what is wrong where there is none."""
    if name in MODELS:
        return MODELS[name]
    if not is_import_path(name):
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}, "
            "or package.module:factory for a network of your own"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {name!r}: an import path reads package.module:factory")
    if module_name.partition(".")[0] in sys.stdlib_module_names:
        # a checkpoint names its model: never let one reach into the standard library
        raise ValueError(f"model {name!r}: {module_name} is a standard-library module, not a network")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # the current directory, as `python -m` would have it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelImportError(f"model {name!r}: cannot import {module_name!r} ({first})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {module_name} has no callable {attr!r}")
    _check_signature(name, factory)
    return factory


def _check_signature(name: str, factory: Callable) -> None:
    """A factory is called with one argument, the class count: say so before a run starts, not as a
    TypeError from deep inside it."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none to read: calling them will tell
        return
    try:
        signature.bind(100)
    except TypeError:
        raise ValueError(
            f"model {name!r}: {name.replace(':', '.')}{signature} cannot be called as "
            "factory(num_classes) -> nn.Module: a factory takes one argument, the number of classes, "
            "and returns the network"
        ) from None


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """Build the network ``name`` (registered, or ``package.module:factory``) with a ``num_classes``-way
    classifier. ValueError for an unknown name, a failed import or a factory that cannot take
    ``num_classes``; TypeError where a factory does not return an ``nn.Module``."""
    from torch import nn

    model = model_factory(name)(num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def folder_name(name: str) -> str:
    """``name`` as it can appear in a file name: ``mynets:tiny`` -> ``mynets-tiny``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
