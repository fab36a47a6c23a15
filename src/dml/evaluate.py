"""The one evaluation path: top-1 and top-5 accuracy of peers and of their ensemble.

``evaluate_models`` is what training logs every epoch, what ``Cohort.evaluate`` returns and what
``dml evaluate`` prints for checkpoints (any ``best.pt`` or ``last.pt`` of a run directory: both hold
the model name, the number of classes, the dataset and the weights), computed the same way: on the
runtime the run trained with (precision, BatchNorm folding). The ensemble averages the softmax
outputs of all peers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data.augment import Normalise
from .data.batches import test_batches
from .data.cifar import balanced_subset
from .data.source import load_dataset
from .distributed import LocalExchange
from .errors import UserError
from .models import create_model
from .peer import derive_seed, load_checkpoint
from .runtime import Runtime, resolve_device

NUM_CLASSES = {"cifar100": 100, "cifar10": 10}
TOP_K = (1, 5)
EVAL_BATCH_SIZE = 1000


@dataclass
class Evaluation:
    """Accuracies in percent: ``top1[k]`` / ``top5[k]`` of local peer k, and of the ensemble of all peers."""

    top1: list[float]
    top5: list[float]
    ensemble_top1: float
    ensemble_top5: float
    samples: int


def _correct_top_k(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labels are the highest score (argmax: the first of tied scores, as training counts),
    and how many are among the 5 highest."""
    top1 = (scores.argmax(1) == labels).sum()
    top5 = (scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]).any(1).sum()
    return torch.stack([top1, top5])


def _predict(model: torch.nn.Module, x: torch.Tensor, precision) -> torch.Tensor:
    with torch.inference_mode(), precision.autocast():  # both are per thread: entered where the model runs
        return model(x)


def evaluate_models(models: list[torch.nn.Module], batches: Iterable, runtime: Runtime,
                    exchange=None, ensemble_excludes: Iterable[int] = ()) -> Evaluation:
    """Accuracy of every model on ``batches`` of (inputs, labels), and of the ensemble (mean softmax).

    The models run in evaluation mode (through BatchNorm-folded copies where the runtime folds) and
    are left in the mode they were in. With an exchange over processes, the ensemble holds every
    process's peers, except the cohort indices in ``ensemble_excludes`` (teachers).
    """
    exchange = exchange or LocalExchange(len(models))
    modes = [m.training for m in models]
    inference = [runtime.inference_model(m) for m in models]
    correct = torch.zeros(len(models), len(TOP_K), device=runtime.device, dtype=torch.int64)
    ensemble = torch.zeros(len(TOP_K), device=runtime.device, dtype=torch.int64)
    samples = 0
    with torch.inference_mode():
        for x, y in batches:
            x, y = runtime.to_device(x), y.to(runtime.device, non_blocking=True)
            logits = runtime.runner.map(functools.partial(_predict, x=x, precision=runtime.precision), inference)
            for k, z in enumerate(logits):
                correct[k] += _correct_top_k(z, y)
            members = [z for j, z in enumerate(exchange.gather_logits(logits)) if j not in ensemble_excludes]
            mean_probs = torch.stack([z.float().softmax(1) for z in members]).mean(0)
            ensemble += _correct_top_k(mean_probs, y)
            samples += y.shape[0]
    for m, mode in zip(models, modes):
        m.train(mode)
    if samples == 0:
        raise ValueError("no batches to evaluate on")
    per_peer = [[100.0 * c / samples for c in row] for row in correct.tolist()]  # Python floats: exact percent
    top1, top5 = ([acc[i] for acc in per_peer] for i in range(len(TOP_K)))
    ensemble_top1, ensemble_top5 = (100.0 * c / samples for c in ensemble.tolist())
    return Evaluation(top1, top5, ensemble_top1, ensemble_top5, samples)


@dataclass
class Checkpoint:
    """A loaded checkpoint: its network in eval mode and what it says about itself."""

    path: Path
    model_name: str
    num_classes: int
    dataset: str | None
    epoch: int | None
    seed: int | None
    model: torch.nn.Module
    precision: str = "auto"  # how the run computed: evaluated the same way
    plain: bool = False
    image_size: int | None = None  # folder datasets: the size the run resized images to


@dataclass
class Accuracy:
    name: str  # the checkpoint's path, or "ensemble"
    model: str
    epoch: int | None
    top1: float
    top5: float


def load_model(path: Path, device: torch.device) -> Checkpoint:
    """Build the checkpoint's network from its model name and class count and load its weights."""
    state = load_checkpoint(path, map_location="cpu")
    name, num_classes = state.get("model_name"), state.get("num_classes")
    if not isinstance(name, str) or not isinstance(num_classes, int):
        raise UserError(f"checkpoint {path} does not name a model and class count; it was not written by "
                        "dml train")
    try:
        model = create_model(name, num_classes)  # a network of the user's own is imported as training did
    except (ValueError, TypeError) as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"checkpoint {path}: the weights do not fit a {name} with {num_classes} classes ({first})") \
            from None
    # best.pt stores the epoch at the top level; last.pt in its run state.
    epoch = state.get("epoch", (state.get("run") or {}).get("epoch"))
    config = state.get("config") or {}
    return Checkpoint(Path(path), name, num_classes, state.get("dataset"), epoch, config.get("seed"),
                      model.to(device).eval(), config.get("precision", "auto"), bool(config.get("plain", False)),
                      config.get("image_size"))


