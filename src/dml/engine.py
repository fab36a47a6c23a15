"""The epoch loop of ``dml train``: batches -> cohort steps -> metrics -> the run directory."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from .branches import Branches
from .checkpoint import check_run_dir, restore, save_epoch, set_rng_state, what_is_saved
from .cohort import PROBE_INPUTS, Cohort, PeerOutputError, StepOutput
from .config import TrainConfig
from .data.augment import Normalise
from .data.batches import TrainBatches, test_batches
from .data.dataset import ImageData, ImageSplit, Split, balanced_subset, hold_out
from .data.source import choose_loader, load_dataset
from .data.stream import FileSplit, StreamedTestBatches, StreamedTrainBatches, default_workers
from .distributed import launcher_restart, make_exchange
from .errors import RunStopped, UserError
from .evaluate import EVAL_BATCH_SIZE, load_model
from .graph import links_of
from .links import Links
from .models import create_model, is_import_path
from .peer import Peer, derive_seed
from .runlog import RunDir, environment_info, peer_dir_name
from .runtime import Runtime, resolve_device


# --- the run ------------------------------------------------------------------------------------
def load_data(cfg: TrainConfig, device: torch.device, recorded_loader: str | None = None) -> ImageData:
    """The run's data, subsets taken; in memory on ``device``, or streamed (``recorded_loader``: how the run
    being resumed read it, so that --data-loader auto cannot change its transforms)."""
    loader, why = choose_loader(cfg.dataset, cfg.data_dir, cfg.image_size, recorded_loader or cfg.data_loader)
    workers = cfg.workers if cfg.workers is not None else default_workers()
    data = load_dataset(
        cfg.dataset,
        cfg.data_dir,
        image_size=cfg.image_size,
        download=cfg.download,
        url=cfg.download_url,
        skip_checksum=cfg.skip_checksum,
        progress=cfg.progress,
        loader=loader,
        workers=workers,
    )
    data.how = f"streamed by {workers} worker(s) per process ({why})" if data.streamed else f"in memory ({why})"
    if cfg.val_samples is not None:  # held out first, so that --train-samples draws from the rest
        if len(data.train) - cfg.val_samples < max(cfg.batch_size, cfg.train_samples or 0):
            raise UserError(
                f"--val-samples {cfg.val_samples} leaves {max(len(data.train) - cfg.val_samples, 0)} of "
                f"the {len(data.train)} training images, fewer than --batch-size {cfg.batch_size}"
                + (f" or --train-samples {cfg.train_samples}" if cfg.train_samples else "")
                + "; hold out fewer"
            )
        data.train, data.val = hold_out(data.train, cfg.val_samples, derive_seed(cfg.seed, "val"), data.num_classes)
    if cfg.train_samples is not None:
        data.train = balanced_subset(
            data.train, cfg.train_samples, derive_seed(cfg.seed, "train-subset"), data.num_classes
        )
    if cfg.test_samples is not None:
        data.test = balanced_subset(data.test, cfg.test_samples, derive_seed(cfg.seed, "test-subset"), data.num_classes)
    for split in (data.train, data.test, data.val):
        if isinstance(split, ImageSplit):
            split.images, split.labels = split.images.to(device), split.labels.to(device)
    return data


def data_summary(data: ImageData) -> dict:
    """What config.json records of the data: its classes and the normalisation the run used."""
    return {
        "dataset": data.dataset,
        "classes": data.class_names,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "val_images": len(data.val) if data.val is not None else 0,
        "image_size": list(data.train.images.shape[2:])
        if isinstance(data.train, ImageSplit)
        else [data.image_size] * 2,
        "loader": "stream" if data.streamed else "memory",
        "mean": list(data.mean),
        "std": list(data.std),
    }


def build_peer(
    cfg: TrainConfig, index: int, num_classes: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, LRScheduler]:
    """Peer ``index`` of the recipe: its model drawn from its own seed, SGD, per-epoch cosine schedule."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", index))
        try:
            model = create_model(cfg.models[index], num_classes)
        except (ValueError, TypeError) as exc:  # a user's factory that fails to import or to return a module
            raise UserError(str(exc)) from None
    return model, *_sgd(cfg, model)


