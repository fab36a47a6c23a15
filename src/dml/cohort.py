"""``dml.Cohort``: peers that learn from each other, usable in any training loop.

    cohort = dml.Cohort(models=[net_a, net_b], optimizers=[opt_a, opt_b],
                        loss=dml.MutualLoss(temperature=1.0, kl_weight=1.0))
    for x, y in loader:
        out = cohort.step(x, y)          # out.losses, out.logits: one per local peer
    cohort.evaluate(test_loader)         # per-peer and ensemble top-1 / top-5

Any knowledge-transfer graph instead of DML: ``loss=dml.Links([...], num_peers)`` (see links.py);
a frozen teacher is a peer whose optimizer is None; a temporal mean ("mean teacher") of peer i is a
peer whose optimizer is ``dml.MeanOf(i, decay)`` (its model None: a copy of peer i); a multi-branch
network (``dml.Branches``: branches on a shared trunk, ONE's gate) is one model with one optimizer
whose outputs are consecutive peers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .accuracy import Evaluation, evaluate_models
from .branches import Branches
from .distributed import LocalExchange, make_exchange
from .links import Link, Links, Progress
from .loss import MutualLoss
from .peer import MeanOf, Peer
from .runtime import Runtime, resolve_device
from .step import STEPS, Unit
from .sync_batchnorm import SyncedBatchNorm, synchronise_batchnorm

PROBE_INPUTS = 2  # inputs the shape check forwards: enough to tell the batch dimension, cheap on any network


class PeerOutputError(ValueError):
    """A peer's output is not the (batch, classes) logits a step needs. ``index`` is the peer's,
    ``found`` says what it returned, ``expected`` the shape it should have (classes None: unknown)."""

    def __init__(self, message: str, index: int, found: str, expected: tuple[int, int | None]):
        super().__init__(message)
        self.index, self.found, self.expected = index, found, expected


@dataclass
class StepOutput:
    """What one step computed for each local peer, still on the device (reading them syncs): the
    objective, its two parts (``ce``: the weighted, gated cross-entropy; ``kd``: the combined
    distillation term, 0 where no link is live; ``losses`` = ``ce`` + ``kd``) and the logits."""

    losses: list[torch.Tensor]
    logits: list[torch.Tensor]
    ce: list[torch.Tensor] = field(default_factory=list)
    kd: list[torch.Tensor] = field(default_factory=list)


class Cohort:
    """K peers trained together on the same batches; each minimises ``loss`` of its own logits against
    the other peers' detached logits (one model: plain cross-entropy training).

    ``loss``: ``MutualLoss`` (DML among all peers; the default) or ``Links`` (any graph of links with
    temperatures, weights and gates; linear gates need ``set_epoch``). ``models`` and ``optimizers``
    (and ``schedulers``, optional, not stepped by the cohort) are one per peer; a peer whose optimizer
    is None is frozen: a teacher in evaluation mode that no link may lead into; one whose optimizer is
    ``MeanOf(i, decay)`` is the exponential moving average of peer i, updated after each of its steps
    (its model None: a copy of peer i's; no link may lead into it either). Models may be any
    ``nn.Module`` mapping a batch of inputs to logits; they are moved to the device (and to
    channels_last unless ``plain``) in place, so optimizers built on their parameters stay valid.
    ``update``: "simultaneous" (all peers step on the same predictions) or "sequential".
    A ``Branches`` in ``models`` (with one optimizer over its parameters) is as many consecutive peers as it
    has outputs (its branches, then its teacher): ``loss`` and ``names`` count those peers, and each
    step computes its trunk once, backpropagates the sum of its peers' objectives once and steps its
    optimizer once (simultaneous update; its peers stay in one process; data-parallel replicas average the
    whole network's gradients and share its BatchNorm statistics).
    ``precision``: "fp32" (default: your models compute and return logits in their own dtype), or the
    fast path "auto" (bf16 autocast on CPU and CUDA, as ``dml train``), "bf16", "fp16" (CUDA).
    ``plain`` keeps PyTorch's defaults (see ``Runtime``). ``threads``: intra-op threads per peer on
    CPU (None: the peer's share of the cores, fewer where other programs keep them busy). Under torchrun
    (WORLD_SIZE > 1) each process keeps its own contiguous share of the peers and the cohort exchanges
    logits between processes; the entries of the peers other processes hold may be None (model and
    optimizer) where ``loss`` is ``Links``, which names the frozen peers. ``data_parallel=D`` (under
    torchrun, D processes per peer group) gives each peer D replicas, each computing a contiguous shard of
    every batch (BatchNorm statistics over the whole batch unless ``local_batchnorm``); where D does not
    divide a batch, each shard's objective weighs its rows, so that the step is the whole batch's.

    ``runtime`` and ``exchange`` (a ``Runtime`` and an exchange from distributed.py) replace the
    device, precision, plain and threads settings and the process group the cohort would make; ``dml
    train`` passes its own. Call ``close()`` (or use ``with``) when done: it stops the peer threads,
    restores torch's settings and leaves the process group, of what the cohort made itself.
    """

    def __init__(
        self,
        models: Sequence[nn.Module | None],
        optimizers: Sequence[torch.optim.Optimizer | MeanOf | None],
        loss: MutualLoss | Links | None = None,
        *,
        update: str = "simultaneous",
        precision: str = "fp32",
        device: str | torch.device = "auto",
        schedulers: Sequence | None = None,
        names: Sequence[str] | None = None,
        plain: bool = False,
        threads: int | None = None,
        runtime: Runtime | None = None,
        exchange: LocalExchange | None = None,
        data_parallel: int = 1,
        local_batchnorm: bool = False,
    ):
        if not models:
            raise ValueError("a cohort needs at least one model")
        if len(optimizers) != len(models) or (schedulers is not None and len(schedulers) != len(models)):
            raise ValueError(f"{len(models)} models need as many optimizers (and schedulers, if given)")
        if update not in STEPS:
            raise ValueError(f"update {update!r} is not one of: {', '.join(STEPS)}")
        models, optimizers, schedulers, groups = _expand_branches(models, optimizers, schedulers)
        if groups and update != "simultaneous":
            raise ValueError("branches on a shared trunk step with update='simultaneous'")
        self.groups = groups  # the first peer of each multi-branch network -> the network
        self.views = any(network.views for network in groups.values())  # batches come as views (views, batch, ...)
        means = {i: o for i, o in enumerate(optimizers) if isinstance(o, MeanOf)}
        _check_means(means, optimizers)
        names = (
            list(names)
            if names is not None
            else [type(models[means[i].source] if i in means else m).__name__.lower() for i, m in enumerate(models)]
        )
        if isinstance(loss, Links):
            loss = _with_means_frozen(loss, means)
        frozen = (
            sorted(loss.frozen)
            if isinstance(loss, Links)
            else [i for i, o in enumerate(optimizers) if o is None or i in means]
        )
        self.links = as_links(loss or MutualLoss(), len(models), frozen)  # checked before threads and groups exist
        _check_undetached(self.links, groups)
        self.update, self._step = update, STEPS[update]
        self.num_peers = len(models)  # in the whole cohort; ``peers`` holds this process's
        self._epoch: tuple[int, int, int | None] | None = None  # (epoch, epochs, steps per epoch): set_epoch
        self._steps_done = 0  # in the current epoch
        self.replica_weight = 1.0  # of this replica's objective in this step: see TorchExchange.replica_weight
        self._checked = False  # whether check_batch has passed (step runs it on its first batch)
        # what the cohort makes it closes; a runtime or exchange passed in stays the caller's
        self._made = [] if exchange is not None else ["exchange"]
        self._made += [] if runtime is not None else ["runtime"]
        where = runtime.device if runtime is not None else resolve_device(device)  # resolved once
        # a temporal mean lives in its source's process
        # where a peer must live: a temporal mean with its source, a branch or teacher with the first branch
        members = {i: first for first, network in groups.items() for i in range(first + 1, first + network.num_outputs)}
        homes = {**members, **{i: members.get(o.source, o.source) for i, o in means.items()}}
        self.exchange = exchange or make_exchange(len(models), where.type, homes, data_parallel)
        self.local_batchnorm = local_batchnorm
        try:
            computing = [i for i in self.exchange.local_indices if i not in members]  # one per unit of work
            self.runtime = runtime or Runtime(
                self.exchange.select_device(where),
                precision,
                plain,
                num_peers=len(computing),
                side_by_side=update == "simultaneous" and not self.views,
                threads=threads,
            )
            for first, network in groups.items():
                self.runtime.prepare(network)  # in place, all its parts at once
                if first in self.exchange.peer_data_groups and not local_batchnorm:  # one group for all its peers
                    synchronise_batchnorm(network, self.exchange.peer_data_groups[first])
            local = self.exchange.local_indices
            built = {
                i: self._peer(i, names[i], models[i], optimizers[i], None if schedulers is None else schedulers[i])
                for i in local
                if i not in means
            }
            built.update({i: self._mean(i, names[i], models[i], means[i], built) for i in local if i in means})
            self.peers = [built[i] for i in local]
        except BaseException:  # give back the threads, torch's settings and the process group
            self.close()
            raise

    def _peer(self, index: int, name: str, model: nn.Module | None, optimizer, scheduler) -> Peer:
        """Peer ``index`` on the runtime's device (in place: optimizers stay valid); a frozen one as a teacher computes."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model {index} is a {type(model).__name__}, not a torch.nn.Module")
        if (optimizer is None) != (index in self.links.frozen):
            raise ValueError(
                f"peer {index}: the links say it is {'' if index in self.links.frozen else 'not '}frozen, "
                f"but its optimizer is {'not ' if optimizer is not None else ''}None"
            )
        model = self.runtime.prepare(model)
        if optimizer is not None and index in self.exchange.peer_data_groups and not self.local_batchnorm:
            # the statistics of the whole batch, as one process computes them: see sync_batchnorm.py
            model = synchronise_batchnorm(model, self.exchange.peer_data_groups[index])
        return Peer(
            index, name, prepare_frozen(self.runtime, model) if optimizer is None else model, optimizer, scheduler
        )

    def _mean(self, index: int, name: str, model: nn.Module | None, mean_of: MeanOf, built: dict[int, Peer]) -> Peer:
        """Peer ``index``, the temporal mean of a peer of this process: a copy of it unless ``model`` is given."""
        source = built[mean_of.source].model
        if model is None:
            model = copy.deepcopy(source)
        else:  # the user's own copy of the network: it starts from the source's weights too
            model = self.runtime.prepare(model)
            try:
                model.load_state_dict(source.state_dict())
            except RuntimeError:
                raise ValueError(
                    f"peer {index}'s model is not built like peer {mean_of.source}, whose mean it is; "
                    "pass None for a copy"
                ) from None
        # training mode, as Mean Teacher's code: it teaches with the batch's statistics and keeps running
        # statistics of its own weights (averaged ones fit them badly: see MeanOf)
        model.requires_grad_(False).train()
        group = None if self.local_batchnorm else self.exchange.peer_data_groups.get(index)
        for layer in model.modules():  # a copy of a synchronised source: its own group (none: local statistics)
            if isinstance(layer, SyncedBatchNorm):
                layer.group = group
        if group is not None:  # a network of the user's own: synchronised like a peer's
            model = synchronise_batchnorm(model, group)
        return Peer(index, name, model, None, mean_of=mean_of)

    @property
    def units(self) -> list[Unit]:
        """What computes together: each multi-branch network's peers, every other peer alone."""
        return _units(self.peers, self.groups)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def set_epoch(self, epoch: int, epochs: int, steps_per_epoch: int | None = None) -> None:
        """Tell the cohort where training stands, at the start of each epoch (1-based) of ``epochs``:
        linear gates ramp with it; ramp gates also need ``steps_per_epoch``, and move with every step."""
        if self.links.needs_steps and not (steps_per_epoch or 0) > 0:
            raise ValueError("ramp gates move with every step: call cohort.set_epoch(epoch, epochs, steps_per_epoch)")
        self._epoch, self._steps_done = (epoch, epochs, steps_per_epoch), 0

    @property
    def progress(self) -> Progress | None:
        """Where training stands for the next step (None before ``set_epoch``)."""
        if self._epoch is None:
            return None
        epoch, epochs, steps_per_epoch = self._epoch
        return Progress(epoch, epochs, min(1.0, self._steps_done / steps_per_epoch) if steps_per_epoch else 0.0)

    def step(self, x: torch.Tensor, y: torch.Tensor, rows: int | None = None) -> StepOutput:
        """Train every local peer on one batch of inputs ``x`` and labels ``y`` (``x`` may be views of the batch,
        stacked (views, batch, ...), where a ``Branches`` has ``views``: see ``Unit``). It does not wait for the
        device, except on the first batch (``check_batch`` reads the labels' range once) and under fp16,
        where the GradScaler reads whether a gradient overflowed once per peer per step.

        With data-parallel replicas every process passes the whole batch and computes its own rows of it; a
        feed that loads only those rows passes them with ``rows``, the size of the whole batch."""
        # this replica's rows, where peers have replicas (shards of unequal size weigh their rows)
        self.replica_weight = self.exchange.replica_weight(y.shape[0] if rows is None else rows)
        if rows is None:
            x, y = self.exchange.shard(x, dim=1 if self.views else 0), self.exchange.shard(y)
        x, y = self.runtime.to_device(x), y.to(self.runtime.device, non_blocking=True)
        if not self._checked:  # the first batch only: it waits for the device once
            self.check_batch(x, y)
        terms, logits = self._step(self, x, y)
        self._steps_done += 1
        return StepOutput(
            [loss for loss, _, _ in terms],
            logits,
            [ce for _, ce, _ in terms],
            [kd if kd is not None else ce.new_zeros(()) for _, ce, kd in terms],
        )

    def check_batch(self, x: torch.Tensor, y: torch.Tensor | None = None, num_classes: int | None = None) -> int:
        """Check that every peer maps inputs like ``x`` to logits of shape (batch, classes), with the same
        classes for all peers (``num_classes`` where given), and that integer labels ``y`` (where given)
        are one class index per input within range; returns the number of classes.

        Every peer forwards the first ``PROBE_INPUTS`` inputs once, without gradients, in evaluation
        mode (each module's mode restored after) and with the global RNG restored after, so training is
        the same with or without it. ``step`` runs it on its first batch; a cohort that passed it is not
        checked again. PeerOutputError (a ValueError) names the first peer whose output does not fit;
        ValueError for labels.
        """
        x = x[0] if self.views and x.dim() == 5 else x  # views of the batch: the first is a batch like any
        probe = self.runtime.to_device(x)[:PROBE_INPUTS]
        n = probe.shape[0]
        local = [(p.index, p.label, self._output_shape(p, probe)) for p in self.peers]
        classes, source = num_classes, None
        for index, label, shape in sorted(entry for part in self.exchange.gather_objects(local) for entry in part):
            if classes is None and isinstance(shape, tuple) and len(shape) == 2 and shape[0] == n:
                classes, source = shape[1], label  # the first peer with logits sets the classes
            if shape != (n, classes):
                found = f"logits of shape {shape}" if isinstance(shape, tuple) else f"a {shape}, not a tensor of logits"
                like = f", as peer {source} returns" if source not in (None, label) else ""
                raise PeerOutputError(
                    f"peer {label} returns {found} for a batch of {n} inputs; expected logits of "
                    f"shape ({n}, {classes if classes is not None else 'classes'}){like}",
                    index,
                    found,
                    (n, classes),
                )
        assert classes is not None  # the cohort has peers, and the first with logits set it (or num_classes did)
        if y is not None and not y.is_floating_point():  # floating labels are probabilities: the loss checks them
            if tuple(y.shape) != (x.shape[0],):
                raise ValueError(
                    f"labels of shape {tuple(y.shape)} for a batch of {x.shape[0]} inputs; expected "
                    f"({x.shape[0]},): one class index per input"
                )
            if y.numel():
                low, high = torch.stack(torch.aminmax(y)).tolist()  # one wait for the device
                if low < 0 or high >= classes:
                    raise ValueError(
                        f"labels must be class indices in 0..{classes - 1} (the peers return {classes} "
                        f"logits), found labels from {low} to {high}"
                    )
        self._checked = True
        return classes

    def _output_shape(self, peer: Peer, x: torch.Tensor) -> tuple[int, ...] | str:
        """The shape of ``peer``'s output for ``x`` (its type's name where it is no tensor), leaving the peer,
        its BatchNorm statistics and the global RNG as they were."""
        modes = [(module, module.training) for module in peer.model.modules()]
        rng_devices = [self.device] if self.device.type in ("cuda", "mps") else []
        with (
            torch.random.fork_rng(rng_devices, device_type=self.device.type if rng_devices else "cuda"),
            torch.no_grad(),
            self.runtime.precision.autocast(),
        ):
            peer.model.eval()  # no running statistics moved, no dropout drawn
            try:
                out = peer.model(x)
            finally:
                for module, training in modes:
                    module.training = training
        return tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__

    def evaluate(self, batches: Iterable, local_rows: bool = False) -> Evaluation:
        """Top-1 / top-5 accuracy (%) of every local peer and of the whole cohort's mean-softmax ensemble (of the
        networks that train: not the teachers, the temporal means or the learned teachers). ``local_rows``: the
        batches hold only this replica's rows (as ``step``'s ``rows``)."""
        return evaluate_models(
            [p.model for p in self.peers],
            batches,
            self.runtime,
            self.exchange,
            ensemble_excludes=[*self.links.frozen, *self.learned_teachers],
            local_rows=local_rows,
        )

    @property
    def learned_teachers(self) -> list[int]:
        """The peers made of a multi-branch network's branches (ONE's gate): an ensemble themselves, left out of
        the cohort's."""
        return [
            i
            for first, network in self.groups.items()
            for i in range(first + len(network.branches), first + network.num_outputs)
        ]

    @property
    def trainable(self) -> list[Peer]:
        """The local peers that learn from gradients."""
        return [p for p in self.peers if p.trains]

    @property
    def saved(self) -> list[Peer]:
        """The local peers whose state a checkpoint holds: all but the teachers."""
        return [p for p in self.peers if not p.frozen]

    def state_dict(self) -> dict:
        """Every local trainable peer's model, optimizer and schedule, every temporal mean's model and
        step count, and the loss scaler (fp16). Frozen peers are not saved: they are what they were loaded as."""
        return {"peers": [p.state_dict() for p in self.saved], "scaler": self.runtime.precision.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("peers", ())) != len(self.saved):
            raise ValueError(f"the state holds {len(state.get('peers', ()))} peers, this cohort {len(self.saved)}")
        for peer, peer_state in zip(self.saved, state["peers"]):
            peer.load_state_dict(peer_state)
        self.runtime.precision.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        """Close the runtime and the exchange where the cohort made them (once)."""
        if "runtime" in self._made and hasattr(self, "runtime"):  # not set where making it failed
            self.runtime.close()
        if "exchange" in self._made:
            self.exchange.close()
        self._made = []

    def __enter__(self) -> Cohort:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _expand_branches(models: Sequence, optimizers: Sequence, schedulers: Sequence | None):
    """Models, optimizers and schedulers one per peer, with a ``Branches`` as its outputs' peers (each with the
    network's optimizer and schedule); and the first peer of each ``Branches`` -> the network."""
    peers_models: list[nn.Module | None] = []
    peers_optimizers: list[torch.optim.Optimizer | MeanOf | None] = []
    peers_schedulers: list = []
    groups: dict[int, Branches] = {}
    for k, model in enumerate(models):
        count = 1
        if isinstance(model, Branches):
            if optimizers[k] is None or isinstance(optimizers[k], MeanOf):
                raise ValueError(
                    f"model {k} is a multi-branch network: it trains, with one optimizer over its parameters"
                )
            groups[len(peers_models)] = model
            count = model.num_outputs
        peers_models += model.peer_models() if isinstance(model, Branches) else [model]
        peers_optimizers += [optimizers[k]] * count
        peers_schedulers += [None if schedulers is None else schedulers[k]] * count
    learned = {
        i
        for first, network in groups.items()
        for i in range(first + len(network.branches), first + network.num_outputs)
    }
    for o in optimizers:
        if isinstance(o, MeanOf) and o.source in learned:
            raise ValueError(
                f"peer {o.source} is a learned teacher of a multi-branch network: a temporal mean follows "
                "a branch or a peer"
            )
    return peers_models, peers_optimizers, None if schedulers is None else peers_schedulers, groups


def _units(peers: list[Peer], groups: dict[int, Branches]) -> list[Unit]:
    """The local peers as units of work: each multi-branch network's peers together, every other peer alone;
    with the view of the batch each reads (a network with views all, a temporal mean its branch's)."""
    branch_views = {
        first + k: k for first, network in groups.items() if network.views for k in range(len(network.branches))
    }
    units, k = [], 0
    while k < len(peers):
        network = groups.get(peers[k].index)
        count = network.num_outputs if network is not None else 1
        mean_of = peers[k].mean_of
        view = (
            None
            if not branch_views or (network is not None and network.views)
            else branch_views.get(mean_of.source, 0)
            if mean_of is not None
            else 0
        )
        units.append(Unit(peers[k : k + count], network, view))
        k += count
    return units


def _check_undetached(links: Links, groups: dict[int, Branches]) -> None:
    """A link that is not detached reads its source with its graph: the source is computed in the same
    backward as the target, by the target's own multi-branch network."""
    networks = {i: first for first, network in groups.items() for i in range(first, first + network.num_outputs)}
    for link in links.undetached:
        read = link.peers or links.trainable
        if link.target not in networks or any(networks.get(k) != networks[link.target] for k in read):
            raise ValueError(
                f"link {link.source} -> {link.target} is not detached: its source must be peers of the "
                "target's own multi-branch network (dml.Branches), computed in the same backward"
            )


def _with_means_frozen(links: Links, means: dict[int, MeanOf]) -> Links:
    """``links`` with every temporal mean among the frozen peers (a mean learns from no link: it follows its
    source), so that a user need not list them; a link other than the default self link into a mean is a
    ValueError naming it."""
    missing = sorted(set(means) - links.frozen)
    if not missing:
        return links
    for link in links.links:
        if link.target in missing and link != Link(link.target, link.target):
            raise ValueError(
                f"link {link.source} -> {link.target} leads into peer {link.target}, a temporal mean "
                "(dml.MeanOf): a mean follows its source and learns from no link"
            )
    kept = [link for link in links.links if link.target not in missing]
    return Links(kept, links.num_peers, links.combine, frozen=sorted(links.frozen | set(missing)))


def _check_means(means: dict[int, MeanOf], optimizers: Sequence) -> None:
    """A mean follows a peer that trains: not itself, not a teacher, not another mean."""
    for index, mean_of in means.items():
        source = mean_of.source
        if source == index:
            raise ValueError(f"peer {index} cannot be the mean of itself; name the peer it follows")
        if source >= len(optimizers):
            raise ValueError(
                f"peer {index} is the mean of peer {source}, which is not in a cohort of {len(optimizers)}"
            )
        if optimizers[source] is None or isinstance(optimizers[source], MeanOf):
            what = "a mean itself" if isinstance(optimizers[source], MeanOf) else "frozen (or held by another process)"
            raise ValueError(
                f"peer {index} is the mean of peer {source}, which is {what}; a mean follows a peer that trains"
            )


def as_links(loss: MutualLoss | Links, num_peers: int, frozen: list[int]) -> Links:
    """The cohort's objectives: ``MutualLoss`` becomes DML links among all peers (frozen ones teach)."""
    if isinstance(loss, MutualLoss):
        return Links.mutual(num_peers, loss.temperature, loss.kl_weight, frozen=frozen)
    if not isinstance(loss, Links):
        raise TypeError(f"loss must be a dml.MutualLoss or dml.Links, not {type(loss).__name__}")
    if loss.num_peers != num_peers:
        raise ValueError(f"the links are for {loss.num_peers} peers; the cohort has {num_peers} models")
    return loss


def prepare_frozen(runtime: Runtime, model: nn.Module) -> nn.Module:
    """A teacher as it computes: no gradients, evaluation mode (BatchNorm folded where the runtime folds)."""
    model.requires_grad_(False)
    return runtime.inference_model(model)
