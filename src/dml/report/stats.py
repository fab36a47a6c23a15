"""Grouping runs by seed and the statistics over a group: mean ± sample standard deviation."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, fields

from ..config import TrainConfig, field_default
from .runs import Run

# Settings of config.json that do not make a run a different experimental condition: runs that differ
# only in them are seeds of one group (graph files and teachers are compared through graph_spec).
NOT_AN_EXPERIMENTAL_CONDITION = frozenset(
    {
        "seed",
        "device",
        "data_dir",
        "out_dir",
        "name",
        "download",
        "download_url",
        "skip_checksum",
        "progress",
        "check_batches",
        "graph",
        "teacher",
        "teacher_model",
        "threads",
        "data_parallel",
    }
)
DEFAULTS = {f.name: field_default(f) for f in fields(TrainConfig)}


def seed_groups(runs: list[Run]) -> list[list[Run]]:
    """Runs that differ only in seed (and settings that do not change results), in first-seen order.

    Runs that stopped at different epochs are kept apart: their final numbers are not comparable.
    """
    ignored = NOT_AN_EXPERIMENTAL_CONDITION
    groups: dict[str, list[Run]] = {}
    for run in runs:
        # a setting at its default counts as absent: runs written before the setting existed lack it
        key = {k: v for k, v in run.config.items() if k not in ignored and not (k in DEFAULTS and v == DEFAULTS[k])}
        key["__epochs_done"] = run.epochs_done
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(run)
    return list(groups.values())


def without_seed(name: str) -> str:
    """A run's name without its ``_s<seed>`` suffix: a plan's row label, a seed group's name."""
    return re.sub(r"_s-?\d+$", "", name)


def group_name(group: list[Run]) -> str:
    """The common name of a group's runs: their name without the ``_s<seed>`` suffix."""
    if len(group) == 1:
        return group[0].name
    stripped = {without_seed(run.name) for run in group}
    return stripped.pop() if len(stripped) == 1 else ", ".join(run.name for run in group)


def baseline_accuracy(group: list[Run]) -> float:
    """The baseline's final test accuracy: mean over its peers (and over its seeds, if several)."""
    return statistics.fmean(final_accuracy(run) for run in group)


def final_accuracy(run: Run, outputs: str = "students") -> float:
    """A run's final test accuracy, averaged over its trained peers (or over its ``outputs`` of another
    kind: "means", "learned_teachers")."""
    return statistics.fmean(p.test_acc[-1] for p in getattr(run, outputs))


@dataclass(frozen=True)
class Baseline:
    """What runs are compared with: a run or seed group, its final accuracy per seed."""

    name: str
    by_seed: dict[int, float]

    @classmethod
    def of(cls, group: list[Run]) -> Baseline:
        return cls(group_name(group), {run.seed: final_accuracy(run) for run in group})

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.by_seed.values())

    def gain(self, group: list[Run], values: list[float]) -> Stat:
        """``values`` (one per run of ``group``) minus the baseline: paired by seed where the baseline ran
        every seed of the group (a seed also draws a --train-samples subset and the initial weights, so
        the pairs differ in the method alone), else minus the baseline's mean."""
        if all(run.seed in self.by_seed for run in group):
            return Stat([v - self.by_seed[run.seed] for v, run in zip(values, group)])
        return Stat([v - self.accuracy for v in values])

    @property
    def paired_note(self) -> str:
        return "paired by seed where the baseline ran the same seeds (mean ± std of the differences)"


@dataclass
class Stat:
    """A value over a group's seeds: shown plain for one seed, as mean ± std for several."""

    values: list[float]
    epoch: int | None = None  # for the best test accuracy of a single run

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def format(self, digits: int = 2, signed: bool = False) -> str:
        text = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        if len(self.values) > 1:
            text += f" ± {self.std:.{digits}f}"
        elif self.epoch is not None:
            text += f" (ep {self.epoch})"
        return text


def stat(values: list[float], epochs: list[int] | None = None) -> Stat:
    return Stat(values, epochs[0] if epochs and len(values) == 1 else None)


def best_epoch(curve: dict[int, float]) -> int:
    """The first epoch of the highest value."""
    return -max((value, -epoch) for epoch, value in curve.items())[1]


def group_curve(group: list[Run], key: str) -> tuple[list[int], list[float]]:
    """Per epoch, the peer average of ``key``, averaged over the group's runs (common epochs)."""
    epochs, mean, _ = group_band(group, key)
    return epochs, mean


def group_band(group: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Per epoch (common to the group's runs), the peer average of ``key``: its mean over the runs and
    its sample standard deviation (0 for one run)."""
    curves = [dict(zip(*run.average_curve(key))) for run in group]
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    mean = [statistics.fmean(c[e] for c in curves) for e in epochs]
    std = [statistics.stdev(c[e] for c in curves) if len(curves) > 1 else 0.0 for e in epochs]
    return epochs, mean, std


def without(runs: list[Run], excluded: list[Run]) -> list[Run]:
    known = {run.path.resolve() for run in excluded}
    return [run for run in runs if run.path.resolve() not in known]