def _sgd(cfg: TrainConfig, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """The recipe's optimizer over ``model``'s parameters and its per-epoch schedule: cosine to 0, or
    steps at ``lr_milestones``."""
    # foreach: one multi-tensor update instead of a Python loop over ~100 parameters (a few % on CPU).
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.wd,
        nesterov=cfg.nesterov,
        foreach=not cfg.plain,
    )
    if cfg.lr_milestones:
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_milestones), cfg.lr_gamma)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=0.0)


def build_branches(
    cfg: TrainConfig, trunk: dict, num_classes: int
) -> tuple[Branches, torch.optim.Optimizer, LRScheduler]:
    """A [[trunk]] of the graph: its branches drawn as the peers they are (each from its own seed, the
    trunk branch 0's), its learned teacher from the teacher peer's seed, one optimizer and schedule."""
    first, count = trunk["first"], trunk["branches"]
    networks = [build_peer(cfg, first + k, num_classes)[0] for k in range(count)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "init", first + count))
        network = Branches(
            networks, trunk["shared"], trunk["teacher"], trunk["trunk_gradient"], trunk.get("views", False)
        )
    return network, *_sgd(cfg, network)


def build_frozen_peer(cfg: TrainConfig, index: int, num_classes: int) -> tuple[torch.nn.Module, None, None]:
    """Peer ``index`` as the graph's checkpoint holds it: a teacher, never trained or saved."""
    assert cfg.graph_spec is not None  # a teacher is a peer of the resolved graph
    spec = cfg.graph_spec["peers"][index]
    # the spec's model is the one the user named (a graph file's model, --teacher-model) or a built-in
    checkpoint = load_model(spec["checkpoint"], torch.device("cpu"), model=spec["model"])
    if checkpoint.num_classes != num_classes:
        raise UserError(
            f"teacher checkpoint {checkpoint.path} has {checkpoint.num_classes} classes, this run's data "
            f"{num_classes}; use a teacher trained on the same dataset"
        )
    return checkpoint.model, None, None


def cohort_links(cfg: TrainConfig) -> Links:
    """Every peer's objective: the graph's links, or DML among all peers (one peer: cross-entropy)."""
    if cfg.graph_spec is not None:
        return links_of(cfg.graph_spec)
    return Links.mutual(cfg.num_nodes, cfg.temperature, cfg.kl_weight, **cfg.kd_gate)


def build_runtime(cfg: TrainConfig, exchange, device: torch.device | None = None) -> Runtime:
    """How this process computes (on ``device`` where the caller already chose it); peers side by side
    only where they are independent within a step, and not beside a network with views: side by side
    with a temporal mean, two fresh runs of PCL's graph differed from the first epoch (in turn, three
    runs were equal)."""
    device = device or exchange.select_device(resolve_device(cfg.device))
    computing = [i for i in exchange.local_indices if i not in cfg.trunk_members]  # a trunk's peers compute as one
    return Runtime(
        device,
        cfg.precision,
        cfg.plain,
        num_peers=len(computing),
        side_by_side=cfg.update == "simultaneous" and cfg.views == 1,
        threads=cfg.threads,
    )


def build_cohort(cfg: TrainConfig, exchange, runtime: Runtime, num_classes: int) -> Cohort:
    """This process's peers as ``dml train`` runs them (``dml bench`` measures exactly this); the
    other processes' peers are not built. The runtime and the exchange stay the caller's to close."""
    build = {i: build_frozen_peer for i in cfg.frozen}
    local, homes = exchange.local_indices, cfg.homes
    # a multi-branch network stands for its peers (the cohort expands it), in the place of its first branch
    parts: dict[int, tuple] = {
        t["first"]: build_branches(cfg, t, num_classes) for t in cfg.trunks if t["first"] in local
    }
    parts.update({i: build.get(i, build_peer)(cfg, i, num_classes) for i in local if i not in homes and i not in parts})
    # a temporal mean is built by the cohort as a copy of its source, which lives in the same process
    parts.update({i: (None, mean_of, None) for i, mean_of in cfg.means.items() if i in local})
    members = {i for i in cfg.trunk_members if homes[i] in local}  # another process's trunk: one None per peer
    models, optimizers, schedulers = zip(
        *(parts.get(i, (None, None, None)) for i in range(cfg.num_nodes) if i not in members)
    )
    return Cohort(
        models,
        optimizers,
        cohort_links(cfg),
        update=cfg.update,
        schedulers=schedulers,
        names=cfg.models,
        runtime=runtime,
        exchange=exchange,
        local_batchnorm=cfg.local_batchnorm,
    )


