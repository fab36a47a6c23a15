"""The DML training step: every local peer forwards the batch, the exchange hands back every peer's
detached logits (from this process or others), and each trainable peer steps on its objective.

Two update modes:
- simultaneous (the seed's): each peer steps against the predictions all peers made before any update;
- sequential (the paper's Algorithm 1): peers step in turn, each against the predictions of the
  peers before it as they are after their update (recomputed on the same batch).

``cohort`` is a ``dml.Cohort``: its ``peers``, ``links`` (each peer's objective, see links.py),
``progress`` (for linear and ramp gates), ``exchange`` and ``runtime`` (precision and the runner that runs
peers in turn or side by side; the result is the same) and ``units``: what computes together, one peer,
or the peers of a multi-branch network (one trunk forward, one backward of their summed objectives,
one optimizer step; simultaneous update only). Frozen peers (teachers) and temporal means
forward without a graph and never step; their loss is their cross-entropy, for the record. A mean
follows its source at the end of the step, so within a step it teaches as it was before it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .loss import at_least_fp32


@dataclass
class Unit:
    """Peers that compute together: one peer, or the outputs of a multi-branch ``network`` (dml.Branches).
    ``view``: where a batch comes as views (one augmentation per branch, stacked), the one this unit
    reads (a temporal mean of branch k reads view k; other peers view 0); None: the batch as it comes
    (all the views, for a network with views)."""

    peers: list
    network: nn.Module | None = None
    view: int | None = None

    @property
    def model(self) -> nn.Module:
        """What its optimizer trains: the multi-branch network, or the one peer's model."""
        return self.network if self.network is not None else self.peers[0].model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.view is not None:
            x = x[self.view]
        return self.network(x) if self.network is not None else [self.peers[0].model(x)]


def _forward(peer, x: torch.Tensor, precision) -> torch.Tensor:
    # autocast and grad mode are per thread: entered where the peer runs
    with precision.autocast(), torch.set_grad_enabled(peer.trains):
        return peer.model(x)


def _forward_unit(unit: Unit, x: torch.Tensor, precision) -> list[torch.Tensor]:
    with precision.autocast(), torch.set_grad_enabled(unit.peers[0].trains):
        return unit.forward(x)


def _terms(cohort, peer, logits: torch.Tensor, sources: list[torch.Tensor], y: torch.Tensor, progress, live=None):
    """``peer``'s objective and its parts: (objective, cross-entropy term, distillation term or None);
    ``live``: the logits, with their graph, of the peers of its unit (for links that are not detached)."""
    if not peer.trains:  # a teacher or a temporal mean: its cross-entropy, for the record
        ce = F.cross_entropy(at_least_fp32(logits), y)
        return ce, ce, None
    ce, kd = cohort.links.terms(peer.index, logits, sources, y, progress, live)
    return (ce if kd is None else ce + kd), ce, kd


def _descend(cohort, peer, loss: torch.Tensor, scaler, model: nn.Module) -> None:
    """``peer``'s step on ``loss``; ``model``: what its optimizer trains (its own, or its multi-branch network)."""
    peer.optimizer.zero_grad(set_to_none=True)
    if cohort.replica_weight != 1.0:  # a data-parallel shard of another size than the others
        loss = loss * cohort.replica_weight
    scaler.scale(loss).backward()
    cohort.exchange.average_gradients(model, peer.index)  # over its data-parallel replicas, where it has any
    scaler.step(peer.optimizer)


def simultaneous_step(cohort, x: torch.Tensor, y: torch.Tensor) -> tuple[list, list[torch.Tensor]]:
    """One batch, all peers updated against the same predictions; returns the (objective, ce, kd) terms and the
    logits of the local peers."""
    precision, runner, progress, units = cohort.runtime.precision, cohort.runtime.runner, cohort.progress, cohort.units
    outputs = runner.map(functools.partial(_forward_unit, x=x, precision=precision), units)
    logits = [z for unit_logits in outputs for z in unit_logits]  # in peer order: a unit's peers are consecutive
    sources = cohort.links.sources(cohort.exchange.gather_logits(logits))
    first = {id(unit): sum(len(u.peers) for u in units[:k]) for k, unit in enumerate(units)}

    def update(unit: Unit):
        live = {peer.index: logits[first[id(unit)] + j] for j, peer in enumerate(unit.peers)}
        terms = [_terms(cohort, peer, live[peer.index], sources, y, progress, live) for peer in unit.peers]
        objectives = [objective for peer, (objective, _, _) in zip(unit.peers, terms) if peer.trains]
        if objectives:  # a network's peers: one backward of their sum, one step of its optimizer
            _descend(cohort, unit.peers[0], functools.reduce(torch.add, objectives), precision.scaler, unit.model)
        return terms

    terms = [t for unit_terms in runner.map(update, units) for t in unit_terms]
    precision.scaler.update()
    _follow(cohort)
    return terms, logits


def sequential_step(cohort, x: torch.Tensor, y: torch.Tensor) -> tuple[list, list[torch.Tensor]]:
    """One batch, peers updated in cohort order (the ensemble follows their updates); returns the
    (objective, ce, kd) terms and the logits of the local peers."""
    precision, exchange, progress = cohort.runtime.precision, cohort.exchange, cohort.progress
    logits = cohort.runtime.runner.map(functools.partial(_forward, x=x, precision=precision), cohort.peers)
    current = exchange.gather_logits(logits)
    local = {p.index: (p, z) for p, z in zip(cohort.peers, logits)}
    last = max(cohort.links.trainable, default=-1)  # no peer after it reads fresh predictions
    terms = []
    for i in range(cohort.num_peers):
        # teachers never change, and a temporal mean follows its source only at the end of the step
        fresh, moves = None, i < last and i not in cohort.links.frozen
        if i in local:
            peer, z = local[i]
            terms.append(_terms(cohort, peer, z, cohort.links.sources(current), y, progress))
            if peer.trains:
                _descend(cohort, peer, terms[-1][0], precision.scaler, peer.model)
            if moves:  # later peers learn from this peer's updated predictions
                with torch.no_grad(), precision.autocast(), _frozen_batchnorm_stats(peer.model):
                    fresh = peer.model(x).detach()
        if moves:
            current[i] = exchange.share_logits(i, fresh, current[i])
    precision.scaler.update()
    _follow(cohort)
    return terms, logits


def _follow(cohort) -> None:
    """Every local temporal mean follows its source after the source's step (in the same process)."""
    for peer in cohort.peers:
        if peer.mean_of is not None:
            peer.follow(next(p for p in cohort.peers if p.index == peer.mean_of.source))


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