def common_dataset(checkpoints: list[Checkpoint], dataset: str | None) -> str:
    """The dataset every checkpoint was trained for (or ``dataset``, if their classes fit it)."""
    classes = {c.num_classes for c in checkpoints}
    datasets = {c.dataset for c in checkpoints if c.dataset is not None}
    if len(classes) > 1 or len(datasets) > 1:
        found = ", ".join(f"{c.path} ({c.dataset}, {c.num_classes} classes)" for c in checkpoints)
        raise UserError(f"the checkpoints were trained for different datasets: {found}; evaluate them separately")
    num_classes = classes.pop()
    if dataset is None:
        if not datasets:
            raise UserError(f"{checkpoints[0].path} does not record its dataset; pass --dataset")
        dataset = datasets.pop()
    if dataset != "folder" and NUM_CLASSES.get(dataset) != num_classes:
        raise UserError(f"the checkpoints have {num_classes} classes but {dataset} has {NUM_CLASSES.get(dataset)}; "
                        "pass the dataset they were trained on")
    return dataset


def accuracies(checkpoints: list[Checkpoint], images: torch.Tensor, labels: torch.Tensor,
               normalise: Normalise, runtime: Runtime) -> list[Accuracy]:
    """Top-1/top-5 accuracy (%) of every checkpoint, then of their mean-softmax ensemble."""
    result = evaluate_models([c.model for c in checkpoints], test_batches(images, labels, EVAL_BATCH_SIZE, normalise),
                             runtime)
    rows = [Accuracy(str(c.path), c.model_name, c.epoch, result.top1[i], result.top5[i])
            for i, c in enumerate(checkpoints)]
    rows.append(Accuracy("ensemble", f"mean softmax of {len(checkpoints)}", None, result.ensemble_top1,
                         result.ensemble_top5))
    return rows


def evaluate_checkpoints(paths, data_dir: str = "./data", dataset: str | None = None, device: str = "auto",
                         skip_checksum: bool = False, download: bool = True,
                         test_samples: int | None = None, download_url: str | None = None) -> dict:
    """Evaluate checkpoint files on their test split; returns a JSON-ready summary.

    ``test_samples`` takes the seeded, class-balanced subset that training's ``--test-samples``
    took (same seed as the first checkpoint's run), so the numbers match its log.
    """
    dev = resolve_device(device)
    checkpoints = [load_model(Path(p), dev) for p in paths]
    dataset = common_dataset(checkpoints, dataset)
    data = load_dataset(dataset, data_dir, image_size=checkpoints[0].image_size, download=download, url=download_url,
                        skip_checksum=skip_checksum)
    if data.num_classes != checkpoints[0].num_classes:
        raise UserError(f"{data_dir} holds {data.num_classes} classes but the checkpoints have "
                        f"{checkpoints[0].num_classes}; pass the --data-dir they were trained on")
    test = data.test
    if test_samples is not None:
        if test_samples <= 0:
            raise UserError(f"--test-samples must be a positive integer, got {test_samples}")
        seed = checkpoints[0].seed if checkpoints[0].seed is not None else 0
        test = balanced_subset(test, test_samples, derive_seed(seed, "test-subset"), data.num_classes)
    mean, std = data.mean, data.std
    # the first checkpoint's run decides precision and the plain path: its logged accuracies come back exactly
    runtime = Runtime(dev, checkpoints[0].precision, checkpoints[0].plain, num_peers=len(checkpoints))
    try:
        for c in checkpoints:
            c.model = runtime.prepare(c.model)
        results = accuracies(checkpoints, test.images.to(dev), test.labels.to(dev), Normalise(mean, std, dev, runtime.channels_last),
                             runtime)
    finally:
        runtime.close()
    return {"dataset": dataset, "num_classes": data.num_classes, "test_images": len(test), "device": dev.type,
            "checkpoints": [asdict(r) for r in results[:-1]], "ensemble": asdict(results[-1])}


def format_table(summary: dict) -> str:
    """An aligned text table: one line per checkpoint, then the ensemble."""
    rows = [("checkpoint", "model", "epoch", "top-1 (%)", "top-5 (%)")]
    for r in summary["checkpoints"] + [summary["ensemble"]]:
        rows.append((r["name"], r["model"], "" if r["epoch"] is None else str(r["epoch"]),
                     f"{r['top1']:.2f}", f"{r['top5']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.append(f"{summary['test_images']} test images of {summary['dataset']} on {summary['device']}")
    return "\n".join(lines)


def evaluate_command(args) -> dict:
    """``dml evaluate``: print the table and, with ``--json``, write the summary."""
    summary = evaluate_checkpoints(args.checkpoints, args.data_dir, args.dataset, args.device, args.skip_checksum,
                                   args.download, args.test_samples, args.download_url)
    print(format_table(summary))
    if args.json is not None:
        try:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {args.json} ({exc})") from None
    return summary
