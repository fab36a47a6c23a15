"""Where the peers live. The engine asks an exchange for every peer's logits and never needs to
know whether they came from this process or from other ranks.

A peer is the unit of distribution: K peers over P processes (P <= K, contiguous groups; a
temporal mean goes with its source), each
process forwarding and stepping only its own peers. Per step only the detached logits cross
between processes (batch x classes numbers per peer), in one all_gather.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

# torch renamed all_gather_into_tensor; keep working on releases that only have the old name.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

TIMEOUT_ENV = "DML_DIST_TIMEOUT"  # seconds a collective may wait for a lost or stuck process
DEFAULT_TIMEOUT_S = 60

T = TypeVar("T")


def peers_of_rank(num_nodes: int, world_size: int, rank: int, homes: dict[int, int] | None = None) -> list[int]:
    """Peer indices of ``rank``: contiguous groups of the peers without a home, the first ranks
    holding one more where they do not divide evenly; a peer with a home (a temporal mean: its
    source) lives in its home's process."""
    homes = homes or {}
    placed = [i for i in range(num_nodes) if i not in homes]
    base, extra = divmod(len(placed), world_size)
    start = rank * base + min(rank, extra)
    mine = set(placed[start : start + base + (rank < extra)])
    return sorted(mine | {i for i, home in homes.items() if home in mine})


@dataclass(frozen=True)
class Mesh:
    """W processes as P = W / D peer groups x D data-parallel replicas. Rank r is replica r % D of
    peer group r // D, so that a peer's replicas sit on neighbouring ranks (one machine, where they
    fit: their gradients and BatchNorm statistics cross every step). A peer group holds a share of
    the peers as a whole process would without data parallelism."""

    world_size: int
    data_parallel: int = 1

    def __post_init__(self):
        if self.data_parallel < 1 or self.world_size % self.data_parallel:
            raise UserError(
                f"--data-parallel {self.data_parallel} does not divide the {self.world_size} processes; "
                "use a divisor of the process count"
            )

    @property
    def peer_groups(self) -> int:
        return self.world_size // self.data_parallel

    def position(self, rank: int) -> tuple[int, int]:
        """(peer group, replica) of ``rank``."""
        return divmod(rank, self.data_parallel)

    def peer_dimension(self, replica: int) -> list[int]:
        """The ranks that hold the same shard of every batch: logits travel between them."""
        return [group * self.data_parallel + replica for group in range(self.peer_groups)]

    def data_dimension(self, group: int) -> list[int]:
        """The ranks that hold the replicas of one peer group: gradients and statistics travel between them."""
        return list(range(group * self.data_parallel, (group + 1) * self.data_parallel))


