"""Peers: a model with its optimizer and schedule, and the state that resumes it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig
from .models import create_model


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for one purpose (e.g. ("init", 2)), independent of every other purpose.

    Peers draw their initial weights from their own derived seed, so a peer starts from the same
    weights whichever process builds it and whatever other peers exist.
    """
    text = ":".join(str(p) for p in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass
class Peer:
    index: int  # position in the cohort, 0..K-1
    model_name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    best_acc: float = float("-inf")
    best_epoch: int = 0

    @property
    def label(self) -> str:
        """The peer's folder and display name, as the seed named them: ``0_resnet32``."""
        return f"{self.index}_{self.model_name}"

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "index": self.index,
            "model_name": self.model_name,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_acc = state["best_acc"]
        self.best_epoch = state["best_epoch"]


def build_peer(cfg: TrainConfig, index: int, num_classes: int, device: torch.device, channels_last: bool) -> Peer:
    """Peer ``index`` of the cohort with the recipe's SGD and per-epoch cosine schedule."""
    name = cfg.models[index]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", index))
        model = create_model(name, num_classes)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # foreach: one multi-tensor update instead of a Python loop over ~100 parameters (a few % on CPU).
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, nesterov=cfg.nesterov,
        foreach=not cfg.plain,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=0.0)
    return Peer(index, name, model, optimizer, scheduler)
