"""The mutual-learning step, evaluation and the epoch loop with its run directory."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .cohort import Peer, build_peer, derive_seed
from .config import TrainConfig
from .data.augment import NORMALISATION, Normalise
from .data.batches import TrainBatches, test_batches
from .data.cifar import CifarData, balanced_subset, load_cifar
from .distributed import make_exchange
from .errors import RunStopped, UserError
from .loss import mutual_loss
from .peer_threads import SerialPeers, ThreadedPeers, peer_runner
from .runlog import CONFIG_FILE, LAST_NEXT, RunDir, environment_info, load_checkpoint

EVAL_BATCH_SIZE = 1000
SERIAL = SerialPeers()


# --- where and how to compute -----------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was requested but MPS is not available; use --device cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, plain: bool = False) -> str:
    """auto: bf16 autocast on CPU (as the seed effectively ran) and on CUDA where supported;
    fp32 on the plain path."""
    if name == "auto" and plain:
        return "fp32"
    if name == "auto":
        if device.type == "cpu":
            return "bf16"
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on this device")
    return name


@dataclass
class Precision:
    """Autocast and loss scaling for one precision setting."""

    name: str
    device: torch.device

    def __post_init__(self):
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


# --- one training step ------------------------------------------------------------------------
def _others(all_logits: list[torch.Tensor], index: int) -> list[torch.Tensor]:
    return [z for j, z in enumerate(all_logits) if j != index]


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


def _forward(peer: Peer, x: torch.Tensor, precision: Precision) -> torch.Tensor:
    with precision.autocast():  # autocast is per thread: entered where the peer runs
        return peer.model(x)


def simultaneous_step(peers: list[Peer], x, y, cfg: TrainConfig, exchange, precision: Precision,
                      runner=SERIAL):
    """Every peer forwards the batch once; each then steps on the same set of peer predictions.

    ``runner`` runs each peer's forward, and then its loss, backward and optimizer step: in turn on
    this thread (SERIAL) or side by side (peer_threads.ThreadedPeers); the result is the same.
    """
    logits = runner.map(functools.partial(_forward, x=x, precision=precision), peers)
    all_logits = exchange.gather_logits(logits)

    def update(k: int) -> torch.Tensor:
        peer = peers[k]
        loss = mutual_loss(logits[k], _others(all_logits, peer.index), y, cfg.temperature, cfg.kl_weight)
        peer.optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(peer.optimizer)
        return loss

    losses = runner.map(update, range(len(peers)))
    precision.scaler.update()
    return losses, logits


def sequential_step(peers: list[Peer], x, y, cfg: TrainConfig, exchange, precision: Precision,
                    runner=SERIAL):
    """The paper's Algorithm 1: peers step in turn, each against the predictions of the peers
    before it as they are after their update (recomputed on the same batch)."""
    logits = runner.map(functools.partial(_forward, x=x, precision=precision), peers)
    current = exchange.gather_logits(logits)
    local = {p.index: (p, z) for p, z in zip(peers, logits)}
    losses = []
    for i in range(cfg.num_nodes):
        fresh = None
        if i in local:
            peer, z = local[i]
            loss = mutual_loss(z, _others(current, i), y, cfg.temperature, cfg.kl_weight)
            peer.optimizer.zero_grad(set_to_none=True)
            precision.scaler.scale(loss).backward()
            precision.scaler.step(peer.optimizer)
            losses.append(loss)
            if i < cfg.num_nodes - 1:  # later peers learn from this peer's updated predictions
                with torch.no_grad(), precision.autocast(), _frozen_batchnorm_stats(peer.model):
                    fresh = peer.model(x).detach()
        if i < cfg.num_nodes - 1:
            current[i] = exchange.share_logits(i, fresh, current[i])
    precision.scaler.update()
    return losses, logits


STEPS = {"simultaneous": simultaneous_step, "sequential": sequential_step}


# --- evaluation -------------------------------------------------------------------------------
def _predict(model: torch.nn.Module, x: torch.Tensor, precision: Precision) -> torch.Tensor:
    with torch.inference_mode(), precision.autocast():  # both are per thread: entered where the model runs
        return model(x)


def _inference_model(model: torch.nn.Module, fold_batchnorm: bool) -> torch.nn.Module:
    """``model`` in evaluation mode, or an evaluation copy with BatchNorm folded where it can be."""
    if fold_batchnorm and hasattr(model, "folded"):
        return model.folded()
    return model.eval()


def evaluate(peers: list[Peer], images, labels, normalise: Normalise, exchange, precision: Precision,
             runner=SERIAL, fold_batchnorm: bool = False):
    """Top-1 accuracy (%) of every local peer and of the cohort's ensemble (mean softmax).

    ``fold_batchnorm`` evaluates copies of the models with BatchNorm folded into the convolutions
    (ResNets): the same predictions up to rounding, about 10 % faster on CPU (measured).
    """
    models = [_inference_model(p.model, fold_batchnorm) for p in peers]
    correct = torch.zeros(len(peers), device=images.device, dtype=torch.int64)
    ensemble_correct = torch.zeros((), device=images.device, dtype=torch.int64)
    with torch.inference_mode():
        for x, y in test_batches(images, labels, EVAL_BATCH_SIZE, normalise):
            logits = runner.map(functools.partial(_predict, x=x, precision=precision), models)
            correct += torch.stack([(z.argmax(1) == y).sum() for z in logits])
            all_logits = exchange.gather_logits(logits)
            mean_probs = torch.stack([z.float().softmax(1) for z in all_logits]).mean(0)
            ensemble_correct += (mean_probs.argmax(1) == y).sum()
    for p in peers:
        p.model.train()
    n = images.shape[0]
    return [100.0 * c / n for c in correct.tolist()], 100.0 * ensemble_correct.item() / n


# --- the run ------------------------------------------------------------------------------------
def load_data(cfg: TrainConfig, device: torch.device) -> CifarData:
    data = load_cifar(
        cfg.data_dir, cfg.dataset, download=cfg.download, url=cfg.download_url,
        skip_checksum=cfg.skip_checksum, progress=cfg.progress,
    )
    if cfg.train_samples is not None:
        data.train = balanced_subset(data.train, cfg.train_samples, derive_seed(cfg.seed, "train-subset"), data.num_classes)
    if cfg.test_samples is not None:
        data.test = balanced_subset(data.test, cfg.test_samples, derive_seed(cfg.seed, "test-subset"), data.num_classes)
    for split in (data.train, data.test):
        split.images, split.labels = split.images.to(device), split.labels.to(device)
    return data


def check_run_dir(cfg: TrainConfig, resume: bool, run: RunDir) -> None:
    """Refuse to overwrite a run, to resume nothing, or to resume with another configuration."""
    if resume:
        if not (run.path / CONFIG_FILE).exists():
            raise UserError(f"nothing to resume in {run.path}: it holds no run (no {CONFIG_FILE}); "
                            "run without --resume")
        differences = cfg.differences(run.read_config())
        if differences:
            raise UserError(
                f"--resume with a configuration that differs from the run in {run.path} "
                f"({'; '.join(differences)}); repeat the original command with --resume"
            )
    elif (run.path / CONFIG_FILE).exists() or run.has_checkpoints():
        raise UserError(
            f"{run.path} already holds a run; pass --resume to continue it, or --name for a new run"
        )


def restore(run: RunDir, peers: list[Peer], exchange, device: torch.device) -> dict | None:
    """Load every local peer at the newest epoch the whole cohort reached; return the run state,
    or None where the cohort never completed an epoch (its staged first epoch is discarded)."""
    local_epochs = {p.index: run.checkpoint_epochs(p.index) for p in peers}
    shared = {}
    for part in exchange.gather_objects({i: set(e) for i, e in local_epochs.items()}):
        shared.update(part)
    epoch = run.resume_point(shared)
    if epoch == 0:
        for p in peers:
            (run.peer_path(p.index) / LAST_NEXT).unlink(missing_ok=True)
        return None
    run_state = {}
    for p in peers:
        path = local_epochs[p.index][epoch]
        state = load_checkpoint(path, map_location=device)
        if state.get("model_name") != p.model_name:
            raise UserError(f"checkpoint {path} holds a {state.get('model_name')!r}, but peer {p.index} is a "
                            f"{p.model_name!r}; resume with the run's own --models")
        try:
            p.load_state_dict(state)
            run_state = state["run"]
            _check_rng_state(run_state, device)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"checkpoint {path} does not fit peer {p.label} ({type(exc).__name__}): it is damaged "
                            "or from another configuration; start a new run with another --name") from None
        staged = run.peer_path(p.index) / LAST_NEXT
        if path == staged:
            run.publish_last(p.index)  # finish the commit a crash interrupted
        else:
            staged.unlink(missing_ok=True)  # staged past what every peer reached: discard
    return run_state


def _rng_state(generator: torch.Generator) -> dict:
    state = {"data_generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _check_rng_state(state: dict, device: torch.device) -> None:
    """Setting a state of the wrong size fails; try it on throw-away generators first."""
    for key, generator in (("data_generator", torch.Generator(device=device)), ("torch_rng", torch.Generator())):
        if not isinstance(state.get(key), torch.Tensor) or state[key].dtype != torch.uint8:
            raise ValueError(f"no {key} state")
        generator.set_state(state[key].cpu())


def _set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["data_generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


@dataclass
class Cohort:
    """This process's peers and the batch stream that feeds them."""

    peers: list[Peer]
    generator: torch.Generator
    normalise: Normalise
    batches: TrainBatches
    runner: SerialPeers | ThreadedPeers  # runs the peers side by side where that is faster


