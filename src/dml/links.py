"""Each trainable peer's objective as the links into it.

A link carries knowledge from a source into a target peer:

- the self link (source == target): cross-entropy with the labels,
- a link from another peer j: T^2 * KL( softmax(z_j / T) || softmax(z_i / T) ), the source's
  prediction as the (detached) target distribution,
- a link from the ensemble (source ``"ensemble"``): the same KL with z_j replaced by the mean of the
  trainable peers' detached *logits*, (1/m) sum_k z_k. Averaging logits, not probabilities, is
  KDCL's "naive" ensemble (Guo et al., CVPR 2020): it keeps the teacher a set of logits, so
  the link's own temperature softens it like any peer's, and standardisation applies to it,
- a link from the others (source ``"others"``): the same with the mean of the *other* trainable peers'
  detached logits, (1/(m-1)) sum_{k != i} z_k (CL-ILR's peer ensemble for branch i),
- a link from a group (source a tuple of peer indices): the same with the mean of those peers' logits
  (OKDDip's group leader learns from its auxiliary peers, FFL's fusion head from the branches),

each with its own temperature T, weight w and gate g. A link with ``detach=False`` lets its gradient flow
into the source too (OKDDip's attention-weighted targets, as its official code computes them): its
source must be computed in the same backward as its target, i.e. by the target's own multi-branch
network. The objective of peer i is

    L_i = CE_i + KD_i,   CE_i = w_ii g_ii CE(z_i, y),   KD_i = C_i * sum_{j -> i} w_ji g_ji T_ji^2 KL_ji

with C_i = 1 / (number of links into i from other sources) when ``combine`` is "mean" (the DML
paper's average, and what ``MutualLoss`` computes) or 1 when it is "sum". Gates multiply a link's
term; a ``cutoff`` link still counts in the mean. Plain DML is every peer linked to every other
with T = 1, w = 1, gate ``through``; independent training has self links only; knowledge
distillation is a link from a frozen teacher. ``standardize`` (a link between two sets of logits)
z-scores both per sample before the temperature softmax, z -> (z - mean(z)) / std(z) over the
classes (torch's std, n - 1; Sun et al., CVPR 2024), so that peers whose logits differ in scale teach each other's shape.

Gates (Minami et al., ACCV 2020, and the ramps of ONE, OKDDip and PCL):
- through: always on;
- cutoff: always off;
- linear: the term is scaled by (epoch - 1) / (epochs - 1), from 0 at the first epoch to 1 at
  the last, fixed within an epoch (a KL warm-up that softens DML's slow start);
- correct: per sample, only samples whose label the source ranks first count (the others add
  zero; the term is still averaged over the whole batch);
- linear_ramp, sigmoid_ramp: ramps that move every step, with t = min(1, epochs done / R), where
  epochs done counts the steps of the current epoch as a fraction (steps done / steps per epoch)
  and R is the link's ``ramp_epochs`` (None: the whole run). linear_ramp scales by t,
  sigmoid_ramp by exp(-5 (1 - t)^2) (Laine & Aila's ramp-up, used by ONE, OKDDip and PCL).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F

from .loss import at_least_fp32, kl_from_peer

ENSEMBLE = "ensemble"
OTHERS = "others"
GROUP_SOURCES = (ENSEMBLE, OTHERS)  # sources made of the trainable peers' logits
RAMPS = ("linear_ramp", "sigmoid_ramp")
GATES = ("through", "cutoff", "linear", "correct", *RAMPS)
COMBINES = ("mean", "sum")
STANDARDIZE_EPS = 1e-7  # keeps a sample whose logits are all equal finite (std 0)


@dataclass(frozen=True)
class Progress:
    """Where training stands for a step: ``epoch`` (1-based) of ``epochs``, with ``fraction`` of that
    epoch's steps done before this one."""

    epoch: int
    epochs: int
    fraction: float = 0.0

    @property
    def epochs_done(self) -> float:
        return self.epoch - 1 + self.fraction