def check_outputs(cfg: TrainConfig, cohort: Cohort, feed: Feed, data: ImageData) -> None:
    """Every peer returns one logit per class of the data for each image: one forward pass of two
    training images that changes nothing (Cohort.check_batch). The data's labels were checked when read."""
    try:
        cohort.check_batch(feed.probe(data), num_classes=data.num_classes)
    except PeerOutputError as exc:
        peer = cfg.graph_spec["peers"][exc.index] if cfg.graph_spec is not None else None
        if peer is not None and peer["checkpoint"] is not None:
            named = f"the teacher {peer['checkpoint']}"
        elif peer is not None and not cfg.teacher:
            named = f"graph peer {peer['name']!r}, model {peer['model']}"
        else:
            named = f"--models {cfg.models[exc.index]}"
        n, classes = exc.expected
        advice = (
            "; its factory must build the network for the num_classes it is called with"
            if is_import_path(cfg.models[exc.index])
            else ""
        )
        raise UserError(
            f"peer {exc.index} ({named}) returns {exc.found} for a batch of {n} images; expected "
            f"({n}, {classes}): one logit for each of the {classes} classes of {data.dataset}{advice} "
            "(nothing was written)"
        ) from None


@dataclass
class Feed:
    """A run's batches: training batches shuffled and augmented from one seeded generator (saved with
    checkpoints), and evaluation batches of the test and validation splits."""

    generator: torch.Generator
    normalise: Normalise
    batches: TrainBatches | StreamedTrainBatches
    evaluation: Callable[[Split], Iterable[tuple[torch.Tensor, torch.Tensor]]]

    def probe(self, data: ImageData) -> torch.Tensor:
        """The first PROBE_INPUTS training images as evaluation sees them (Cohort.check_batch's input)."""
        if isinstance(data.train, ImageSplit):
            return self.normalise(data.train.images[:PROBE_INPUTS])
        first = data.train.take(torch.arange(min(PROBE_INPUTS, len(data.train))))
        return next(iter(StreamedTestBatches(first, data.image_size or 0, PROBE_INPUTS, self.normalise)))[0]


def build_feed(cfg: TrainConfig, runtime: Runtime, data: ImageData, exchange) -> Feed:
    generator = torch.Generator(device=runtime.device)
    generator.manual_seed(derive_seed(cfg.seed, "data"))
    normalise = Normalise(data.mean, data.std, runtime.device, runtime.channels_last)
    if isinstance(data.train, ImageSplit):
        batches = TrainBatches(
            data.train.images, data.train.labels, cfg.batch_size, generator, normalise, cfg.views, cfg.augment
        )
        return Feed(
            generator,
            normalise,
            batches,
            lambda split: test_batches(cast(ImageSplit, split).images, split.labels, EVAL_BATCH_SIZE, normalise),
        )
    # each process decodes only the rows it computes (exchange.rows): its replica's share of every batch
    workers, size = cfg.workers if cfg.workers is not None else default_workers(), data.image_size or 0
    streamed = StreamedTrainBatches(
        data.train,
        size,
        cfg.batch_size,
        generator,
        normalise,
        augment=cfg.augment,
        views=cfg.views,
        workers=workers,
        rows=exchange.rows,
    )
    # one per split, its workers kept between evaluations; in training batches, not EVAL_BATCH_SIZE's 1,000 CIFAR
    # images: at 224 x 224 one activation of 1,000 images is 1.6 GB, and memory must not grow with the test split
    loaders: dict[int, StreamedTestBatches] = {}

    def evaluation(split: Split) -> StreamedTestBatches:
        if id(split) not in loaders:
            loaders[id(split)] = StreamedTestBatches(
                cast(FileSplit, split), size, cfg.batch_size, normalise, workers=workers, rows=exchange.rows
            )
        return loaders[id(split)]

    return Feed(generator, normalise, streamed, evaluation)