def build_cohort(cfg: TrainConfig, exchange, device: torch.device, train_images: torch.Tensor,
                 train_labels: torch.Tensor, num_classes: int) -> Cohort:
    """Peers and batches as ``dml train`` runs them (``dml bench`` measures exactly this)."""
    if device.type == "cpu" and not cfg.plain:
        # Denormal floats take a slow path on x86: fp32 training ran about 8x slower with them.
        torch.set_flush_denormal(True)
    channels_last = device.type != "mps" and not cfg.plain  # faster convolutions on CPU and CUDA
    peers = [build_peer(cfg, i, num_classes, device, channels_last) for i in exchange.local_indices]
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(cfg.seed, "data"))
    mean, std = NORMALISATION[cfg.dataset]
    normalise = Normalise(mean, std, device, channels_last)
    batches = TrainBatches(train_images, train_labels, cfg.batch_size, generator, normalise)
    # Side by side only where peers are independent within a step (not the sequential update) and
    # not on the plain path.
    runner = peer_runner(len(peers), device, allowed=not cfg.plain and cfg.update == "simultaneous")
    return Cohort(peers, generator, normalise, batches, runner)


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None, exchange=None) -> Path:
    """Train the cohort ``cfg`` describes; returns the run directory.

    ``stop_after`` ends this invocation after that many epochs (for time-limited jobs); the run
    continues with ``resume=True`` exactly as if it had not stopped.
    """
    device = resolve_device(cfg.device)
    exchange = exchange or make_exchange(cfg.num_nodes, device.type)
    device = exchange.select_device(device)
    precision = Precision(resolve_precision(cfg.precision, device, cfg.plain), device)
    run = RunDir(Path(cfg.out_dir) / cfg.name, dict(enumerate(cfg.models)), writer=exchange.is_writer)
    check_run_dir(cfg, resume, run)
    data = load_data(cfg, device)
    exchange.barrier()  # every process has checked the run directory before rank 0 writes to it

    cohort = build_cohort(cfg, exchange, device, data.train.images, data.train.labels, data.num_classes)
    try:
        _train_cohort(cfg, resume, stop_after, exchange, precision, run, data, cohort)
    finally:
        cohort.runner.close()
    return run.path


