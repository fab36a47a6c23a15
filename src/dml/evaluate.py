"""``dml evaluate``: the accuracy of checkpoints (any ``best.pt`` or ``last.pt`` of a run directory:
both hold the model name, the number of classes, the run's configuration, the directory it was started
in and the weights; checkpoint.py reads them), computed by accuracy.py's path as training computes it:
on the runtime the run trained with (precision, BatchNorm folding), on the run's own data unless told
otherwise. A checkpoint never imports code by itself: a network of the user's own is built only where
the caller names it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch

from .accuracy import evaluate_models
from .branches import TEACHERS
from .checkpoint import EVALUATE, SavedPeer, check_model_named, read_checkpoint
from .data.augment import Normalise
from .data.batches import test_batches
from .data.dataset import ImageSplit, balanced_subset
from .data.source import choose_loader, load_dataset
from .data.stream import StreamedTestBatches, default_workers
from .errors import UserError
from .models import ModelImportError, create_model
from .peer import derive_seed, names_flag, one_or_each
from .runlog import RunDir
from .runtime import Runtime, resolve_device

NUM_CLASSES = {"cifar100": 100, "cifar10": 10}
EVAL_BATCH_SIZE = 1000


@dataclass
class LoadedCheckpoint:
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
    config: dict = field(default_factory=dict)  # the run's settings (its data source among them)
    working_dir: str | None = None  # where the run was started: its relative paths are relative to it
    mean_of: int | None = None  # a temporal mean: the index of the peer it follows


@dataclass
class Accuracy:
    name: str  # the checkpoint's path, or "ensemble"
    model: str
    epoch: int | None
    top1: float
    top5: float


def load_model(path: Path, device: torch.device, model: str | None = None) -> LoadedCheckpoint:
    """Build the checkpoint's network from its model name and class count and load its weights.

    A network of the user's own (``package.module:factory``) is imported only where ``model`` names
    it (and must match what the checkpoint records): loading a checkpoint never runs code by itself.
    """
    return _build(read_checkpoint(path, EVALUATE), device, model)


def _build(saved: SavedPeer, device: torch.device, named: str | None) -> LoadedCheckpoint:
    path, name, num_classes, working_dir = saved.path, saved.model_name, saved.num_classes, saved.working_dir
    assert name is not None and num_classes is not None  # read to evaluate: read_checkpoint checked both
    check_model_named(f"checkpoint {path}", name, named, f"model={name!r}")
    if name in TEACHERS:
        raise UserError(
            f"checkpoint {path} holds the learned teacher ({name}) of a multi-branch network, which "
            "computes from its branches; evaluate or distil from a branch's best.pt (a standalone network)"
        )
    try:
        model = create_model(name, num_classes)
    except ModelImportError as exc:
        raise UserError(f"checkpoint {path}: {exc}{_import_advice(working_dir)}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    try:
        model.load_state_dict(saved.weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(
            f"checkpoint {path}: the weights do not fit a {name} with {num_classes} classes ({first})"
        ) from None
    config = saved.config
    return LoadedCheckpoint(
        path,
        name,
        num_classes,
        saved.dataset,
        saved.epoch,
        config.get("seed"),
        model.to(device).eval(),
        config.get("precision", "auto"),
        bool(config.get("plain", False)),
        config.get("image_size"),
        config,
        working_dir,
        saved.state.get("mean_of"),
    )


def _import_advice(working_dir: str | None) -> str:
    """How to make a network of the user's own importable where the module is not found from here."""
    if working_dir is None:
        return "; run from the directory training ran in, or add that directory to PYTHONPATH"
    if Path(working_dir) != Path.cwd():
        return f"; run from {working_dir}, where training ran, or add {working_dir} to PYTHONPATH"
    return ""


def common_dataset(checkpoints: list[LoadedCheckpoint], dataset: str | None) -> str:
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
        raise UserError(
            f"the checkpoints have {num_classes} classes but {dataset} has {NUM_CLASSES.get(dataset)}; "
            "pass the dataset they were trained on"
        )
    return dataset


