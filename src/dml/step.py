"""The DML training step: every local peer forwards the batch, the exchange hands back every peer's
detached logits (from this process or others), and each trainable peer steps on its objective.

Two update modes:
- simultaneous (the seed's): each peer steps against the predictions all peers made before any update;
- sequential (the paper's Algorithm 1): peers step in turn, each against the predictions of the
  peers before it as they are after their update (recomputed on the same batch).

``cohort`` is a ``dml.Cohort``: its ``peers``, ``links`` (each peer's objective, see links.py),
``progress`` (for linear gates), ``exchange`` and ``runtime`` (precision and the runner that runs
peers in turn or side by side; the result is the same). Frozen peers (teachers) forward without a
graph and never step; their loss is their cross-entropy, for the record.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F


def _forward(peer, x: torch.Tensor, precision) -> torch.Tensor:
    # autocast and grad mode are per thread: entered where the peer runs
    with precision.autocast(), torch.set_grad_enabled(not peer.frozen):
        return peer.model(x)


def _objective(cohort, peer, logits: torch.Tensor, all_logits: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    if peer.frozen:
        return F.cross_entropy(logits.float(), y)
    return cohort.links.objective(peer.index, logits, all_logits, y, cohort.progress)


def _descend(peer, loss: torch.Tensor, scaler) -> None:
    peer.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(peer.optimizer)


def simultaneous_step(cohort, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One batch, all peers updated against the same predictions; returns (losses, logits) of the local peers."""
    precision, runner = cohort.runtime.precision, cohort.runtime.runner
    logits = runner.map(functools.partial(_forward, x=x, precision=precision), cohort.peers)
    all_logits = cohort.exchange.gather_logits(logits)

    def update(k: int) -> torch.Tensor:
        peer = cohort.peers[k]
        loss = _objective(cohort, peer, logits[k], all_logits, y)
        if not peer.frozen:
            _descend(peer, loss, precision.scaler)
        return loss

    losses = runner.map(update, range(len(cohort.peers)))
    precision.scaler.update()
    return losses, logits


def sequential_step(cohort, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One batch, peers updated in cohort order; returns (losses, logits) of the local peers."""
    precision, exchange = cohort.runtime.precision, cohort.exchange
    logits = cohort.runtime.runner.map(functools.partial(_forward, x=x, precision=precision), cohort.peers)
    current = exchange.gather_logits(logits)
    local = {p.index: (p, z) for p, z in zip(cohort.peers, logits)}
    last = cohort.num_peers - 1
    losses = []
    for i in range(cohort.num_peers):
        fresh, moves = None, i < last and i not in cohort.links.frozen  # frozen predictions never change
        if i in local:
            peer, z = local[i]
            loss = _objective(cohort, peer, z, current, y)
            losses.append(loss)
            if not peer.frozen:
                _descend(peer, loss, precision.scaler)
            if moves:  # later peers learn from this peer's updated predictions
                with torch.no_grad(), precision.autocast(), _frozen_batchnorm_stats(peer.model):
                    fresh = peer.model(x).detach()
        if moves:
            current[i] = exchange.share_logits(i, fresh, current[i])
    precision.scaler.update()
    return losses, logits


@contextlib.contextmanager
def _frozen_batchnorm_stats(model: torch.nn.Module):
    """Forward in training mode without moving BatchNorm running statistics."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


STEPS = {"simultaneous": simultaneous_step, "sequential": sequential_step}