def _train_cohort(cfg: TrainConfig, resume: bool, stop_after: int | None, exchange, precision: Precision,
                  run: RunDir, data: CifarData, cohort: Cohort) -> None:
    peers, generator = cohort.peers, cohort.generator
    start_epoch = 1
    state = restore(run, peers, exchange, precision.device) if resume and run.has_checkpoints() else None
    if state is not None:
        _set_rng_state(generator, state)
        start_epoch = state["epoch"] + 1
        run.truncate_metrics(state["epoch"])
    else:  # a new run, or one stopped before its first epoch was complete
        run.create(cfg, environment_info(precision.device))
        run.truncate_metrics(0)
    exchange.barrier()

    step = STEPS[cfg.update]
    log = (lambda msg: tqdm.write(msg, file=sys.stdout)) if exchange.is_writer else (lambda msg: None)
    if start_epoch > cfg.epochs:
        log(f"{run.path}: all {cfg.epochs} epochs are done; nothing to resume")
    else:
        side_by_side = f", {cohort.runner.workers} peer threads" if cohort.runner.workers > 1 else ""
        log(f"{run.path}: {cfg.num_nodes} peer(s) {', '.join(cfg.models)} on {precision.device} "
            f"({precision.name}{side_by_side}), {data.train.images.shape[0]} train / "
            f"{data.test.images.shape[0]} test images, epoch {start_epoch} of {cfg.epochs}")
    try:
        last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch - 1 + stop_after)
        with StopSignal() as stop:
            for epoch in range(start_epoch, last_epoch + 1):
                records = run_epoch(epoch, cohort, data, cfg, exchange, precision, step, stop)
                run.log_epoch(records)
                for record in records:
                    log(_summary_line(record, cfg.epochs))
                save_epoch(run, epoch, peers, records, generator, cfg, data.num_classes, exchange)
                stop.check()  # a signal during the epoch's last step or its saving stops here
    finally:
        run.close()
        exchange.close()
        torch.set_flush_denormal(False)  # back to PyTorch's default for the rest of the process


