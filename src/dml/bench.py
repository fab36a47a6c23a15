"""`dml bench`: our training step against a seed-style PyTorch loop, in the same process.

For each cohort size it measures, on synthetic data of CIFAR shape:

- engine: the training loop of ``dml train`` itself (``engine.train_steps``): batched augmentation,
  forward, mutual loss, backward, optimizer steps, metrics accumulated on the device;
- reference: a loop in the style of the seed system: a DataLoader whose worker processes augment one
  image at a time, every peer forwarded, then per peer its loss, backward, step and ``.item()``,
  under device-type autocast with its default dtype;
- MFU: the engine's model FLOP rate (FLOPs of one step counted with torch.utils.flop_counter)
  divided by a matmul peak measured here in the same precision.

Throughput counts images x trained networks per second: a peer that learns, or a branch of a multi-branch
network (its learned teacher is part of the same step, not a network of its own). ``--graph`` adds the
cohort of a graph file (e.g. ONE's branches on a shared trunk) as one more row, engine only.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .config import TrainConfig
from .data.augment import CIFAR100_MEAN, CIFAR100_STD, Normalise
from .data.dataset import ImageData, ImageSplit
from .distributed import make_exchange
from .engine import StepMetrics, build_cohort, build_feed, build_runtime, train_steps
from .errors import UserError
from .models import create_model
from .runtime import resolve_device, resolve_precision

NUM_CLASSES = 100


@dataclass
class BenchSettings:
    models: list[str]
    nodes: list[int]
    steps: int = 30
    warmup: int = 5
    repeats: int = 3  # timed windows of `steps` steps; the best counts (the machine may be shared)
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    update: str = "simultaneous"
    workers: int = 2
    reference: bool = True
    plain: bool = False  # measure dml train --plain instead of its default path
    threads: int | None = None  # intra-op threads per peer; None: as dml train decides
    seed: int = 0
    graph: str | None = None  # also measure this graph file's cohort (e.g. branches on a shared trunk)


def synthetic_cifar(n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return images.to(device), labels.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- (a) the engine ------------------------------------------------------------------------------
def cohort_config(settings: BenchSettings, num_nodes: int | None = None) -> TrainConfig:
    """The ``dml train`` configuration measured: ``num_nodes`` peers of ``settings.models``, or the cohort
    of ``settings.graph``."""
    common: dict[str, Any] = dict(
        batch_size=settings.batch_size,
        device=settings.device,
        precision=settings.precision,
        update=settings.update,
        seed=settings.seed,
        progress=False,
        plain=settings.plain,
        threads=settings.threads,
    )
    if num_nodes is None:
        return TrainConfig(graph=settings.graph, **common).resolved()
    models = settings.models if len(settings.models) == num_nodes else settings.models[:1] * num_nodes
    return TrainConfig(models=models, num_nodes=num_nodes, **common)


def networks_trained(cfg: TrainConfig) -> int:
    """The networks a step trains: the peers that learn, less the learned teachers of multi-branch networks
    (what a branch's throughput is compared with)."""
    return cfg.trained_peers - sum(trunk["teacher"] is not None for trunk in cfg.trunks)


def measure_engine(settings: BenchSettings, cfg: TrainConfig, exchange) -> tuple[float, float, int]:
    """Images x trained networks per second of ``dml train``'s loop, the model FLOPs of one step and the
    intra-op threads each peer computed with."""
    runtime = build_runtime(cfg, exchange)
    threads = runtime.runner.threads_per_worker
    device = runtime.device
    images, labels = synthetic_cifar(settings.batch_size * _total_steps(settings), device, settings.seed)
    try:
        cohort = build_cohort(cfg, exchange, runtime, NUM_CLASSES)
        cohort.set_epoch(1, cfg.epochs, _total_steps(settings))  # where ramp gates stand: the first epoch
        data = ImageData(
            "cifar100",
            NUM_CLASSES,
            [],
            ImageSplit(images, labels),
            ImageSplit(images[:1], labels[:1]),
            CIFAR100_MEAN,
            CIFAR100_STD,
        )
        batch_iter = iter(build_feed(cfg, runtime, data, exchange).batches)
        metrics = StepMetrics(len(cohort.peers), device)
        train_steps(cohort, itertools.islice(batch_iter, settings.warmup), metrics)
        metrics.read()  # waits for the device
        exchange.barrier()
        seconds = float("inf")
        for _ in range(settings.repeats):
            started = time.perf_counter()
            train_steps(cohort, itertools.islice(batch_iter, settings.steps), metrics)
            metrics.read()
            _sync(device)
            exchange.barrier()
            seconds = min(seconds, time.perf_counter() - started)
    finally:
        runtime.close()
    img_s = settings.steps * settings.batch_size * networks_trained(cfg) / seconds
    return img_s, step_flops(cohort, settings.batch_size, device), threads


def step_flops(cohort, batch_size: int, device: torch.device) -> float:
    """Model FLOPs (forward and backward) of one training step of the local peers (a multi-branch
    network's trunk once)."""
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.zeros(batch_size, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        for unit in cohort.units:
            with torch.set_grad_enabled(unit.peers[0].trains):
                loss = sum(F.cross_entropy(z, y) for z in unit.forward(x))
            assert isinstance(loss, torch.Tensor)  # a unit has at least one output
            if loss.requires_grad:
                loss.backward()
    for p in cohort.trainable:
        p.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# --- (b) the seed-style reference loop -------------------------------------------------------------
class PerImageAugmentDataset(torch.utils.data.Dataset):
    """One image at a time, as a torchvision transform pipeline would: pad, crop, flip, normalise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images.cpu(), labels.cpu()
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        img = F.pad(self.images[i].float() / 255.0, (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        img = img[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return (img - self.mean) / self.std, self.labels[i]


def measure_reference(settings: BenchSettings, num_nodes: int) -> float:
    """Images x peers per second of a seed-style loop."""
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    models = settings.models if len(settings.models) == num_nodes else settings.models[:1] * num_nodes
    nets = [create_model(name, NUM_CLASSES).to(device) for name in models]
    optimizers = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True) for n in nets]
    images, labels = synthetic_cifar(settings.batch_size * _total_steps(settings), torch.device("cpu"), settings.seed)
    loader = torch.utils.data.DataLoader(
        PerImageAugmentDataset(images, labels),
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=settings.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=settings.workers > 0,
    )
    use_amp = resolve_precision(settings.precision, device, settings.plain) != "fp32"
    window_ends = {settings.warmup + r * settings.steps for r in range(settings.repeats + 1)}
    started, seconds = None, float("inf")
    for n, (x, y) in enumerate(loader):
        if n in window_ends:  # close the timed window that ends here, open the next
            _sync(device)
            now = time.perf_counter()
            if started is not None:
                seconds = min(seconds, now - started)
            started = now
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, enabled=use_amp):
            outputs = [net(x) for net in nets]
        for i, opt in enumerate(optimizers):
            loss = F.cross_entropy(outputs[i], y)
            if num_nodes > 1:
                kl = sum(
                    F.kl_div(F.log_softmax(outputs[i], 1), F.softmax(outputs[j].detach(), 1), reduction="batchmean")
                    for j in range(num_nodes)
                    if j != i
                )
                loss = loss + kl / (num_nodes - 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
    _sync(device)
    assert started is not None  # the first window opened at batch settings.warmup
    seconds = min(seconds, time.perf_counter() - started)
    return settings.steps * settings.batch_size * num_nodes / seconds


def _total_steps(settings: BenchSettings) -> int:
    return settings.warmup + settings.repeats * settings.steps


# --- (c) the peak ----------------------------------------------------------------------------------
def matmul_peak_gflops(device: torch.device, precision: str, repeats: int = 5) -> float:
    """Best FLOP rate of large square matmuls in the precision training computes in."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


# --- the benchmark ---------------------------------------------------------------------------------
def run_benchmark(settings: BenchSettings, echo=print) -> list[dict]:
    records = []
    device = resolve_device(settings.device)
    precision = resolve_precision(settings.precision, device, settings.plain)
    peak = None
    exchange = None
    cohorts = [cohort_config(settings, n) for n in settings.nodes]
    cohorts += [cohort_config(settings)] if settings.graph else []
    for cfg in cohorts:
        num_nodes = networks_trained(cfg)
        # joins the process group once, then reuses it
        exchange = make_exchange(cfg.num_nodes, device.type, cfg.homes)
        engine_img_s, flops, threads = measure_engine(settings, cfg, exchange)
        if peak is None:
            peak = matmul_peak_gflops(exchange.select_device(device), precision)
        # Every process reports its peers' FLOPs; the rate is the cohort's, the peak the machine's share.
        flops_all = sum(exchange.gather_objects(flops))
        steps_per_s = engine_img_s / (settings.batch_size * num_nodes)
        peak_all = sum(exchange.gather_objects(peak))
        reference_img_s = None
        if settings.reference and exchange.world_size == 1 and not cfg.graph:
            reference_img_s = measure_reference(settings, num_nodes)
        record = {
            "device": _device_name(device),
            "precision": precision,
            "threads": threads,
            "processes": exchange.world_size,
            "nodes": num_nodes,
            "model": f"graph {Path(cfg.graph).name}" if cfg.graph else "+".join(sorted(set(settings.models))),
            "engine_img_s": round(engine_img_s, 1),
            "reference_img_s": None if reference_img_s is None else round(reference_img_s, 1),
            "speedup": None if reference_img_s is None else round(engine_img_s / reference_img_s, 3),
            "mfu": round(flops_all * steps_per_s / (peak_all * 1e9), 4),
            "peak_gflops": round(peak_all, 1),
        }
        if exchange.is_writer:
            records.append(record)
            echo(_row(record))
    if exchange is not None:
        exchange.close()
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


HEADER = (
    "device",
    "precision",
    "threads",
    "processes",
    "model",
    "nodes",
    "engine_img_s",
    "reference_img_s",
    "speedup",
    "mfu",
    "peak_gflops",
)


def _row(record: dict) -> str:
    return " | ".join(str(record[k]) if record[k] is not None else "-" for k in HEADER)


def write_json(records: list[dict], path: str) -> None:
    Path(path).write_text(json.dumps(records, indent=2) + "\n")


PIPELINE_HEADER = ("decoding processes", "images/s", "images/s per process", "image size", "batch")


def measure_input_pipeline(
    folder: str, image_size: int, batch_size: int, workers: int, steps: int, warmup: int
) -> dict:
    """Images per second that a streamed folder's training batches arrive at (decoded, augmented, normalised on
    the CPU), alone, without a model: what a GPU could be fed. ``workers`` 0 decodes in this process."""
    from .data.source import load_dataset
    from .data.stream import FileSplit, StreamedTrainBatches

    data = load_dataset("folder", folder, image_size=image_size, loader="stream", workers=workers)
    if len(data.train) < batch_size * (steps + warmup):
        raise UserError(
            f"{folder} holds {len(data.train)} training images, fewer than --batch-size x (--steps + --warmup) = "
            f"{batch_size * (steps + warmup)}; lower --steps or --batch-size"
        )
    normalise = Normalise(data.mean, data.std, torch.device("cpu"))
    batches = StreamedTrainBatches(
        cast(FileSplit, data.train),
        image_size,
        batch_size,
        torch.Generator().manual_seed(0),
        normalise,
        workers=workers,
    )
    stream = iter(batches)
    for _ in range(warmup):  # workers started, their first batches in flight
        next(stream)
    started = time.perf_counter()
    for _ in range(steps):
        next(stream)
    rate = steps * batch_size / (time.perf_counter() - started)
    return {
        "workers": workers,
        "img_s": round(rate, 1),
        "img_s_per_process": round(rate / max(1, workers), 1),
        "image_size": image_size,
        "batch_size": batch_size,
    }


def pipeline_row(record: dict) -> str:
    return " | ".join(str(record[k]) for k in ("workers", "img_s", "img_s_per_process", "image_size", "batch_size"))