@dataclass(frozen=True)
class Link:
    """One term of peer ``target``'s objective, from peer ``source`` (itself: the labels; ``"ensemble"``:
    the trainable peers' mean logits). ``ramp_epochs`` is the length of a ramp gate (None: the whole
    run); ``standardize`` z-scores both logits of a link from another source."""

    source: int | str | tuple[int, ...]
    target: int
    temperature: float = 1.0
    weight: float = 1.0
    gate: str = "through"
    ramp_epochs: float | None = None
    standardize: bool = False
    detach: bool = True

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"gate {self.gate!r} is not one of: {', '.join(GATES)}")
        if isinstance(self.source, (list, tuple)):  # a group; config.json gives it back as a list
            object.__setattr__(self, "source", tuple(self.source))
            if (
                not self.source
                or len(set(self.source)) != len(self.source)
                or not all(isinstance(k, int) and not isinstance(k, bool) for k in self.source)
            ):
                raise ValueError(f"a group source lists distinct peers' indices, not {list(self.source)!r}")
        elif isinstance(self.source, str) and self.source not in GROUP_SOURCES:
            raise ValueError(
                f"a link's source is a peer's index, {ENSEMBLE!r}, {OTHERS!r} or a group of peers, not {self.source!r}"
            )
        if not isinstance(self.detach, bool):
            raise ValueError(f"detach must be true or false, not {self.detach!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, int):
            raise ValueError(f"a link's target is a peer's index, not {self.target!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"a link's temperature must be a positive finite number, got {self.temperature!r}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"a link's weight must be a non-negative finite number, got {self.weight!r}")
        if self.ramp_epochs is not None:
            if self.gate not in RAMPS:
                raise ValueError(
                    f"ramp_epochs is the length of a ramp gate ({', '.join(RAMPS)}), not of gate {self.gate!r}"
                )
            if not (self.ramp_epochs > 0 and math.isfinite(self.ramp_epochs)):
                raise ValueError(f"ramp_epochs must be a positive number of epochs, got {self.ramp_epochs!r}")
        if self.standardize and self.is_self:
            raise ValueError(
                "standardize applies to a link between two sets of logits, not to the self link "
                "(cross-entropy with the labels)"
            )
        if not self.detach and self.is_self:
            raise ValueError("detach applies to a link from another source, not to the self link")

    @property
    def peers(self) -> tuple[int, ...]:
        """The peers a link reads (its group's; none for the ensemble and the others)."""
        return self.source if isinstance(self.source, tuple) else () if isinstance(self.source, str) else (self.source,)

    @property
    def is_self(self) -> bool:
        return self.source == self.target

    def to_dict(self) -> dict:
        """The link as config.json stores it; settings at their defaults that older runs did not
        have are left out, so those runs' stored links stay equal to what they describe."""
        entry = asdict(self)
        if self.ramp_epochs is None:
            del entry["ramp_epochs"]
        if not self.standardize:
            del entry["standardize"]
        if self.detach:
            del entry["detach"]
        if isinstance(self.source, tuple):
            entry["source"] = list(self.source)
        return entry


def linear_ramp(epoch: int, epochs: int) -> float:
    """The ``linear`` gate's factor in ``epoch`` (1-based) of ``epochs``: 0 at the first, 1 at the last."""
    return 1.0 if epochs <= 1 else (epoch - 1) / (epochs - 1)


def ramp_factor(gate: str, progress: Progress, ramp_epochs: float | None) -> float:
    """A ramp gate's factor at ``progress``: t = min(1, epochs done / ramp length)."""
    t = min(1.0, progress.epochs_done / (ramp_epochs or progress.epochs))
    return t if gate == "linear_ramp" else math.exp(-5.0 * (1.0 - t) ** 2)


class Links:
    """The objectives of a cohort of ``num_peers``: every link, and how the links into a peer combine.

    A trainable peer without a self link gets one (weight 1, gate through); peers in ``frozen``
    may not be the target of any link.
    """

    def __init__(self, links: Sequence[Link], num_peers: int, combine: str = "mean", frozen: Sequence[int] = ()):
        if combine not in COMBINES:
            raise ValueError(f"combine {combine!r} is not one of: {', '.join(COMBINES)}")
        self.num_peers = num_peers
        self.combine = combine
        self.frozen = frozenset(frozen)
        self.trainable = [i for i in range(num_peers) if i not in self.frozen]
        links = list(links)
        self.uses_ensemble = any(link.source == ENSEMBLE for link in links)
        if self.uses_ensemble and not self.trainable:
            raise ValueError("a link from the ensemble needs at least one trainable peer: the ensemble is their mean")
        for link in links:
            if link.source == ENSEMBLE and self.trainable == [link.target]:
                raise ValueError(
                    f"link {ENSEMBLE} -> {link.target}: the ensemble is the mean of the trainable peers, "
                    f"here peer {link.target} alone, which would learn from itself (a term of 0)"
                )
            if link.source == OTHERS and len([k for k in self.trainable if k != link.target]) < 1:
                raise ValueError(
                    f"link others -> {link.target}: the others are the trainable peers but the target, "
                    "and there is none"
                )
            for end in (*link.peers, link.target):
                if not 0 <= end < num_peers:
                    raise ValueError(f"link {link.source} -> {link.target}: no peer {end} in a cohort of {num_peers}")
            if link.target in self.frozen:
                raise ValueError(
                    f"link {link.source} -> {link.target}: peer {link.target} is frozen and learns nothing"
                )
        pairs = [(link.source, link.target) for link in links]
        self.undetached = [link for link in links if not link.detach]
        for pair in set(pairs):
            if pairs.count(pair) > 1:
                raise ValueError(f"link {pair[0]} -> {pair[1]} is given twice")
        selfless = [i for i in self.trainable if (i, i) not in pairs]
        self.links = sorted(links + [Link(i, i) for i in selfless], key=_order)
        # decided once, not at every step: each target's self link and its links from other sources
        self._self = {link.target: link for link in self.links if link.is_self}
        self._from_others = {
            i: [link for link in self.links if link.target == i and not link.is_self] for i in range(num_peers)
        }
        self.needs_progress = any(link.gate == "linear" or link.gate in RAMPS for link in self.links)
        self.needs_steps = any(link.gate in RAMPS for link in self.links)

    @classmethod
    def mutual(
        cls,
        num_peers: int,
        temperature: float = 1.0,
        weight: float = 1.0,
        frozen: Sequence[int] = (),
        gate: str = "through",
        ramp_epochs: float | None = None,
    ) -> Links:
        """DML: every trainable peer learns from every other peer (frozen ones included)."""
        links = [
            Link(j, i, temperature, weight, gate, ramp_epochs)
            for i in range(num_peers)
            if i not in frozen
            for j in range(num_peers)
            if j != i
        ]
        return cls(links, num_peers, frozen=frozen)

    def to_dict(self) -> dict:
        """What config.json stores (the frozen peers are the graph spec's checkpoint peers)."""
        return {"links": [link.to_dict() for link in self.links], "combine": self.combine}

    def sources(self, all_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """What links read: every peer's detached logits in cohort order and, where a link needs it,
        the ensemble's after them (the mean of the trainable peers' logits, in fp32)."""
        if not self.uses_ensemble:
            return list(all_logits)
        ensemble = torch.stack([at_least_fp32(all_logits[i]) for i in self.trainable]).mean(0)
        return [*all_logits, ensemble]

    def objective(
        self,
        target: int,
        logits: torch.Tensor,
        sources: Sequence[torch.Tensor],
        labels: torch.Tensor,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """L_target = CE + KD (see ``terms``)."""
        ce, kd = self.terms(target, logits, sources, labels, progress)
        return ce if kd is None else ce + kd

    def terms(
        self,
        target: int,
        logits: torch.Tensor,
        sources: Sequence[torch.Tensor],
        labels: torch.Tensor,
        progress: Progress | None = None,
        live: Mapping[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The two parts of a trainable ``target``'s objective, each as it enters the sum: its weighted,
        gated cross-entropy and the combined distillation term of its links from other sources (None
        where none is live). ``logits`` carry their graph; ``sources`` are every peer's detached logits
        in cohort order, or what ``sources()`` makes of them (the ensemble computed once for all
        targets); ``progress`` is where training stands (needed by linear and ramp gates); ``live``:
        the logits with their graph of the peers computed with the target (its network's), which links
        with ``detach=False`` read."""
        if len(sources) == self.num_peers:
            sources = self.sources(sources)
        elif len(sources) != self.num_peers + self.uses_ensemble:
            raise ValueError(f"{len(sources)} sets of logits for a cohort of {self.num_peers}; pass every peer's")
        if progress is not None and not isinstance(progress, Progress):
            raise TypeError(f"progress is a dml.links.Progress (see Cohort.progress), not {type(progress).__name__}")
        if self.needs_progress and progress is None:
            raise ValueError(
                "linear and ramp gates need the training progress: call cohort.set_epoch(epoch, epochs"
                + (", steps_per_epoch)" if self.needs_steps else ")")
            )
        own = self._self[target]
        ce = own.weight * _gated_cross_entropy(own, logits, sources, labels, progress, self.trainable)
        incoming = self._from_others[target]
        scales = [link.weight * link.temperature**2 * _gate_factor(link, progress) for link in incoming]
        with_graph = sources
        if any(not link.detach for link in incoming):
            missing = {k for link in incoming if not link.detach for k in (link.peers or self.trainable)} - set(
                live or ()
            )
            if missing:
                raise ValueError(
                    f"peer {target}'s links that are not detached read peers {sorted(missing)}, which are "
                    "not computed with it: pass their logits with their graph as live"
                )
            assert live is not None  # nothing is missing from it
            with_graph = self.sources(
                [live.get(k, z) if k in live else z for k, z in enumerate(sources[: self.num_peers])]
            )
        terms = [
            (scale, _gated_kl(link, logits, sources if link.detach else with_graph, labels, self.trainable))
            for link, scale in zip(incoming, scales)
            if scale
        ]
        if not terms:
            return ce, None
        # Where every link has the same scale the sum is taken first and scaled once, the way
        # ``mutual_loss`` computes it, so plain DML built from links is bit-identical to it.
        if len(set(scales)) == 1:
            total = scales[0] * sum(term for _, term in terms)
        else:
            total = sum(scale * term for scale, term in terms)
        total = cast(torch.Tensor, total)  # a sum of the terms' tensors: there are some
        return ce, (total / len(incoming) if self.combine == "mean" else total)


def _order(link: Link) -> tuple[int, int, tuple[int, ...]]:
    """Links by target, then source: the peers, the ensemble and the others, then groups."""
    if isinstance(link.source, str):
        return link.target, 1, (GROUP_SOURCES.index(link.source),)
    return (link.target, 2, link.source) if isinstance(link.source, tuple) else (link.target, 0, (link.source,))


def _gate_factor(link: Link, progress: Progress | None) -> float:
    if link.gate in RAMPS:
        assert progress is not None  # Links.objective asks for it where a linear or ramp gate is
        return ramp_factor(link.gate, progress, link.ramp_epochs)
    if link.gate == "linear":
        assert progress is not None
        return linear_ramp(progress.epoch, progress.epochs)
    return 0.0 if link.gate == "cutoff" else 1.0


def _correct_mask(source_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (source_logits.argmax(1) == labels).float()


def _source(link: Link, sources: Sequence[torch.Tensor], trainable: Sequence[int]) -> torch.Tensor:
    if link.source == OTHERS:
        return torch.stack([at_least_fp32(sources[k]) for k in trainable if k != link.target]).mean(0)
    if isinstance(link.source, tuple):
        return torch.stack([at_least_fp32(sources[k]) for k in link.source]).mean(0)
    # a str source here is ENSEMBLE (Link allows no other but OTHERS): the last of the sources
    return sources[len(sources) - 1 if isinstance(link.source, str) else link.source]


def _gated_cross_entropy(link: Link, logits, sources, labels, progress, trainable) -> torch.Tensor:
    if link.gate == "correct":
        per_sample = F.cross_entropy(at_least_fp32(logits), labels, reduction="none")
        return (per_sample * _correct_mask(_source(link, sources, trainable), labels)).mean()
    ce = F.cross_entropy(at_least_fp32(logits), labels)
    factor = _gate_factor(link, progress)
    return ce if factor == 1.0 else ce * factor


def standardized(logits: torch.Tensor) -> torch.Tensor:
    """Logits z-scored per sample over the classes (at least in fp32): mean 0, standard deviation 1."""
    z = at_least_fp32(logits)
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + STANDARDIZE_EPS)


def _gated_kl(link: Link, logits, sources, labels, trainable) -> torch.Tensor:
    source = _source(link, sources, trainable)
    source = source.detach() if link.detach else source  # the gradient reaches the target only
    teacher, student = (standardized(source), standardized(logits)) if link.standardize else (source, logits)
    if link.gate != "correct":
        return kl_from_peer(teacher, student, link.temperature)
    per_sample = kl_from_peer(teacher, student, link.temperature, per_sample=True)
    return (per_sample * _correct_mask(source, labels)).mean()