class StepMetrics:
    """Per-peer sums of the objective and of correct predictions, kept on the device so that the
    training loop never waits for it; read once per epoch."""

    def __init__(self, num_peers: int, device: torch.device):
        self.loss_sum = torch.zeros(num_peers, device=device,
                                    dtype=torch.float32 if device.type == "mps" else torch.float64)
        self.correct = torch.zeros(num_peers, device=device, dtype=torch.int64)
        # step numbers (1-based) of the first non-finite logits / loss of each peer; 0: none yet
        self.first_broken_logits = torch.zeros(num_peers, device=device, dtype=torch.int64)
        self.first_broken_loss = torch.zeros(num_peers, device=device, dtype=torch.int64)
        self.steps = 0
        self.samples = 0

    def add(self, losses: list[torch.Tensor], logits: list[torch.Tensor], labels: torch.Tensor) -> None:
        losses = torch.stack(losses).detach()
        self.steps += 1
        self.samples += labels.shape[0]
        self.loss_sum += losses
        self.correct += torch.stack([(z.argmax(1) == labels).sum() for z in logits])
        # Remember where each peer first diverged, without waiting for the device. A peer whose own
        # predictions are broken is the culprit; its peers' losses break through the KL term too.
        broken_logits = torch.stack([~torch.isfinite(z).all() for z in logits])
        for first, broken in ((self.first_broken_logits, broken_logits), (self.first_broken_loss, ~torch.isfinite(losses))):
            first.masked_fill_((first == 0) & broken, self.steps)

    def check_finite(self, peers: list[Peer], where: str) -> None:
        """Stop with the peer and step of the first non-finite loss, if any (syncs with the device)."""
        for first in (self.first_broken_logits, self.first_broken_loss):
            steps = first.tolist()
            culprits = [(step, peer) for step, peer in zip(steps, peers) if step]
            if culprits:
                step, peer = min(culprits, key=lambda c: c[0])
                raise RunStopped(
                    f"peer {peer.label} diverged: its loss is not finite at {where}step {step}; the checkpoint "
                    "of the last complete epoch is kept; lower --lr, or use --precision fp32, and start again"
                )

    def mean_loss(self) -> float:
        return self.loss_sum.mean().item() / max(self.steps, 1)

    def read(self) -> tuple[list[float], list[float]]:
        """Per peer: the objective averaged over steps, and train accuracy in percent."""
        return ([total / self.steps for total in self.loss_sum.tolist()],
                [100.0 * c / self.samples for c in self.correct.tolist()])


DIVERGENCE_CHECK_EVERY = 100  # steps between looks at the loss (each look waits for the device)


def train_steps(peers, batches, cfg: TrainConfig, exchange, precision: Precision, step, metrics: StepMetrics,
                on_step=None, where: str = "", stop: StopSignal | None = None, runner=SERIAL) -> None:
    """The training loop proper: one ``step`` per batch, metrics accumulated on the device.

    ``dml train`` and ``dml bench`` both run exactly this. Stops with RunStopped on a non-finite
    loss (checked every DIVERGENCE_CHECK_EVERY steps and at the end) or a requested stop.
    """
    for n, (x, y) in enumerate(batches, start=1):
        if stop is not None:
            stop.check()
        if cfg.check_batches:
            exchange.check_same(batch_fingerprint(x, y), f"the batch of {where}step {n}")
        losses, logits = step(peers, x, y, cfg, exchange, precision, runner)
        metrics.add(losses, logits, y)
        if n % DIVERGENCE_CHECK_EVERY == 0:
            metrics.check_finite(peers, where)
        if on_step is not None:
            on_step(n)
    metrics.check_finite(peers, where)


