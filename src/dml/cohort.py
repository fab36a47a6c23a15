"""``dml.Cohort``: peers that learn from each other, usable in any training loop.

    cohort = dml.Cohort(models=[net_a, net_b], optimizers=[opt_a, opt_b],
                        loss=dml.MutualLoss(temperature=1.0, kl_weight=1.0))
    for x, y in loader:
        out = cohort.step(x, y)          # out.losses, out.logits: one per local peer
    cohort.evaluate(test_loader)         # per-peer and ensemble top-1 / top-5
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import LocalExchange, make_exchange
from .evaluate import Evaluation, evaluate_models
from .loss import MutualLoss
from .peer import Peer
from .runtime import Runtime, resolve_device
from .step import STEPS


@dataclass
class StepOutput:
    """What one step computed for each local peer, still on the device (reading them syncs)."""

    losses: list[torch.Tensor]
    logits: list[torch.Tensor]


class Cohort:
    """K peers trained together on the same batches; each minimises ``loss`` of its own logits against
    the other peers' detached logits (one model: plain cross-entropy training).

    ``models`` and ``optimizers`` (and ``schedulers``, optional, not stepped by the cohort) are one per
    peer. Models may be any ``nn.Module`` mapping a batch of inputs to logits; they are moved to the
    device (and to channels_last unless ``plain``) in place, so optimizers built on their parameters
    stay valid. ``update``: "simultaneous" (all peers step on the same predictions) or "sequential".
    ``precision``: "auto" (bf16 autocast on CPU and CUDA), "fp32", "bf16", "fp16" (CUDA).
    ``plain`` keeps PyTorch's defaults (see ``Runtime``). Under torchrun (WORLD_SIZE > 1) each process
    keeps its own contiguous share of the peers and the cohort exchanges logits between processes.

    Call ``close()`` (or use ``with``) when done: it stops the peer threads and restores torch's settings.
    """

    def __init__(self, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer],
                 loss: MutualLoss | None = None, *, update: str = "simultaneous", precision: str = "auto",
                 device: str | torch.device = "auto", schedulers: Sequence | None = None,
                 names: Sequence[str] | None = None, plain: bool = False):
        if not models:
            raise ValueError("a cohort needs at least one model")
        if len(optimizers) != len(models) or (schedulers is not None and len(schedulers) != len(models)):
            raise ValueError(f"{len(models)} models need as many optimizers (and schedulers, if given)")
        if update not in STEPS:
            raise ValueError(f"update {update!r} is not one of: {', '.join(STEPS)}")
        names = list(names) if names is not None else [type(m).__name__.lower() for m in models]
        where = resolve_device(device)
        exchange = make_exchange(len(models), where.type)
        runtime = Runtime(exchange.select_device(where), precision, plain, num_peers=len(exchange.local_indices),
                          side_by_side=update == "simultaneous")
        peers = [Peer(i, names[i], runtime.prepare(models[i]), optimizers[i],
                      None if schedulers is None else schedulers[i]) for i in exchange.local_indices]
        self._init(peers, loss or MutualLoss(), update, runtime, exchange, len(models))
        self._owns_exchange = True  # it joined the process group: it leaves it on close

    @classmethod
    def from_peers(cls, peers: list[Peer], loss: MutualLoss, update: str, runtime: Runtime,
                   exchange: LocalExchange, num_peers: int) -> Cohort:
        """A cohort of this process's ``peers`` (already on the runtime's device) of ``num_peers`` in all."""
        cohort = cls.__new__(cls)
        cohort._init(peers, loss, update, runtime, exchange, num_peers)
        return cohort

    def _init(self, peers, loss, update, runtime, exchange, num_peers) -> None:
        self.peers = peers
        self.loss = loss
        self.update = update
        self.runtime = runtime
        self.exchange = exchange
        self.num_peers = num_peers  # in the whole cohort; ``peers`` holds this process's
        self._step = STEPS[update]
        self._owns_exchange = False

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Train every local peer on one batch of inputs ``x`` and labels ``y``; no host sync."""
        x, y = self.runtime.to_device(x), y.to(self.runtime.device, non_blocking=True)
        losses, logits = self._step(self, x, y)
        return StepOutput(losses, logits)

    def evaluate(self, batches: Iterable) -> Evaluation:
        """Top-1 / top-5 accuracy (%) of every local peer and of the whole cohort's mean-softmax ensemble."""
        return evaluate_models([p.model for p in self.peers], batches, self.runtime, self.exchange)

    def state_dict(self) -> dict:
        """Every local peer's model, optimizer and schedule, and the loss scaler (fp16)."""
        return {"peers": [p.state_dict() for p in self.peers], "scaler": self.runtime.precision.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("peers", ())) != len(self.peers):
            raise ValueError(f"the state holds {len(state.get('peers', ()))} peers, this cohort {len(self.peers)}")
        for peer, peer_state in zip(self.peers, state["peers"]):
            peer.load_state_dict(peer_state)
        self.runtime.precision.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        self.runtime.close()
        if self._owns_exchange:
            self.exchange.close()
            self._owns_exchange = False

    def __enter__(self) -> Cohort:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
