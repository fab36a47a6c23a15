"""Reading run directories for the report: a run's configuration and its peers' per-epoch metrics."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from ..errors import UserError
from ..runlog import CONFIG_FILE, ENSEMBLE, METRICS_FILE, RESTART, RunDir, peer_dir_name


@dataclass
class PeerHistory:
    """One peer's per-epoch metrics, in epoch order."""

    index: int
    model: str
    teacher: bool = False  # frozen: shown, but not averaged with the peers that train
    mean_of: int | None = None  # a temporal mean of that peer: shown (a model to deploy), not averaged either
    learned_teacher: bool = False  # made of a multi-branch network's branches (ONE's gate): shown, not averaged
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)  # empty without a validation split
    # the objective's two terms: empty for teachers and for runs written before they were recorded
    train_ce: list[float] = field(default_factory=list)
    train_kd: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        role = (
            " (teacher)"
            if self.teacher
            else f" (mean of {self.mean_of})"
            if self.mean_of is not None
            else " (learned teacher)"
            if self.learned_teacher
            else ""
        )
        return peer_dir_name(self.index, self.model) + role

    def best(self) -> tuple[float, int]:
        """Highest test accuracy and the first epoch that reached it."""
        acc = max(self.test_acc)
        return acc, self.epochs[self.test_acc.index(acc)]

    def at_best_val(self) -> tuple[float, int]:
        """Test accuracy at the first epoch of highest validation accuracy (the epoch of best.pt), and that epoch."""
        k = self.val_acc.index(max(self.val_acc))
        return self.test_acc[k], self.epochs[k]


@dataclass
class Run:
    """What ``dml report`` needs of one run directory."""

    path: Path
    config: dict
    peers: list[PeerHistory]
    ensemble: dict[int, float]  # epoch -> ensemble test accuracy
    ensemble_val: dict[int, float] = field(default_factory=dict)  # epoch -> ensemble validation accuracy

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    @property
    def students(self) -> list[PeerHistory]:
        """The networks that train (all but the teachers, the temporal means and the learned teachers)."""
        return [p for p in self.peers if not p.teacher and p.mean_of is None and not p.learned_teacher]

    @property
    def means(self) -> list[PeerHistory]:
        return [p for p in self.peers if p.mean_of is not None]

    @property
    def learned_teachers(self) -> list[PeerHistory]:
        return [p for p in self.peers if p.learned_teacher]

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def epochs_planned(self) -> int:
        return int(self.config["epochs"])

    @property
    def epochs_done(self) -> int:
        return self.peers[0].epochs[-1]

    @property
    def has_val(self) -> bool:
        """Whether the run held out a validation split (its metrics carry val_acc)."""
        return bool(self.peers[0].val_acc)

    @property
    def interrupted(self) -> bool:
        return self.epochs_done < self.epochs_planned

    def average_curve(self, key: str) -> tuple[list[int], list[float]]:
        """Per epoch, the mean over the training peers of ``key`` (test_acc or train_loss)."""
        values = [getattr(p, key) for p in self.students]
        return list(self.peers[0].epochs), [statistics.fmean(v) for v in zip(*values)]


def find_runs(paths) -> list[Path]:
    """Run directories named by ``paths``: a folder holding config.json is a run, any other folder
    is searched for runs below it (sorted). Each run is listed once, in the order found."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / CONFIG_FILE).is_file():
            below = [path]
        elif path.is_dir():
            below = sorted(p.parent for p in path.rglob(CONFIG_FILE) if p.is_file())
            if not below:
                raise UserError(f"no runs found under {path}: no folder below it holds a {CONFIG_FILE}")
        else:
            raise UserError(f"{path} does not exist or is not a folder; pass a run directory or a folder of runs")
        for run in below:
            if run.resolve() not in {f.resolve() for f in found}:
                found.append(run)
    return found


def read_run(path: Path) -> Run:
    """Read one run directory; every missing or malformed file is a UserError naming it."""
    path = Path(path)
    config = _read_config(path / CONFIG_FILE)
    models = config["models"]
    spec_peers = [peer if isinstance(peer, dict) else {} for peer in (config.get("graph_spec") or {}).get("peers", [])]
    spec_peers += [{}] * (len(models) - len(spec_peers))
    peers = [
        PeerHistory(i, name, bool(spec.get("checkpoint")), spec.get("ema_of"), bool(spec.get("learned_teacher")))
        for i, (name, spec) in enumerate(zip(models, spec_peers))
    ]
    run_dir = RunDir(path, {p.index: p.model for p in peers if not p.teacher}, writer=False)
    records = run_dir.records()
    for record in records:
        try:
            if record.node == RESTART:
                continue
            if record.node == ENSEMBLE:
                float(record.data["test_acc"])
            elif 0 <= cast(int, record.node) < len(models):  # as the file has it: no number fails (TypeError)
                for key in ("train_loss", "train_acc", "test_acc"):
                    float(record.data[key])
            else:
                raise ValueError(f"node {record.node!r} is not one of the {len(models)} peers in {CONFIG_FILE}")
            for key in ("val_acc", "train_ce", "train_kd"):
                if key in record.data:
                    float(record.data[key])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path / METRICS_FILE} line {record.line} is not a dml metrics record ({exc})") from None
    ensemble, ensemble_val = {}, {}
    for epoch, entry in run_dir.completed_epochs(records).items():
        missing = [i for i in range(len(models)) if i not in entry]
        if missing:
            raise UserError(
                f"{path / METRICS_FILE} has no record of peer {missing[0]} in epoch {epoch}, which is "
                "complete; it was not written by dml train"
            )
        for peer in peers:
            data = entry[peer.index].data
            peer.epochs.append(epoch)
            peer.train_loss.append(float(data["train_loss"]))
            peer.train_acc.append(float(data["train_acc"]))
            peer.test_acc.append(float(data["test_acc"]))
            if "val_acc" in data:
                peer.val_acc.append(float(data["val_acc"]))
            if "train_ce" in data and "train_kd" in data:
                peer.train_ce.append(float(data["train_ce"]))
                peer.train_kd.append(float(data["train_kd"]))
        data = entry[ENSEMBLE].data
        ensemble[epoch] = float(data["test_acc"])
        if "val_acc" in data:
            ensemble_val[epoch] = float(data["val_acc"])
    if not peers[0].epochs:
        raise UserError(
            f"{path / METRICS_FILE} holds no epoch completed by every peer; report the run after its first epoch"
        )
    if any(len(p.val_acc) not in (0, len(p.epochs)) for p in peers) or (
        peers[0].val_acc and ensemble and len(ensemble_val) != len(ensemble)
    ):
        raise UserError(
            f"{path / METRICS_FILE} has val_acc in some epochs only; it was not written by one dml train run"
        )
    return Run(path, config, peers, ensemble, ensemble_val)


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())["config"]
        if not isinstance(config["models"], list) or not config["models"] or int(config["epochs"]) < 1:
            raise ValueError("no models or no planned epochs")
        return config
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {path.parent} is not a dml run directory") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{path} is unreadable ({type(exc).__name__}: {exc}); it was not written by dml train"
        ) from None