class StopSignal:
    """SIGINT / SIGTERM ask training to stop before its next step; a second signal stops at once.

    The run then holds the checkpoint of its last complete epoch (an epoch boundary), from which
    ``--resume`` continues exactly.
    """

    EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

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
            name = signal.Signals(self.received).name
            raise RunStopped(f"stopped by {name}; the last complete epoch is saved: continue with the same "
                             "command and --resume", exit_code=self.EXIT_CODES[self.received])


def run_epoch(epoch: int, cohort: Cohort, data: CifarData, cfg: TrainConfig, exchange, precision: Precision, step,
              stop: StopSignal | None = None) -> list[dict]:
    """Train one epoch and evaluate; return the epoch's records for every peer in the cohort."""
    peers, batches = cohort.peers, cohort.batches
    started = time.perf_counter()
    lrs = [p.lr for p in peers]
    metrics = StepMetrics(len(peers), data.train.images.device)
    # disable=None: no bar when stderr is not a terminal (log files stay readable).
    bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", unit="step", leave=False,
               disable=None if cfg.progress and exchange.is_writer else True, dynamic_ncols=True)

    def show_progress(n: int) -> None:
        bar.update()
        if n % 50 == 0 and not bar.disable:  # reading the loss syncs with the device: not every step
            rate = n * cfg.batch_size * len(peers) / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{metrics.mean_loss():.3f}", img_s=f"{rate:.0f}")

    try:
        train_steps(peers, batches, cfg, exchange, precision, step, metrics, show_progress, f"epoch {epoch}, ", stop,
                    cohort.runner)
    finally:
        bar.close()
    for p in peers:
        p.scheduler.step()
    train_loss, train_acc = metrics.read()
    test_acc, ensemble_acc = evaluate(peers, data.test.images, data.test.labels, cohort.normalise, exchange, precision,
                                      cohort.runner, fold_batchnorm=not cfg.plain)
    seconds = time.perf_counter() - started
    local = [
        {"epoch": epoch, "node": p.index, "model": p.model_name, "lr": lrs[k], "train_loss": train_loss[k],
         "train_acc": train_acc[k], "test_acc": test_acc[k], "seconds": seconds}
        for k, p in enumerate(peers)
    ]
    records = sorted((r for part in exchange.gather_objects(local) for r in part), key=lambda r: r["node"])
    records.append({"epoch": epoch, "node": "ensemble", "test_acc": ensemble_acc, "seconds": seconds})
    return records


def batch_fingerprint(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A number that changes when any image, label or their order changes."""
    position = torch.arange(1, x.shape[0] + 1, device=x.device, dtype=torch.float64)
    return (x.flatten(1).double().sum(1) * position).sum() + (y.double() * position).sum()


def save_epoch(run: RunDir, epoch: int, peers: list[Peer], records: list[dict], generator, cfg: TrainConfig,
               num_classes: int, exchange) -> None:
    """best.pt where a peer improved, then every peer's last.pt committed in two phases."""
    for p in peers:
        if not all(torch.isfinite(t).all() for t in p.model.state_dict().values() if t.is_floating_point()):
            raise RunStopped(f"peer {p.label} diverged: its parameters are not finite after epoch {epoch}; "
                             "the checkpoint of the last complete epoch is kept; lower --lr and start again")
    run_state = {"epoch": epoch, **_rng_state(generator)}
    by_node = {r["node"]: r for r in records}
    meta = {"config": cfg.to_dict(), "num_classes": num_classes, "dataset": cfg.dataset}
    for p in peers:
        acc = by_node[p.index]["test_acc"]
        if acc > p.best_acc:
            p.best_acc, p.best_epoch = acc, epoch
            run.save_best(p.index, {"model": p.model.state_dict(), "model_name": p.model_name,
                                    "index": p.index, "epoch": epoch, "test_acc": acc, **meta})
    for p in peers:
        run.stage_last(p.index, {**p.state_dict(), "run": run_state, **meta})
    exchange.barrier()
    for p in peers:
        run.publish_last(p.index)


def _summary_line(record: dict, epochs: int) -> str:
    if record["node"] == "ensemble":
        return f"epoch {record['epoch']}/{epochs} ensemble     test_acc {record['test_acc']:6.2f}%"
    return (f"epoch {record['epoch']}/{epochs} {record['node']}_{record['model']:<10} lr {record['lr']:.5f} "
            f"train_loss {record['train_loss']:.4f} train_acc {record['train_acc']:6.2f}% "
            f"test_acc {record['test_acc']:6.2f}% ({record['seconds']:.1f}s)")
