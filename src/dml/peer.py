"""A peer: a model with its optimizer and (optional) schedule, and the state that resumes it.

A peer without an optimizer is frozen (a teacher): it stays in evaluation mode, computes its logits
without a graph and is never saved again. A peer whose "optimizer" is ``MeanOf(i)`` is a temporal
mean of peer i: never trained by gradients, it follows its source's weights after every step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .models import folder_name


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for one purpose (e.g. ("init", 2)), independent of every other purpose.

    Peers draw their initial weights from their own derived seed, so a peer starts from the same
    weights whichever process builds it and whatever other peers exist.
    """
    text = ":".join(str(p) for p in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class MeanOf:
    """In place of a peer's optimizer: the peer is the exponential moving average of peer ``source``
    (the temporal mean, or "mean teacher", of PCL and Mean Teacher). After the t-th optimizer step of
    its source, each parameter w <- (1 - a_t) * w + a_t * w_source with a_t = max(1 / t, 1 - decay). It
    starts as a copy of its source and computes in training mode, as Mean Teacher's code runs its EMA
    model: its BatchNorm layers normalise with the batch's statistics, and their running statistics
    (used to evaluate it) are its own, moved by its own forward passes, not averaged.

    a_t makes the mean the plain average of the source's weights over its steps until the exponential
    average weighs recent steps more (t > 1 / (1 - decay)), a warm-up like Mean Teacher's and PCL's code
    (theirs weighs the source 1/2 at the first update, 1 / (t + 1), where this one copies it); without
    it the initial weights keep 0.999^t of the mean, 21 % after two CIFAR epochs of batch 64. Running
    statistics averaged like the weights (timm's ModelEmaV2) describe no weights the mean has: measured
    on a PCL run (CIFAR-100, 100 images a class, ResNet-20, 30 epochs, decay 0.999), the mean of branch 1
    scored 39.7 % with averaged statistics and 42.3 % once they were re-estimated on the training
    images, where its branch stayed at 44.0 / 44.2 %. Trained again with statistics of its own (and
    decay 0.975), the mean scored 44.5 %, and re-estimating its statistics left it there (44.3 %)."""

    source: int
    decay: float = 0.999

    def __post_init__(self):
        if isinstance(self.source, bool) or not isinstance(self.source, int) or self.source < 0:
            raise ValueError(f"a mean's source is a peer's index, not {self.source!r}")
        if not (isinstance(self.decay, (int, float)) and math.isfinite(self.decay) and 0 < self.decay < 1):
            raise ValueError(f"decay must be a number between 0 and 1 (exclusive), got {self.decay!r}")


@dataclass
class Peer:
    index: int  # position in the cohort, 0..K-1
    model_name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    best_acc: float = float("-inf")
    best_epoch: int = 0
    mean_of: MeanOf | None = None  # a temporal mean: of which peer, with which decay
    updates: int = 0  # a temporal mean: how many steps of its source it has followed

    @property
    def label(self) -> str:
        """The peer's folder and display name, as the seed named them: ``0_resnet32``."""
        return f"{self.index}_{folder_name(self.model_name)}"

    @property
    def trains(self) -> bool:
        """Learns from its gradients (has an optimizer)."""
        return self.optimizer is not None

    @property
    def frozen(self) -> bool:
        """A teacher: never changes and is never saved."""
        return self.optimizer is None and self.mean_of is None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0

    @torch.no_grad()
    def follow(self, source: Peer) -> None:
        """A temporal mean's update after a step of its ``source`` (see ``MeanOf``): its parameters only."""
        assert self.mean_of is not None  # only a temporal mean follows
        self.updates += 1
        weight = max(1.0 / self.updates, 1.0 - self.mean_of.decay)
        mine: list[torch.Tensor] = list(self.model.parameters())
        theirs: list[torch.Tensor] = list(source.model.parameters())
        torch._foreach_lerp_(mine, theirs, weight)  # one multi-tensor kernel per step

    def state_dict(self) -> dict:
        if self.mean_of is not None:
            return {
                "index": self.index,
                "model_name": self.model_name,
                "model": self.model.state_dict(),
                "mean_of": self.mean_of.source,
                "decay": self.mean_of.decay,
                "updates": self.updates,
                "best_acc": self.best_acc,
                "best_epoch": self.best_epoch,
            }
        assert self.optimizer is not None  # a frozen peer is never saved
        return {
            "index": self.index,
            "model_name": self.model_name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
        }

    def _expected_state(self) -> dict:
        """This peer's state without the model, plus the momentum buffers SGD creates at its first step."""
        fresh = self.state_dict()
        if self.optimizer is None:  # does not train
            return {k: v for k, v in fresh.items() if k != "model"}
        params = [q for group in self.optimizer.param_groups for q in group["params"]]
        fresh["optimizer"]["state"] = {i: {"momentum_buffer": q.detach()} for i, q in enumerate(params)}
        return {k: v for k, v in fresh.items() if k != "model"}

    def load_state_dict(self, state: dict) -> None:
        """Load what state_dict() saved; ValueError / TypeError where ``state`` is not built like it.

        The model's own load checks names and shapes; everything else is checked here first.
        """
        _check_like(self._expected_state(), {k: v for k, v in state.items() if k != "model"}, "checkpoint")
        updates = state.get("updates", 0)
        if self.mean_of is not None and (type(updates) is not int or updates < 0):
            raise ValueError(f"checkpoint['updates'] should be a step count (an int >= 0), not {updates!r}")
        if self.mean_of is not None and (state.get("mean_of"), state.get("decay")) != (
            self.mean_of.source,
            self.mean_of.decay,
        ):
            raise ValueError(
                f"the state is not that of a mean of peer {self.mean_of.source} with decay {self.mean_of.decay}"
            )
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:  # trains
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.best_acc = state["best_acc"]
        self.best_epoch = state["best_epoch"]
        if self.mean_of is not None:  # a mean saved without its count followed at 1 - decay from the start
            self.updates = state.get("updates", math.ceil(1.0 / (1.0 - self.mean_of.decay)))


def _kind(value) -> str:
    """int and float are one kind (a setting may be saved as either); bool and None their own."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return type(value).__name__


def _check_like(fresh, loaded, where: str) -> None:
    """ValueError where ``loaded`` is not built like ``fresh``, the same state of a new peer.

    load_state_dict takes many wrong values as they are (a best_acc of None, an lr that is a
    string), and training would then fail with a traceback epochs later. Entries only one side
    has are left alone: optimizers and schedulers of other torch versions add or drop some.
    """
    if isinstance(fresh, dict):
        if not isinstance(loaded, dict):
            raise TypeError(f"{where} is a {type(loaded).__name__}, not a dict")
        for key in fresh.keys() & loaded.keys():
            _check_like(fresh[key], loaded[key], f"{where}[{key!r}]")
    elif isinstance(fresh, (list, tuple)):
        if not isinstance(loaded, (list, tuple)) or len(loaded) != len(fresh):
            raise ValueError(f"{where} should be a list of {len(fresh)}")
        for i, (a, b) in enumerate(zip(fresh, loaded)):
            _check_like(a, b, f"{where}[{i}]")
    elif isinstance(fresh, torch.Tensor):
        if not isinstance(loaded, torch.Tensor) or loaded.shape != fresh.shape or loaded.dtype != fresh.dtype:
            raise ValueError(f"{where} should be a {fresh.dtype} tensor of shape {tuple(fresh.shape)}")
    elif _kind(loaded) != _kind(fresh):
        raise ValueError(f"{where} should be a {_kind(fresh)}, not a {_kind(loaded)}")


def names_flag(flag: str, names: list[str]) -> str:
    """``flag`` followed by ``names``, one name where all are the same: e.g. ``--models x:y``."""
    unique = list(dict.fromkeys(names))
    return " ".join([flag, *(unique if len(unique) == 1 else names)])


def one_or_each(flag: str, named: Sequence[str] | None, count: int, what: str) -> list[str | None]:
    """The names a flag gives ``count`` of ``what`` (one for all, or one each); None each where not given."""
    if named is None:
        return [None] * count
    if len(named) not in (1, count):
        things = what if count == 1 else f"{what}s"
        raise UserError(
            f"{flag} lists {len(named)} names for {count} {things}; give one name (for all of them) or one per {what}"
        )
    each: list[str | None] = list(named)
    return each * count if len(named) == 1 else each
