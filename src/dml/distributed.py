"""Where the peers live. The engine asks an exchange for every peer's logits and never needs to
know whether they came from this process or from other ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LocalExchange:
    """The whole cohort in this process."""

    rank = 0
    world_size = 1
    is_writer = True

    def __init__(self, num_nodes: int):
        self.num_nodes = num_nodes
        self.local_indices = list(range(num_nodes))

    def gather_logits(self, local_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Detached logits of all peers, in cohort order, from this process's peers' logits."""
        return [z.detach() for z in local_logits]

    def share_logits(self, owner: int, logits: torch.Tensor | None) -> torch.Tensor:
        """Logits of peer ``owner`` as its process computed them (sequential updates)."""
        return logits

    def gather_objects(self, obj: object) -> list[object]:
        """``obj`` of every process, in rank order."""
        return [obj]

    def barrier(self) -> None:
        pass