def train(cfg: TrainConfig, resume: bool | str = False, stop_after: int | None = None, exchange=None) -> Path:
    """Train the cohort ``cfg`` describes; returns the run directory.

    ``stop_after`` ends this invocation after that many epochs (for time-limited jobs); the run
    continues with ``resume=True`` exactly as if it had not stopped; ``resume="auto"`` continues a run that
    holds a complete epoch and starts one that does not (see check_run_dir). A ``--graph`` or ``--teacher``
    not yet resolved is read here (``TrainConfig.resolved``).
    """
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    exchange = exchange or make_exchange(cfg.num_nodes, device.type, cfg.homes, cfg.data_parallel)
    run = None
    try:
        device = exchange.select_device(device)
        run = RunDir.of(cfg, writer=exchange.is_writer)
        resume = check_run_dir(cfg, resume, run)  # decided by every process before any of them writes
        data = load_data(cfg, device, run.recorded_loader() if resume else None)
        exchange.barrier()  # every process has checked the run directory before rank 0 writes to it
        runtime = build_runtime(cfg, exchange, device)
        try:
            cohort = build_cohort(cfg, exchange, runtime, data.num_classes)
            feed = build_feed(cfg, runtime, data, exchange)
            check_outputs(cfg, cohort, feed, data)  # before anything is written to the run directory
            Training(cfg, run, data, cohort, feed).train(resume, stop_after)
        finally:
            runtime.close()  # back to torch's settings for the rest of the process
    except KeyboardInterrupt:  # Ctrl-C before training started (loading the data, building the peers)
        kept = what_is_saved(run) if run is not None else "nothing was saved; run the same command again"
        raise RunStopped(f"interrupted before training started; {kept}", exit_code=130) from None
    finally:
        exchange.close()
    return run.path