def accuracies(checkpoints: list[LoadedCheckpoint], batches: Iterable, runtime: Runtime) -> list[Accuracy]:
    """Top-1/top-5 accuracy (%) of every checkpoint on the test ``batches``, then of their mean-softmax ensemble:
    as in training, of the networks that trained, without the temporal means (unless every checkpoint is one)."""
    means = [i for i, c in enumerate(checkpoints) if c.mean_of is not None]
    excluded = means if len(means) < len(checkpoints) else []
    result = evaluate_models([c.model for c in checkpoints], batches, runtime, ensemble_excludes=excluded)
    rows = [
        Accuracy(
            str(c.path),
            c.model_name + ("" if c.mean_of is None else f" (mean of {c.mean_of})"),
            c.epoch,
            result.top1[i],
            result.top5[i],
        )
        for i, c in enumerate(checkpoints)
    ]
    members = len(checkpoints) - len(excluded)
    rows.append(
        Accuracy(
            "ensemble",
            f"mean softmax of {members}" + (", without the means" if excluded else ""),
            None,
            result.ensemble_top1,
            result.ensemble_top5,
        )
    )
    return rows


@dataclass
class DataSource:
    """Where ``dml evaluate`` reads the test split: the run's own source unless the command line says
    otherwise. ``given`` holds the settings the command line gave."""

    dataset: str
    data_dir: Path  # absolute
    skip_checksum: bool
    download: bool
    download_url: str | None
    image_size: int | None
    given: set[str]
    relative_to_here: bool = False  # a run's relative data dir with no record of where the run started

    def describe(self) -> str:
        """One line: what data, from where, and why."""
        notes = []
        if "data_dir" in self.given:
            notes.append("--data-dir")
        elif self.relative_to_here:
            notes.append(
                "the run's --data-dir, taken from the current directory: the checkpoint does not "
                "record where the run started"
            )
        else:
            notes.append("the run's --data-dir")
        if self.dataset != "folder" and self.skip_checksum:
            notes.append(
                "checksum skipped" + (" (--skip-checksum)" if "skip_checksum" in self.given else ", as the run did")
            )
        if self.image_size is not None:
            notes.append(
                f"images resized to {self.image_size}x{self.image_size}"
                + (" (--image-size)" if "image_size" in self.given else ", as the run did")
            )
        return f"data: {self.dataset} test split from {self.data_dir} ({'; '.join(notes)})"


def _absolute(path: str | os.PathLike, base: str | os.PathLike) -> Path:
    return Path(os.path.normpath(Path(base) / Path(path).expanduser()))


def data_source(
    checkpoints: list[LoadedCheckpoint],
    dataset: str,
    data_dir: str | None = None,
    skip_checksum: bool | None = None,
    download: bool | None = None,
    download_url: str | None = None,
    image_size: int | None = None,
) -> DataSource:
    """The runs' data source (their --data-dir relative to where each run started, checksum choice,
    image size), each setting overridden where given (not None); the runs must agree on the rest."""
    given = {
        k
        for k, v in (("data_dir", data_dir), ("skip_checksum", skip_checksum), ("image_size", image_size))
        if v is not None
    }
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise UserError(f"--image-size must be a positive integer, got {image_size!r}")
        if dataset != "folder":
            raise UserError(f"--image-size applies to --dataset folder; {dataset} images are 32x32")

    def common(values: list, flag: str):
        if len(set(values)) > 1:
            found = "; ".join(f"{c.path}: {v}" for c, v in zip(checkpoints, values))
            raise UserError(
                f"the checkpoints' runs differ in {flag} ({found}); pass {flag}, or evaluate them separately"
            )
        return values[0]

    here = Path.cwd()
    relative_to_here = False
    if data_dir is not None:
        directory = _absolute(data_dir, here)
    else:
        dirs = []
        for c in checkpoints:
            run_dir = c.config.get("data_dir", "./data")  # the default of runs that did not record it
            if not isinstance(run_dir, str):
                raise UserError(f"checkpoint {c.path} records no readable data directory; pass --data-dir")
            base = c.working_dir if c.working_dir is not None else here
            relative_to_here |= c.working_dir is None and not Path(run_dir).expanduser().is_absolute()
            dirs.append(_absolute(run_dir, base))
        directory = common(dirs, "--data-dir")
    if skip_checksum is None:
        skip_checksum = common([bool(c.config.get("skip_checksum", False)) for c in checkpoints], "--skip-checksum")
    if image_size is None:
        image_size = common([c.image_size for c in checkpoints], "--image-size")
    if download is None:  # where a run was told not to download, neither does its evaluation
        download = all(c.config.get("download", True) for c in checkpoints)
    if download_url is None:
        urls = {c.config.get("download_url") for c in checkpoints}
        download_url = urls.pop() if len(urls) == 1 and isinstance(next(iter(urls)), str) else None
    return DataSource(dataset, directory, skip_checksum, download, download_url, image_size, given, relative_to_here)


