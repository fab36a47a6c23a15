"""Multi-branch networks: m branches on a shared trunk, each branch a peer of the cohort.

The m branches are m networks of one architecture whose first stages are the *same modules* (branch
0's): the trunk. Each branch is therefore a whole network -- its state_dict is a plain network's, it
runs alone, it is saved, evaluated and distilled from like any peer -- while ``Branches.forward``
computes the trunk once per batch and each branch's remaining stages on its output. A learned
teacher made of the branches (ONE's gate) is one more output, a peer of its own with its own
cross-entropy; the links carry its logits, detached, to the branches.

A network can be split where it offers (the built-in CIFAR ResNets and wide ResNets do)::

    stages: int                               # stages after its stem
    trunk_modules(shared) -> list[str]         # names of the stem's and the first `shared` stages' modules
    trunk_channels(shared) -> int              # channels of the trunk's output
    trunk(x, shared) -> h                      # the stem and the first `shared` stages
    tail(h, shared) -> feature map             # the remaining stages
    fc: nn.Linear                              # the classifier on the pooled feature map

with ``forward(x) == fc(pool(tail(trunk(x, s), s)))``.

Methods, as their official code computes them:
- ONE (Lan et al., NeurIPS 2018): ``teacher="one"``, a gate on the pooled trunk features,
  Linear(C, m) -> BatchNorm -> ReLU -> softmax over the branches; the teacher's logits are the
  gated sum of the branches' logits, trained by its own cross-entropy (which reaches the gate and
  the branches), detached where it teaches.
- OKDDip (Chen et al., AAAI 2020): ``teacher="okddip"``, peer attention among the first m - 1 branches
  (``PeerAttention``); its m - 1 outputs are the auxiliary branches' targets, read by links that are
  not detached; the last branch, the group leader, learns from the auxiliary branches' mean (a link
  from a group, not detached either, as the official code computes it).
- FFL (Kim et al., ICPR 2020): ``teacher="ffl"``, a fusion head (``FusionHead``) on the branches'
  concatenated last feature maps, trained by its own cross-entropy and by the branches' mean logits
  (a link from a group), teaching the branches detached.
- PCL (Wu & Gong, AAAI 2021): ``teacher="pcl"``, a linear classifier on the branches' concatenated
  pooled features (``FusionLinear``), the peer ensemble teacher; the peer mean teachers are temporal
  means of the branches (``dml.MeanOf`` of a branch: the moving average of the trunk and that branch,
  exactly the branch of a moving average of the whole network).
- CL-ILR (Song & Chai, NeurIPS 2018): ``trunk_gradient="mean"``, the trunk's gradient is the sum
  over the branches times 1/m (backpropagation rescaling); each branch learns from the mean of the
  other branches' logits (the links' ``OTHERS`` source).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

TEACHERS = ("one", "okddip", "ffl", "pcl")
TRUNK_GRADIENTS = ("sum", "mean")
SPLIT_METHODS = ("stages", "trunk_modules", "trunk_channels", "trunk", "tail", "fc")


class Splittable(Protocol):
    """What a network that can be split offers (the module's docstring says what each part is)."""

    stages: int
    fc: nn.Linear

    def trunk_modules(self, shared: int) -> list[str]: ...

    def trunk_channels(self, shared: int) -> int: ...

    def trunk(self, x: torch.Tensor, shared: int) -> torch.Tensor: ...

    def tail(self, h: torch.Tensor, shared: int) -> torch.Tensor: ...


def check_split(network: nn.Module, shared, teacher, trunk_gradient) -> None:
    """ValueError, in one line, where ``network`` cannot be split after ``shared`` stages or the teacher or
    trunk gradient is not one of the known ones."""
    missing = [name for name in SPLIT_METHODS if not hasattr(network, name)]
    if missing:
        raise ValueError(
            f"{type(network).__name__} cannot be split into a trunk and branches: it has no "
            f"{', '.join(missing)} (see dml.branches)"
        )
    split = cast(Splittable, network)  # it has every part
    if isinstance(shared, bool) or not isinstance(shared, int) or not 1 <= shared < split.stages:
        raise ValueError(
            f"shared is the number of stages the trunk holds, 1 to {split.stages - 1} for "
            f"{type(network).__name__}, got {shared!r}"
        )
    if teacher is not None and teacher not in TEACHERS:
        raise ValueError(f"teacher {teacher!r} is not one of: {', '.join(TEACHERS)}")
    if trunk_gradient not in TRUNK_GRADIENTS:
        raise ValueError(f"trunk_gradient {trunk_gradient!r} is not one of: {', '.join(TRUNK_GRADIENTS)}")


def teacher_outputs(teacher: str | None, branches: int) -> int:
    """The peers a learned teacher adds: ONE's gated teacher one; OKDDip one target per auxiliary branch."""
    return {None: 0, "one": 1, "okddip": branches - 1, "ffl": 1, "pcl": 1}[teacher]


def teacher_learns_from_labels(teacher: str) -> bool:
    """Whether a learned teacher's peers have a cross-entropy of their own (OKDDip's targets do not)."""
    return teacher != "okddip"


class OneGate(nn.Module):
    """ONE's gate: per sample, a softmax weight for each branch from the pooled trunk features."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.linear = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, h: torch.Tensor, maps: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]):
        gate = F.softmax(F.relu(self.bn(self.linear(F.adaptive_avg_pool2d(h, 1).flatten(1)))), dim=1)
        return [sum(gate[:, k : k + 1] * z for k, z in enumerate(logits))]


class PeerAttention(nn.Module):
    """OKDDip's peer attention (Chen et al., AAAI 2020, as its official code computes it): the first m - 1
    branches are auxiliary peers, the last the group leader. Query and key projections (C -> C/8, no
    bias, one pair for all branches) of each auxiliary branch's pooled features f_j; attention
    a_ij = softmax_j(q(f_i) . k(f_j)) over the auxiliary branches, self included; auxiliary branch i's
    target is sum_j a_ij z_j. The targets keep their graph: their links are not detached, so the
    projections learn through them (and so do the branches whose logits they mix)."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Linear(channels, channels // 8, bias=False)
        self.key = nn.Linear(channels, channels // 8, bias=False)

    def forward(self, h: torch.Tensor, maps: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]):
        f = torch.stack([F.adaptive_avg_pool2d(m, 1).flatten(1) for m in maps[:-1]], 1)  # (batch, m - 1, C)
        attention = F.softmax(self.query(f) @ self.key(f).transpose(1, 2), dim=-1)  # (batch, i, j)
        targets = attention @ torch.stack(list(logits[:-1]), 1)  # (batch, i, classes)
        return list(targets.unbind(1))


class FusionHead(nn.Module):
    """FFL's fusion module (Kim et al., ICPR 2020, as its official code computes it): the branches' last
    feature maps concatenated (m C channels), a depthwise 3x3 convolution, BatchNorm, ReLU, a 1x1
    convolution to C channels, BatchNorm, ReLU, global average pooling and a linear classifier. Its
    gradient reaches the branches and the trunk through the maps."""

    def __init__(self, channels: int, branches: int, classes: int):
        super().__init__()
        wide = channels * branches
        self.depthwise = nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False)
        self.bn1 = nn.BatchNorm2d(wide)
        self.pointwise = nn.Conv2d(wide, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)
        for conv in (self.depthwise, self.pointwise):  # normal(0, sqrt(2 / (k^2 out))), as the official code
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, h: torch.Tensor, maps: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]):
        x = F.relu(self.bn1(self.depthwise(torch.cat(list(maps), 1))))
        x = F.relu(self.bn2(self.pointwise(x)))
        return [self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))]


