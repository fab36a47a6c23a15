"""The tiny `dml train` runs tests share: one flag builder, one way to start a run, one metrics reader.

Each test module picks its sample counts with `tiny_flags(train=..., test=...)` where its assertions depend on them
(the number of batches, a validation split that must fit); everything else is the same everywhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dml.cli import main

QUIET = ("--skip-checksum", "--no-download", "--no-progress")  # synthetic data: no checksum, no download, no bars


def tiny_flags(*extra: str, train: int = 256, test: int = 100, batch: int = 32) -> list[str]:
    """Flags for a small run on the synthetic CIFAR: sample counts, batch size, quiet data handling, then `extra`."""
    return ["--train-samples", str(train), "--test-samples", str(test), "--batch-size", str(batch), *QUIET, *extra]


def train_argv(cifar_root, out_dir, *args: str, tiny: list[str]) -> list[str]:
    """`dml train` arguments (without the program name) for a tiny run writing under out_dir."""
    return ["train", "--data-dir", str(cifar_root), "--out-dir", str(out_dir), *tiny, *args]


def train(cifar_root, out_dir, *args: str, tiny: list[str]) -> int:
    """Run `dml train` in this process; returns its exit code."""
    return main(train_argv(cifar_root, out_dir, *args, tiny=tiny))


def train_command(cifar_root, out_dir, *args: str, tiny: list[str], launcher=()) -> list[str]:
    """The command line that runs the same tiny `dml train` in a new process (optionally under a launcher)."""
    return [sys.executable, *launcher, "-m", "dml", *train_argv(cifar_root, out_dir, *args, tiny=tiny)]


def metrics(run_dir: Path, drop=("seconds",)) -> list[dict]:
    """The records of a run's metrics.jsonl, without the fields that differ between equal runs (wall time)."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for key in drop:
            record.pop(key, None)  # a restart record has no wall time
    return records