def load_checkpoints(paths, device: torch.device, models: list[str] | None = None) -> list[LoadedCheckpoint]:
    """Checkpoint files as networks; ``models`` (one for all, or one per checkpoint) names what they hold
    and must, where one holds a network of the user's own: only then is its module imported."""
    paths = [Path(p) for p in paths]
    named = one_or_each("--models", models, len(paths), "checkpoint")
    saved = [read_checkpoint(p, EVALUATE) for p in paths]
    names = [cast(str, s.model_name) for s in saved]  # read to evaluate: each names its model
    flag = names_flag("--models", names)  # the exact flag to add, for every checkpoint given
    for s, name, given in zip(saved, names, named):
        check_model_named(f"checkpoint {s.path}", name, given, flag)
    return [_build(s, device, s.model_name) for s in saved]


def evaluate_checkpoints(
    paths,
    data_dir: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    skip_checksum: bool | None = None,
    download: bool | None = None,
    test_samples: int | None = None,
    download_url: str | None = None,
    *,
    models: list[str] | None = None,
    image_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate checkpoint files on their test split; returns a JSON-ready summary.

    The data source is the runs' own (see ``data_source``) where an argument is None; ``log`` gets
    one line saying what data is used. ``test_samples`` takes the seeded, class-balanced subset that
    training's ``--test-samples`` took (same seed as the first checkpoint's run), so the numbers match
    its log.
    """
    dev = resolve_device(device)
    checkpoints = load_checkpoints(paths, dev, models)
    dataset = common_dataset(checkpoints, dataset)
    source = data_source(checkpoints, dataset, data_dir, skip_checksum, download, download_url, image_size)
    if log is not None:
        log(source.describe())
    # how the first checkpoint's run read its data (its run directory says), else what it would choose now
    recorded = RunDir(checkpoints[0].path.parent.parent, {}, writer=False).recorded_loader()
    loader = recorded or choose_loader(dataset, str(source.data_dir), source.image_size, "auto")[0]
    workers = default_workers()
    data = load_dataset(
        dataset,
        str(source.data_dir),
        image_size=source.image_size,
        download=source.download,
        url=source.download_url,
        skip_checksum=source.skip_checksum,
        loader=loader,
        workers=workers,
    )
    if data.num_classes != checkpoints[0].num_classes:
        raise UserError(
            f"{source.data_dir} holds {data.num_classes} classes but the checkpoints have "
            f"{checkpoints[0].num_classes}; pass the --data-dir they were trained on"
        )
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
        normalise = Normalise(mean, std, dev, runtime.channels_last)
        if isinstance(test, ImageSplit):
            batches: Iterable = test_batches(test.images.to(dev), test.labels.to(dev), EVAL_BATCH_SIZE, normalise)
        else:
            size = checkpoints[0].config.get("batch_size") or 64  # as training evaluated it: memory stays bounded
            batches = StreamedTestBatches(test, data.image_size or 0, size, normalise, workers=workers)
        results = accuracies(checkpoints, batches, runtime)
    finally:
        runtime.close()
    return {
        "dataset": dataset,
        "num_classes": data.num_classes,
        "test_images": len(test),
        "device": dev.type,
        "data_dir": str(source.data_dir),
        "skip_checksum": source.skip_checksum,
        "checkpoints": [asdict(r) for r in results[:-1]],
        "ensemble": asdict(results[-1]),
    }


def format_table(summary: dict) -> str:
    """An aligned text table: one line per checkpoint, then the ensemble."""
    rows = [("checkpoint", "model", "epoch", "top-1 (%)", "top-5 (%)")]
    for r in summary["checkpoints"] + [summary["ensemble"]]:
        rows.append(
            (
                r["name"],
                r["model"],
                "" if r["epoch"] is None else str(r["epoch"]),
                f"{r['top1']:.2f}",
                f"{r['top5']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.append(f"{summary['test_images']} test images of {summary['dataset']} on {summary['device']}")
    return "\n".join(lines)


def evaluate_command(args) -> dict:
    """``dml evaluate``: print the table and, with ``--json``, write the summary."""
    summary = evaluate_checkpoints(
        args.checkpoints,
        args.data_dir,
        args.dataset,
        args.device,
        args.skip_checksum,
        args.download,
        args.test_samples,
        args.download_url,
        models=args.models,
        image_size=args.image_size,
        log=print,
    )
    print(format_table(summary))
    if args.json is not None:
        try:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {args.json} ({exc})") from None
    return summary