class LocalExchange:
    """The whole cohort in this process."""

    rank = 0
    world_size = 1
    is_writer = True
    writes_peers = True
    peer_data_groups: dict = {}  # no data-parallel replicas

    def __init__(self, num_nodes: int):
        self.num_nodes = num_nodes
        self.local_indices = list(range(num_nodes))

    def select_device(self, device: torch.device) -> torch.device:
        return device

    def gather_logits(self, local_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Detached logits of all peers, in cohort order, from this process's peers' logits."""
        return [z.detach() for z in local_logits]

    def share_logits(self, owner: int, logits: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """Logits of peer ``owner`` as its process computed them (sequential updates)."""
        assert logits is not None  # this process holds every peer, the owner too
        return logits

    def gather_objects(self, obj: T) -> list[T]:
        """``obj`` of every process, in rank order."""
        return [obj]

    def shard(self, batch: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return batch

    def rows(self, n: int) -> tuple[int, int]:
        return 0, n

    def replica_weight(self, rows: int) -> float:
        return 1.0

    def average_gradients(self, model: nn.Module, peer: int) -> None:
        pass

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def max_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def check_same(self, fingerprint: torch.Tensor, what: str) -> None:
        """Fail when processes disagree on ``fingerprint`` (nothing to compare in one process)."""

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchExchange(LocalExchange):
    """Peers spread over the processes of a torch.distributed job (torchrun sets the environment).

    gloo on CPU, nccl with one GPU per process (LOCAL_RANK) on CUDA.
    """

    def __init__(self, num_nodes: int, device_type: str, homes: dict[int, int] | None = None, data_parallel: int = 1):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        self.mesh = Mesh(self.world_size, data_parallel)
        self.group_index, self.replica = self.mesh.position(self.rank)
        placed = num_nodes - len(homes or {})  # a temporal mean goes with its source
        if self.mesh.peer_groups > placed:
            raise UserError(
                f"{self.mesh.peer_groups} peer groups of processes for {placed} peers: each needs at least one "
                "peer; use at most as many processes as peers (temporal means live with their sources)"
                + (f", times --data-parallel {data_parallel}" if data_parallel > 1 else "")
            )
        self.num_nodes = num_nodes
        self.is_writer = self.rank == 0
        self.writes_peers = self.replica == 0  # one replica writes a peer's checkpoints
        self.layout = [peers_of_rank(num_nodes, self.mesh.peer_groups, g, homes) for g in range(self.mesh.peer_groups)]
        self.local_indices = self.layout[self.group_index]
        self.counts = [len(peers) for peers in self.layout]
        self.backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        if device_type == "cpu":
            # Share the machine's cores between this machine's processes instead of oversubscribing.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local_world_size))
        if not dist.is_initialized():
            _import_dynamo_first()
            # torchrun's agent keeps one store for every start of its group (--max-restarts): keys of the
            # start before would be read as this one's, and gloo would connect to a process that is gone
            restart, _ = launcher_restart()
            store, _, _ = next(dist.rendezvous("env://", self.rank, self.world_size, timeout=timeout))
            dist.init_process_group(
                self.backend,
                store=dist.PrefixStore(f"dml/start{restart}", store),
                rank=self.rank,
                world_size=self.world_size,
                timeout=timeout,
            )
        self.peer_group, self.data_group, self.peer_data_groups = self._groups()

    def _groups(self):
        """The process groups of this rank, built once (every rank creates every group, in one order):
        its peer dimension (None: the whole world), its data dimension, and one data group per local
        peer, so that peers stepping side by side on threads never share a group's collectives."""
        mesh = self.mesh
        if mesh.data_parallel == 1:
            return None, None, {}
        peer_group = data_group = None
        peer_data_groups = {}
        for replica in range(mesh.data_parallel):
            group = dist.new_group(mesh.peer_dimension(replica))
            peer_group = group if replica == self.replica else peer_group
        for index, peers in enumerate(self.layout):
            ranks = mesh.data_dimension(index)
            group = dist.new_group(ranks)
            data_group = group if index == self.group_index else data_group
            for peer in peers:
                group = dist.new_group(ranks)
                if index == self.group_index:
                    peer_data_groups[peer] = group
        return peer_group, data_group, peer_data_groups

    def shard(self, batch: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This replica's rows (along ``dim``: 1 for views of a batch) of a batch every replica drew whole
        (equal shards where they divide it)."""
        start, end = self.rows(batch.shape[dim])
        return batch.narrow(dim, start, end - start)

    def rows(self, n: int) -> tuple[int, int]:
        """The first and the past-the-end row of this replica's shard of ``n`` rows."""
        return self.replica * n // self.mesh.data_parallel, (self.replica + 1) * n // self.mesh.data_parallel

    def replica_weight(self, rows: int) -> float:
        """What this replica's objective (a mean over its shard of a batch of ``rows``) weighs so that the mean
        of the replicas' gradients is the whole batch's: its share of the rows times the replicas (1 where
        they divide the batch). Weighted before backward, so that synchronised BatchNorm layers add up
        gradients of one scale."""
        start, end = self.rows(rows)
        return (end - start) * self.mesh.data_parallel / rows

    def average_gradients(self, model: nn.Module, peer: int) -> None:
        """The mean of the gradients of ``model`` (peer ``peer``'s, or the whole multi-branch network whose first
        peer it is) over its replicas, in place: one all-reduce of one flat buffer."""
        if self.mesh.data_parallel == 1:
            return
        grads = [q.grad for q in model.parameters() if q.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.peer_data_groups[peer])
        flat /= self.mesh.data_parallel
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def sum_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over this peer group's replicas, in place (counts of a sharded epoch)."""
        if self.mesh.data_parallel > 1:
            dist.all_reduce(tensor, group=self.data_group)
        return tensor

    def max_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.mesh.data_parallel > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.data_group)
        return tensor

    def select_device(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def gather_logits(self, local_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # One all_gather per call: every rank contributes max(counts) slots (padding where it holds
        # fewer peers). fp32 on the wire, so every rank sees exactly what a single process would.
        most = max(self.counts)
        mine = torch.stack([z.detach().float() for z in local_logits])
        if mine.shape[0] < most:
            mine = torch.cat([mine, mine.new_zeros((most - mine.shape[0], *mine.shape[1:]))])
        everyone = mine.new_empty((self.mesh.peer_groups * most, *mine.shape[1:]))
        _all_gather_tensor(everyone, mine.contiguous(), group=self.peer_group)
        in_order: list[torch.Tensor | None] = [None] * self.num_nodes
        for r, peers in enumerate(self.layout):
            for k, index in enumerate(peers):
                in_order[index] = everyone[r * most + k]
        return cast("list[torch.Tensor]", in_order)  # the layout places every peer

    def share_logits(self, owner: int, logits: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        owner_group = next(g for g, peers in enumerate(self.layout) if owner in peers)
        buffer = (
            logits.detach().float().contiguous() if logits is not None else torch.empty_like(like, dtype=torch.float32)
        )
        dist.broadcast(buffer, src=owner_group * self.mesh.data_parallel + self.replica, group=self.peer_group)
        return buffer

    def gather_objects(self, obj: T) -> list[T]:
        """``obj`` of every peer group (this replica's), in order."""
        out: list[object] = [None] * self.mesh.peer_groups
        dist.all_gather_object(out, obj, group=self.peer_group)
        return cast("list[T]", out)  # every group sent its own obj

    def check_same(self, fingerprint: torch.Tensor, what: str) -> None:
        values = torch.empty(self.world_size, dtype=torch.float64, device=fingerprint.device)
        _all_gather_tensor(values, fingerprint.double().reshape(1))
        if not torch.all(values == values[0]):
            raise RuntimeError(
                f"processes disagree on {what}: fingerprints {values.tolist()}; every process must draw the "
                "same batches (same seed, data and torch version on every machine)"
            )

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            # Leave together: a process that tears its group down while another still talks to it
            # can abort (gloo's threads) at exit.
            try:
                dist.barrier()
            except RuntimeError:  # another process is gone (see lost_contact)
                pass  # another process is gone already: nothing left to wait for
            dist.destroy_process_group()


def _import_dynamo_first() -> None:
    """Import torch._dynamo before the process group exists. Imported later (a run's first optimizer
    does it), it takes 10 references to the group that destroy_process_group leaves (torch 2.13): the
    group then lives until the interpreter ends, and gloo's threads torn down there can abort a process
    that had finished its work (SIGABRT, exit code -6). The import costs nothing a run would not pay:
    about 1 s, at the first optimizer otherwise."""
    import torch._dynamo  # noqa: F401


def launcher_restart() -> tuple[int, int]:
    """(which restart of its process group this process is, the restarts its launcher allows): torchrun's
    elastic agent sets both (``--max-restarts``); (0, 0) for a first start and outside torchrun."""
    try:
        return (
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")),
        )
    except ValueError:  # not set by torchrun
        return 0, 0


def lost_contact(exc: BaseException) -> bool:
    """Whether ``exc`` says that another process of the group has gone (torch's DistError, or gloo's
    transport errors, which torch raises as plain RuntimeErrors)."""
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and "gloo/transport" in str(exc) and "by peer" in str(exc)
    )


def make_exchange(
    num_nodes: int, device_type: str, homes: dict[int, int] | None = None, data_parallel: int = 1
) -> LocalExchange:
    """A TorchExchange under torchrun (WORLD_SIZE > 1), otherwise the whole cohort locally. ``homes``:
    the peers that must live in another's process (a temporal mean: index -> its source);
    ``data_parallel``: replicas per peer (needs torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return TorchExchange(num_nodes, device_type, homes, data_parallel)
    if data_parallel > 1:
        raise UserError(
            f"--data-parallel {data_parallel} needs {data_parallel} or more processes: start them with "
            "--procs or torchrun"
        )
    return LocalExchange(num_nodes)
