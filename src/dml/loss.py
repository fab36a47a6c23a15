"""The mutual-learning objective, as pure functions of logits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 where it is in a narrower type (bf16, fp16 logits); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl_from_peer(
    peer_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0, per_sample: bool = False
) -> torch.Tensor:
    """KL(softmax(peer/T) || softmax(logits/T)), summed over classes and averaged over the batch
    (``per_sample``: one value per sample).

    The peer's distribution is the target: gradients flow only into ``logits``
    (the caller passes detached peer logits).
    """
    log_p_peer = F.log_softmax(at_least_fp32(peer_logits) / temperature, dim=1)
    log_p_self = F.log_softmax(at_least_fp32(logits) / temperature, dim=1)
    if per_sample:
        return F.kl_div(log_p_self, log_p_peer, reduction="none", log_target=True).sum(1)
    return F.kl_div(log_p_self, log_p_peer, reduction="batchmean", log_target=True)


def mutual_loss(
    logits: torch.Tensor,
    peer_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """Objective of one peer i in a cohort:

        L_i = CE(z_i, y) + w * mean_{j != i} T^2 * KL( softmax(z_j / T) || softmax(z_i / T) )

    ``logits`` is z_i; ``peer_logits`` holds the other peers' z_j (read detached: the gradient reaches
    z_i only; empty for independent training, which leaves plain cross-entropy). The T^2 factor keeps
    the KL gradients on the scale of the cross-entropy gradients when T != 1 (Hinton et al., 2015).
    """
    loss = F.cross_entropy(at_least_fp32(logits), labels)
    if peer_logits:
        kl = sum(kl_from_peer(z_j.detach(), logits, temperature) for z_j in peer_logits)
        loss = loss + kl_weight * temperature**2 * kl / len(peer_logits)
    return loss


@dataclass(frozen=True)
class MutualLoss:
    """The DML objective with its settings: ``loss(logits, peer_logits, labels)`` is ``mutual_loss``.

    With no peer logits (one model) it is exactly cross-entropy.
    """

    temperature: float = 1.0
    kl_weight: float = 1.0

    def __post_init__(self):
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature!r}")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"kl_weight must be a non-negative finite number, got {self.kl_weight!r}")

    def __call__(self, logits: torch.Tensor, peer_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return mutual_loss(logits, peer_logits, labels, self.temperature, self.kl_weight)