@dataclass
class Training:
    """One run of ``dml train``: what it trains (cohort, data, the feed of batches), where it writes
    (run), what it follows (config), and the epoch loop over them."""

    config: TrainConfig
    run: RunDir
    data: ImageData
    cohort: Cohort
    feed: Feed

    def log(self, message: str) -> None:
        if self.cohort.exchange.is_writer:
            tqdm.write(message, file=sys.stdout)

    def start(self, resume: bool) -> int:
        """Restore the last complete epoch (``resume`` where there is one) or create the run directory;
        returns the first epoch to train."""
        cfg, run, runtime = self.config, self.run, self.cohort.runtime
        state = restore(run, self.cohort) if resume and run.has_checkpoints() else None
        if state is not None:
            set_rng_state(self.feed.generator, state)
            runtime.use_threads(state.get("threads") or run.recorded_threads() or runtime.threads)
            run.truncate_metrics(state["epoch"])
        else:  # a new run, or one stopped before its first epoch was complete
            if resume and run.has_checkpoints():  # said, not silent: checkpoints are there but no epoch is whole
                self.log(f"--resume: {run.path} holds no epoch that every peer saved; starting over from epoch 1")
            run.create(cfg, {**environment_info(runtime), "data": data_summary(self.data)})
            run.truncate_metrics(0)
        run.first_epoch = 1 if state is None else state["epoch"] + 1
        restart, max_restarts = launcher_restart()
        if restart:
            saved = run.first_epoch - 1
            run.log_restart(saved, restart, max_restarts)
            self.log(
                f"restart {restart} of {max_restarts} after a lost process: "
                + (f"epoch {saved} is saved, epoch {saved + 1} runs again" if saved else "the run starts over")
            )
        self.cohort.exchange.barrier()
        return run.first_epoch

    def describe(self, start_epoch: int) -> str:
        cfg, data, runtime = self.config, self.data, self.cohort.runtime
        if start_epoch > cfg.epochs:
            return f"{self.run.path}: all {cfg.epochs} epochs are done; nothing to resume"
        runner = runtime.runner
        side_by_side = f", {runner.workers} peer threads" if runner.workers > 1 else ""
        if runtime.device.type == "cpu":
            side_by_side += (
                f", {runner.threads_per_worker} thread{'s' if runner.threads_per_worker > 1 else ''} per peer"
            )
        val_images = f" / {len(data.val)} validation" if data.val is not None else ""
        return (
            f"{self.run.path}: {cfg.num_nodes} peer(s) {', '.join(cfg.models)} on {runtime.device} "
            f"({runtime.precision.name}{side_by_side}), {len(data.train)} train / "
            f"{len(data.test)} test{val_images} images {data.how}, epoch {start_epoch} of {cfg.epochs}"
        )

    def train(self, resume: bool, stop_after: int | None) -> None:
        """Every epoch from the start (or the resumed one) to the last, or ``stop_after`` of them."""
        cfg, run = self.config, self.run
        start_epoch = self.start(resume)
        self.log(self.describe(start_epoch))
        try:
            last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch - 1 + stop_after)
            labels = peer_labels(cfg)
            with StopSignal(saved=start_epoch - 1) as stop:
                try:
                    for epoch in range(start_epoch, last_epoch + 1):
                        records = self.train_epoch(epoch, stop)
                        run.log_epoch(records)
                        for record in records:
                            self.log(_summary_line(record, cfg.epochs, labels))
                        if epoch < cfg.epochs:
                            _rethink_threads(self.cohort.runtime, epoch, self.log)
                        stop.saving = epoch
                        self.save(epoch, records)
                        stop.saved, stop.saving = epoch, None
                        stop.check()  # a signal during the epoch's last step or its saving stops here
                except KeyboardInterrupt:  # a second signal, or Ctrl-C where no handler could be set
                    raise stop.stopped() from None
        finally:
            run.close()

    def train_epoch(self, epoch: int, stop: StopSignal | None = None) -> list[dict]:
        """Train one epoch and evaluate; return the epoch's records for every peer in the cohort."""
        cfg, cohort, batches = self.config, self.cohort, self.feed.batches
        peers = cohort.peers
        started = time.perf_counter()
        cohort.set_epoch(epoch, cfg.epochs, len(batches))
        lrs = [p.lr for p in peers]
        metrics = StepMetrics(len(peers), cohort.device)
        # disable=None: no bar when stderr is not a terminal (log files stay readable).
        bar = tqdm(
            total=len(batches),
            desc=f"epoch {epoch}/{cfg.epochs}",
            unit="step",
            leave=False,
            disable=None if cfg.progress and cohort.exchange.is_writer else True,
            dynamic_ncols=True,
        )
        # reading the loss syncs with the device: so every 50 steps on long epochs, but about ten times on
        # short ones, which would otherwise end before their first reading
        every = max(1, min(50, len(batches) // 10))

        def show_progress(n: int) -> None:
            bar.update()
            if n % every == 0 and not bar.disable:
                rate = n * cfg.batch_size * len(peers) / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{metrics.mean_loss():.3f}", img_s=f"{rate:.0f}")

        try:
            train_steps(cohort, batches, metrics, show_progress, f"epoch {epoch}, ", stop, cfg.check_batches)
        finally:
            bar.close()
        for scheduler in {id(p.scheduler): p.scheduler for p in cohort.trainable}.values():
            assert scheduler is not None  # build_peer and build_branches give each a schedule
            scheduler.step()  # once each: a multi-branch network's peers share one
        train = metrics.read(cohort.exchange)
        test, val = self.evaluate()
        seconds = time.perf_counter() - started
        local = [
            {
                "epoch": epoch,
                "node": p.index,
                "model": p.model_name,
                "lr": lrs[k],
                "train_loss": train["loss"][k],
                **({"train_ce": train["ce"][k], "train_kd": train["kd"][k]} if p.trains else {}),
                "train_acc": train["acc"][k],
                **({"val_acc": val.top1[k]} if val else {}),
                "test_acc": test.top1[k],
                "seconds": seconds,
                **_role(p),
            }
            for k, p in enumerate(peers)
        ]
        records = sorted((r for part in cohort.exchange.gather_objects(local) for r in part), key=lambda r: r["node"])
        records.append(
            {
                "epoch": epoch,
                "node": "ensemble",
                **({"val_acc": val.ensemble_top1} if val else {}),
                "test_acc": test.ensemble_top1,
                "seconds": seconds,
            }
        )
        return records

    def evaluate(self):
        """The cohort on the test split, and on the validation split where the run holds one (else None)."""
        data, batches, local = self.data, self.feed.evaluation, self.data.streamed
        test = self.cohort.evaluate(batches(data.test), local_rows=local)
        val = None if data.val is None else self.cohort.evaluate(batches(data.val), local_rows=local)
        return test, val

    def save(self, epoch: int, records: list[dict]) -> None:
        save_epoch(self.run, epoch, self.cohort, records, self.feed.generator, self.config, self.data.num_classes)


def _role(peer: Peer) -> dict:
    """What a record says of a peer that does not train: a teacher, or the temporal mean of peer i."""
    if peer.mean_of is not None:
        return {"role": "mean", "mean_of": peer.mean_of.source}
    return {"role": "teacher"} if peer.frozen else {}


def _rethink_threads(runtime: Runtime, epoch: int, log) -> None:
    """Between epochs, measure again how many threads a peer gains from: a program that started
    beside the run would otherwise slow every step of it (see threads.py)."""
    before = runtime.threads
    now = runtime.rethink_threads()
    if now != before:
        why = "other programs keep the cores busy" if now < before else "cores are free again"
        log(f"{why}: {now} thread{'s' if now > 1 else ''} per peer from epoch {epoch + 1} (was {before})")


class StepMetrics:
    """Per-peer sums of the objective, of its cross-entropy and distillation terms and of correct
    predictions, kept on the device so that the training loop never waits for it; read once per epoch."""

    def __init__(self, num_peers: int, device: torch.device):
        # rows: objective, cross-entropy term, distillation term
        self.loss_sum = torch.zeros(
            3, num_peers, device=device, dtype=torch.float32 if device.type == "mps" else torch.float64
        )
        self.correct = torch.zeros(num_peers, device=device, dtype=torch.int64)
        # step numbers (1-based) of the first non-finite logits / loss of each peer; 0: none yet
        self.first_broken_logits = torch.zeros(num_peers, device=device, dtype=torch.int64)
        self.first_broken_loss = torch.zeros(num_peers, device=device, dtype=torch.int64)
        self.steps = 0
        self.samples = 0

    def add(self, out: StepOutput, labels: torch.Tensor) -> None:
        terms = torch.stack([torch.stack(out.losses), torch.stack(out.ce), torch.stack(out.kd)]).detach()
        losses, logits = terms[0], out.logits
        self.steps += 1
        self.samples += labels.shape[0]
        self.loss_sum += terms
        self.correct += torch.stack([(z.argmax(1) == labels).sum() for z in logits])
        # Remember where each peer first diverged, without waiting for the device. A peer whose own
        # predictions are broken is the culprit; its peers' losses break through the KL term too.
        broken_logits = torch.stack([~torch.isfinite(z).all() for z in logits])
        for first, broken in (
            (self.first_broken_logits, broken_logits),
            (self.first_broken_loss, ~torch.isfinite(losses)),
        ):
            first.masked_fill_((first == 0) & broken, self.steps)

    def check_finite(self, peers: list[Peer], where: str, exchange=None) -> None:
        """Stop with the peer and step of the first non-finite loss, if any (syncs with the device); every
        replica of a data-parallel peer stops at the same check (``exchange``: the steps are shared)."""
        for first in (self.first_broken_logits, self.first_broken_loss):
            if exchange is not None:
                first = exchange.max_over_replicas(first.clone())
            steps = first.tolist()
            culprits = [(step, peer) for step, peer in zip(steps, peers) if step]
            if culprits:
                step, peer = min(culprits, key=lambda c: c[0])
                raise RunStopped(
                    f"peer {peer.label} diverged: its loss is not finite at {where}step {step}; the checkpoint "
                    "of the last complete epoch is kept; lower --lr, or use --precision fp32, and start again"
                )

    def mean_loss(self) -> float:
        return self.loss_sum[0].mean().item() / max(self.steps, 1)

    def read(self, exchange=None) -> dict[str, list[float]]:
        """Per peer: the objective ("loss") and its terms ("ce", "kd") averaged over steps, and train
        accuracy ("acc") in percent; over every replica's shard where ``exchange`` has data-parallel ones."""
        sums, correct = self.loss_sum, self.correct
        replicas = 1
        if exchange is not None:
            replicas = exchange.sum_over_replicas(torch.ones(1, device=correct.device, dtype=torch.int64)).item()
            sums, correct = exchange.sum_over_replicas(sums.clone()), exchange.sum_over_replicas(correct.clone())
        loss, ce, kd = ([total / (self.steps * replicas) for total in row] for row in sums.tolist())
        return {
            "loss": loss,
            "ce": ce,
            "kd": kd,
            "acc": [100.0 * c / (self.samples * replicas) for c in correct.tolist()],
        }


DIVERGENCE_CHECK_EVERY = 100  # steps between looks at the loss (each look waits for the device)


def train_steps(
    cohort: Cohort,
    batches,
    metrics: StepMetrics,
    on_step=None,
    where: str = "",
    stop: StopSignal | None = None,
    check_batches: bool = False,
) -> None:
    """The training loop proper: one cohort step per batch, metrics accumulated on the device.

    ``dml train`` and ``dml bench`` both run exactly this. Stops with RunStopped on a non-finite
    loss (checked every DIVERGENCE_CHECK_EVERY steps and at the end) or a requested stop.
    """
    rows = getattr(batches, "global_batch", None)
    for n, (x, y) in enumerate(batches, start=1):
        if stop is not None:
            stop.check()
        if check_batches:
            cohort.exchange.check_same(batch_fingerprint(x, y), f"the batch of {where}step {n}")
        if rows is None:
            metrics.add(cohort.step(x, y), cohort.exchange.shard(y))
        else:  # a feed that loads only this replica's rows of each batch of ``rows``
            metrics.add(cohort.step(x, y, rows=rows), y)
        if n % DIVERGENCE_CHECK_EVERY == 0:
            metrics.check_finite(cohort.peers, where, cohort.exchange)
        if on_step is not None:
            on_step(n)
    metrics.check_finite(cohort.peers, where, cohort.exchange)


class StopSignal:
    """SIGINT / SIGTERM ask training to stop before its next step; a second signal stops at once.

    The run then holds the checkpoint of its last complete epoch (an epoch boundary), from which
    ``--resume`` continues exactly, or, stopped in its first epoch, nothing (a rerun starts it over).
    """

    EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self, saved: int = 0):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}  # signal -> the handler it had
        self.saved = saved  # the last epoch the run directory holds (0: none), for the message
        self.saving: int | None = None  # the epoch being saved, where a second signal may cut its commit

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for sig in self.EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def check(self) -> None:
        if self.received is not None:
            raise self.stopped()

    def stopped(self) -> RunStopped:
        """What a stop leaves, said as it is: the epoch to --resume after, or nothing saved."""
        signum = self.received or signal.SIGINT  # none received: a KeyboardInterrupt (Ctrl-C elsewhere)
        stopped = f"stopped by {signal.Signals(signum).name} in epoch {self.saved + 1}"
        if self.saving is not None:  # resuming completes the commit, or falls back to the epoch before
            message = f"{stopped}; epoch {self.saving} was being saved: continue with the same command and --resume"
        elif self.saved:
            message = f"{stopped}; epoch {self.saved} is saved: continue with the same command and --resume"
        else:
            message = (
                f"{stopped}, before any epoch was complete: nothing was saved; run the same command again to start over"
            )
        return RunStopped(message, exit_code=self.EXIT_CODES[signum])