class FusionLinear(nn.Module):
    """PCL's peer ensemble teacher (Wu & Gong, AAAI 2021): a linear classifier on the branches' pooled
    features, concatenated (m C inputs). Its gradient reaches the branches and the trunk."""

    def __init__(self, channels: int, branches: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels * branches, classes)

    def forward(self, h: torch.Tensor, maps: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]):
        return [self.fc(torch.cat([F.adaptive_avg_pool2d(m, 1).flatten(1) for m in maps], 1))]


class Branches(nn.Module):
    """``networks`` (m >= 2, one architecture) computed as branches of one trunk: the stem and the first
    ``shared`` stages of ``networks[0]``, which every other network then uses in place of its own.

    ``forward(x)`` returns the logits of every branch, then the teacher's where there is one. In a
    ``dml.Cohort``, a ``Branches`` is one model with one optimizer (over all its parameters), and its
    outputs are consecutive peers: one trunk forward, one backward of their summed objectives and one
    optimizer step per batch. ``trunk_gradient="mean"`` scales the trunk's gradient by 1/m (CL-ILR).
    """

    def __init__(
        self,
        networks: Sequence[nn.Module],
        shared: int = 2,
        teacher: str | None = None,
        trunk_gradient: str = "sum",
        views: bool = False,
    ):
        super().__init__()
        networks = list(networks)
        if len(networks) < 2:
            raise ValueError(f"branches on a shared trunk need at least 2 networks, got {len(networks)}")
        first = networks[0]
        check_split(first, shared, teacher, trunk_gradient)
        split = cast(Splittable, first)
        if any(type(n) is not type(first) for n in networks):
            raise ValueError(
                "the branches of a trunk are networks of one architecture, got "
                + ", ".join(sorted({type(n).__name__ for n in networks}))
            )
        for network in networks[1:]:
            for name in split.trunk_modules(shared):
                network.set_submodule(name, first.get_submodule(name))
        self.branches = nn.ModuleList(networks)  # parameters() lists a shared one once
        self.shared = shared
        self.views = views  # a view (augmentation) of the batch per branch: the trunk runs on each (PCL)
        self.trunk_gradient = trunk_gradient
        self.teacher_name = teacher
        self.teacher: nn.Module | None = None
        fc = split.fc
        if teacher == "one":  # in the branches' dtype and on their device
            self.teacher = OneGate(split.trunk_channels(shared), len(networks)).to(fc.weight)
        elif teacher == "okddip":
            if len(networks) < 3:
                raise ValueError("OKDDip's teacher needs at least 3 branches: 2 or more auxiliary peers and the leader")
            self.teacher = PeerAttention(fc.in_features).to(fc.weight)
        elif teacher == "ffl":
            self.teacher = FusionHead(fc.in_features, len(networks), fc.out_features).to(fc.weight)
        elif teacher == "pcl":
            self.teacher = FusionLinear(fc.in_features, len(networks), fc.out_features).to(fc.weight)

    @property
    def num_outputs(self) -> int:
        """The peers it makes: its branches, then its learned teacher's outputs."""
        return len(self.branches) + teacher_outputs(self.teacher_name, len(self.branches))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The logits of every branch, then the teacher's outputs. ``x`` is a batch, or with ``views`` a
        stack of one view of it per branch, (m, batch, ...), each branch's trunk computed on its own."""
        m = len(self.branches)
        branches = cast("Sequence[Splittable]", self.branches)
        if self.views and x.dim() == 5:
            if x.shape[0] != m:
                raise ValueError(f"{x.shape[0]} views of the batch for {m} branches; give one per branch")
            trunks = [branches[0].trunk(view, self.shared) for view in x.unbind(0)]
        else:
            trunks = [branches[0].trunk(x, self.shared)] * m  # once for all branches
        for h in dict.fromkeys(trunks):  # each trunk output once
            if self.trunk_gradient == "mean" and h.requires_grad:
                h.register_hook(lambda grad: grad / m)
        maps = [b.tail(h, self.shared) for b, h in zip(branches, trunks)]
        logits = [b.fc(F.adaptive_avg_pool2d(f, 1).flatten(1)) for b, f in zip(branches, maps)]
        if self.teacher is not None:
            logits += self.teacher(trunks[0], maps, logits)
        return logits

    def peer_models(self) -> list[nn.Module]:
        """What each output is as a peer's model: a branch is its whole network (computing the trunk
        itself where it runs alone); a teacher's output is that output of the whole multi-branch network."""
        return [
            *self.branches,
            *(Teacher(self, len(self.branches) + k) for k in range(self.num_outputs - len(self.branches))),
        ]


class Teacher(nn.Module):
    """An output of a ``Branches``' learned teacher as a model of its own: ``forward(x)`` is the network's
    output ``index``."""

    def __init__(self, network: Branches, index: int):
        super().__init__()
        self.network = network
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[self.index]
