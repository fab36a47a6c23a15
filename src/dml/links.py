"""Each trainable peer's objective as the links into it.

A link carries knowledge from a source into a target peer:

- the self link (source == target): cross-entropy with the labels,
- a link from another peer j: T^2 * KL( softmax(z_j / T) || softmax(z_i / T) ), the source's
  prediction as the (detached) target distribution,

each with its own temperature T, weight w and gate g. The objective of peer i is

    L_i = w_ii g_ii CE(z_i, y)  +  C_i * sum_{j -> i} w_ji g_ji T_ji^2 KL_ji

with C_i = 1 / (number of links into i from other peers) when ``combine`` is "mean" (the DML
paper's average, and what ``MutualLoss`` computes) or 1 when it is "sum". Gates multiply a link's
term; a ``cutoff`` link still counts in the mean. Plain DML is every peer linked to every other
with T = 1, w = 1, gate ``through``; independent training has self links only; knowledge
distillation is a link from a frozen teacher.

Gates (Minami et al., ACCV 2020):
- through: always on;
- cutoff: always off;
- linear: the term is scaled by (epoch - 1) / (epochs - 1), from 0 at the first epoch to 1 at
  the last (a KL warm-up that softens DML's slow start);
- correct: per sample, only samples whose label the source ranks first count (the others add
  zero; the term is still averaged over the whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .loss import kl_from_peer

GATES = ("through", "cutoff", "linear", "correct")
COMBINES = ("mean", "sum")


@dataclass(frozen=True)
class Link:
    """One term of peer ``target``'s objective, from peer ``source`` (itself: the labels)."""

    source: int
    target: int
    temperature: float = 1.0
    weight: float = 1.0
    gate: str = "through"

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"gate {self.gate!r} is not one of: {', '.join(GATES)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"a link's temperature must be a positive finite number, got {self.temperature!r}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"a link's weight must be a non-negative finite number, got {self.weight!r}")

    @property
    def is_self(self) -> bool:
        return self.source == self.target


def linear_ramp(epoch: int, epochs: int) -> float:
    """The ``linear`` gate's factor in ``epoch`` (1-based) of ``epochs``: 0 at the first, 1 at the last."""
    return 1.0 if epochs <= 1 else (epoch - 1) / (epochs - 1)


class Links:
    """The objectives of a cohort of ``num_peers``: every link, and how the links into a peer combine.

    A trainable peer without a self link gets one (weight 1, gate through); peers in ``frozen``
    may not be the target of any link.
    """

    def __init__(self, links: Sequence[Link], num_peers: int, combine: str = "mean",
                 frozen: Sequence[int] = ()):
        if combine not in COMBINES:
            raise ValueError(f"combine {combine!r} is not one of: {', '.join(COMBINES)}")
        self.num_peers = num_peers
        self.combine = combine
        self.frozen = frozenset(frozen)
        links = list(links)
        for link in links:
            for end in (link.source, link.target):
                if not 0 <= end < num_peers:
                    raise ValueError(f"link {link.source} -> {link.target}: no peer {end} in a cohort of {num_peers}")
            if link.target in self.frozen:
                raise ValueError(f"link {link.source} -> {link.target}: peer {link.target} is frozen and learns nothing")
        pairs = [(link.source, link.target) for link in links]
        for pair in set(pairs):
            if pairs.count(pair) > 1:
                raise ValueError(f"link {pair[0]} -> {pair[1]} is given twice")
        selfless = [i for i in range(num_peers) if i not in self.frozen and (i, i) not in pairs]
        self.links = sorted(links + [Link(i, i) for i in selfless], key=lambda link: (link.target, link.source))
        # decided once, not at every step: each target's self link and its links from other peers
        self._self = {link.target: link for link in self.links if link.is_self}
        self._from_peers = {i: [link for link in self.links if link.target == i and not link.is_self]
                            for i in range(num_peers)}
        self.needs_progress = any(link.gate == "linear" for link in self.links)

    @classmethod
    def mutual(cls, num_peers: int, temperature: float = 1.0, weight: float = 1.0, frozen: Sequence[int] = (),
               gate: str = "through") -> Links:
        """DML: every trainable peer learns from every other peer (frozen ones included)."""
        links = [Link(j, i, temperature, weight, gate) for i in range(num_peers) if i not in frozen
                 for j in range(num_peers) if j != i]
        return cls(links, num_peers, frozen=frozen)

    def to_dict(self) -> dict:
        """What config.json stores (the frozen peers are the graph spec's checkpoint peers)."""
        return {"links": [asdict(link) for link in self.links], "combine": self.combine}

    def objective(self, target: int, logits: torch.Tensor, all_logits: Sequence[torch.Tensor],
                  labels: torch.Tensor, progress: float | None = None) -> torch.Tensor:
        """L_target of a trainable ``target`` from its own ``logits`` (with their graph), every peer's
        detached logits in cohort order and the labels; ``progress`` is the ``linear`` gates' factor
        (``linear_ramp``)."""
        if self.needs_progress and progress is None:
            raise ValueError("linear gates need the training progress: call cohort.set_epoch(epoch, epochs)")
        own = self._self[target]
        loss = own.weight * _gated_cross_entropy(own, logits, all_logits, labels, progress)
        incoming = self._from_peers[target]
        if not incoming:
            return loss
        scales = [link.weight * link.temperature**2 * _gate_factor(link.gate, progress) for link in incoming]
        live = [(scale, _gated_kl(link, logits, all_logits, labels)) for link, scale in zip(incoming, scales) if scale]
        if not live:
            return loss
        # Where every link has the same scale the sum is taken first and scaled once, the way
        # ``mutual_loss`` computes it, so plain DML built from links is bit-identical to it.
        if len(set(scales)) == 1:
            total = scales[0] * sum(term for _, term in live)
        else:
            total = sum(scale * term for scale, term in live)
        return loss + (total / len(incoming) if self.combine == "mean" else total)


def _gate_factor(gate: str, progress: float | None) -> float:
    return {"cutoff": 0.0, "linear": progress}.get(gate, 1.0)


def _correct_mask(source_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (source_logits.argmax(1) == labels).float()


def _gated_cross_entropy(link: Link, logits, all_logits, labels, progress) -> torch.Tensor:
    if link.gate == "correct":
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
        return (per_sample * _correct_mask(all_logits[link.source], labels)).mean()
    ce = F.cross_entropy(logits.float(), labels)
    factor = _gate_factor(link.gate, progress)
    return ce if factor == 1.0 else ce * factor


def _gated_kl(link: Link, logits, all_logits, labels) -> torch.Tensor:
    source = all_logits[link.source]
    if link.gate != "correct":
        return kl_from_peer(source, logits, link.temperature)
    per_sample = kl_from_peer(source, logits, link.temperature, per_sample=True)
    return (per_sample * _correct_mask(source, labels)).mean()