def batch_fingerprint(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A number that changes when any image, label or their order changes."""
    position = torch.arange(1, x.shape[0] + 1, device=x.device, dtype=torch.float64)
    return (x.flatten(1).double().sum(1) * position).sum() + (y.double() * position).sum()


def peer_labels(cfg: TrainConfig) -> dict[int, str]:
    """How the console names each peer: as its folder (``0_mynets-small_cnn``), with a graph file's name
    for it beside (``0_resnet32 (student)``); the folders keep ``<index>_<model>`` so that runs stay
    readable by earlier versions and by the tools that find checkpoints by folder."""
    names: list[str | None] = [None] * len(cfg.models)
    if cfg.graph:
        assert cfg.graph_spec is not None  # resolved: the graph file's peers are read
        names = [peer["name"] for peer in cfg.graph_spec["peers"]]
    labels = {
        i: peer_dir_name(i, model) + (f" ({name})" if name else "")
        for i, (model, name) in enumerate(zip(cfg.models, names))
    }
    width = max(12, *map(len, labels.values()))  # the columns after it line up
    return {i: label.ljust(width) for i, label in labels.items()}


def _summary_line(record: dict, epochs: int, labels: dict[int, str]) -> str:
    val = f"val_acc {record['val_acc']:6.2f}% " if "val_acc" in record else ""
    if record["node"] == "ensemble":
        return f"epoch {record['epoch']}/{epochs} ensemble     {val}test_acc {record['test_acc']:6.2f}%"
    lr = {"teacher": "teacher", "mean": f"mean of {record.get('mean_of')}"}.get(
        record.get("role", ""), f"lr {record['lr']:.5f}"
    ).ljust(10)
    terms = f" (ce {record['train_ce']:.4f} + kd {record['train_kd']:.4f})" if "train_ce" in record else ""
    # a temporal mean does not train: its loss on the training batches says nothing here
    train = (
        ""
        if record.get("role") == "mean"
        else f"train_loss {record['train_loss']:.4f}{terms} train_acc {record['train_acc']:6.2f}% "
    )
    return (
        f"epoch {record['epoch']}/{epochs} {labels[record['node']]} {lr} {train}"
        f"{val}test_acc {record['test_acc']:6.2f}% ({record['seconds']:.1f}s)"
    )
