"""The run directory: config.json, metrics.jsonl, TensorBoard event files and checkpoints.

Layout of ``<out-dir>/<name>/``::

    config.json          every setting, versions, device
    metrics.jsonl        one object per epoch and peer, then one for the ensemble: the last of its epoch;
                         one for each restart of the process group by its launcher (node "restart")
    <i>_<model>/         TensorBoard events of peer i; last.pt (every epoch), best.pt (best val_acc where
                         the run holds a validation split, else best test_acc)
    ensemble/            TensorBoard events of the cohort's ensemble

Files are written to a temporary file and renamed, so a crash leaves either the old or the new file,
never a torn one. What a checkpoint holds, and its writing and reading, belong to checkpoint.py; here
are its file names and the rename that publishes a staged ``last.next.pt`` as ``last.pt``.
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .errors import UserError
from .files import create_temp_file
from .models import folder_name

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from .config import TrainConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LAST = "last.pt"
LAST_NEXT = "last.next.pt"
BEST = "best.pt"


def peer_dir_name(index: int, model_name: str) -> str:
    return f"{index}_{folder_name(model_name)}"


def write_failed(path: Path, exc: OSError) -> UserError:
    return UserError(
        f"cannot write {path} ({exc.strerror or exc}); free disk space or fix the folder's permissions, "
        "then continue with --resume: the previous checkpoint is kept"
    )


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename over ``path``.

    A failure (full disk, read-only folder, a crash) leaves the previous file as it was.
    """
    path = Path(path)
    try:
        fd, tmp = create_temp_file(path, ".tmp")
    except OSError as exc:
        raise write_failed(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failed(path, exc) from None
        raise


def environment_info(runtime) -> dict:
    """What config.json records of the software and of how ``runtime`` computes."""
    device = runtime.device
    info = {
        "dml_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device_type": device.type,
        "device_name": platform.processor() or platform.machine(),
        "threads": runtime.runner.threads_per_worker,  # intra-op threads per peer (resume keeps them)
        "working_dir": os.getcwd(),  # where relative paths of the configuration (data_dir, out_dir) start
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


# the temporary file of an atomic write of one of the run's files (see create_temp_file)
_RUN_FILES = "|".join(map(re.escape, (CONFIG_FILE, METRICS_FILE, LAST_NEXT, BEST)))
TORN_WRITE = re.compile(rf"\.({_RUN_FILES})\.[0-9a-z_]+\.tmp")


def _is_torn_write(path: Path) -> bool:
    """A temporary file of an atomic write that never completed."""
    return path.is_file() and TORN_WRITE.fullmatch(path.name) is not None


def _events_without_epochs(path: Path) -> bool:
    """A TensorBoard event file with at most its header record: its writer logged no epoch."""
    if not (path.is_file() and path.name.startswith("events.out.tfevents.")):
        return False
    data = path.read_bytes()
    records, offset = 0, 0
    while offset + 12 <= len(data):  # a record: length (8 bytes), its CRC (4), the data, the data's CRC (4)
        offset += 12 + int.from_bytes(data[offset : offset + 8], "little") + 4
        records += 1
    return records <= 1


def trained_peers(cfg: TrainConfig) -> list[int]:
    """Indices of the peers that learn from gradients: not the teachers, not the temporal means."""
    means = cfg.means
    return [i for i in range(cfg.num_nodes) if i not in cfg.frozen and i not in means]


def saved_peers(cfg: TrainConfig) -> dict[int, str]:
    """Index -> model name of the peers with a folder and checkpoints: all but the teachers (the
    peers that learn and their temporal means)."""
    return {i: m for i, m in enumerate(cfg.models) if i not in cfg.frozen}


ENSEMBLE = "ensemble"  # the node of the record that ends an epoch
RESTART = "restart"  # the node of the record a restarted process group writes before it repeats an epoch


@dataclass(frozen=True)
class Record:
    """One line of metrics.jsonl: the object as written, and where it stands (for error messages)."""

    line: int
    data: dict

    @property
    def epoch(self) -> int:
        return self.data["epoch"]

    @property
    def node(self) -> int | str:
        """A peer's index, ``"ensemble"``, or ``"restart"``."""
        return self.data["node"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RunDir:
    """Reads and writes one run directory. Only the writer process writes shared files."""

    def __init__(self, path: Path, peer_names: dict[int, str], writer: bool = True):
        self.path = Path(path)
        self.peer_names = peer_names  # index -> model name, for every peer with checkpoints (see saved_peers)
        self.writer = writer
        self._tensorboard: dict[str, SummaryWriter] = {}
        # TensorBoard hides what an earlier process logged from this epoch on (logged, then lost before
        # its checkpoint): a resumed run shows each epoch once
        self.first_epoch = 1

    @classmethod
    def of(cls, cfg: TrainConfig, writer: bool = True) -> RunDir:
        """The run directory of ``cfg`` (``<out_dir>/<name>``), with its trained peers."""
        assert cfg.name is not None  # resolved: it names its run
        return cls(Path(cfg.out_dir) / cfg.name, saved_peers(cfg), writer)

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """A run directory as its config.json describes it, for reading (a UserError where that is unreadable)."""
        return cls(path, saved_peers(cls(path, {}).read_config()), writer=False)

    def peer_path(self, index: int) -> Path:
        return self.path / peer_dir_name(index, self.peer_names[index])

    # --- configuration -------------------------------------------------------------------
    def has_checkpoints(self) -> bool:
        return any((self.peer_path(i) / name).exists() for i in self.peer_names for name in (LAST, LAST_NEXT))

    def recorded_threads(self) -> int | None:
        """The intra-op threads per peer the run started with (None where config.json has none)."""
        try:
            threads = json.loads((self.path / CONFIG_FILE).read_text()).get("threads")
        except (OSError, ValueError, AttributeError):
            return None
        return threads if isinstance(threads, int) and threads >= 1 else None

    def recorded_loader(self) -> str | None:
        """How the run read its data ("memory" or "stream"; None where config.json does not say)."""
        try:
            loader = json.loads((self.path / CONFIG_FILE).read_text())["data"].get("loader")
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return None
        return loader if loader in ("memory", "stream") else None

    def holds_no_epoch(self) -> bool:
        """Whether the folder holds nothing but what ``dml train`` writes before a first epoch is complete
        (config.json, an empty metrics.jsonl, the peers' and the ensemble's folders with at most TensorBoard
        event files of no epoch, torn temporary files): starting it over loses nothing."""
        try:
            started = self.read_config()
        except UserError:  # a config.json dml train did not write (or none): not a start of its own
            return False
        # the peer folders of the configuration it was started with, which may differ from this one
        folders = {
            "ensemble",
            *(self.peer_path(i).name for i in self.peer_names),
            *(peer_dir_name(i, m) for i, m in enumerate(started.models) if i not in started.frozen),
        }
        try:
            for entry in self.path.iterdir():
                if entry.is_symlink():
                    return False
                if (entry.name == CONFIG_FILE and entry.is_file()) or _is_torn_write(entry):
                    continue
                if entry.name == METRICS_FILE and entry.is_file() and not entry.read_text().strip():
                    continue
                if (
                    entry.name in folders
                    and entry.is_dir()
                    and all(
                        not f.is_symlink() and (_is_torn_write(f) or _events_without_epochs(f)) for f in entry.iterdir()
                    )
                ):
                    continue
                return False
        except (OSError, UnicodeDecodeError):
            return False
        return True

    def read_config(self) -> TrainConfig:
        # imported here: config reads graphs (graph.py), which read teacher checkpoints through
        # checkpoint.py, which imports this module
        from .config import TrainConfig

        path = self.path / CONFIG_FILE
        try:
            data = json.loads(path.read_text())
            return TrainConfig.from_dict(data["config"])
        except FileNotFoundError:
            raise UserError(f"{path} is missing: {self.path} is not a dml run directory") from None
        except (ValueError, KeyError, TypeError, UserError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); it was not written by dml train") from None

    def create(self, cfg: TrainConfig, environment: dict) -> None:
        try:
            for index in self.peer_names:
                self.peer_path(index).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failed(self.path, exc) from None
        if not self.writer:
            return
        (self.path / "ensemble").mkdir(exist_ok=True)
        text = json.dumps({"config": cfg.to_dict(), **environment}, indent=2) + "\n"
        atomic_write_bytes(self.path / CONFIG_FILE, lambda f: f.write(text.encode()))

    # --- metrics -------------------------------------------------------------------------
    def records(self, missing_ok: bool = False) -> list[Record]:
        """Every record of metrics.jsonl, in file order; none where it does not exist yet and ``missing_ok``.

        A last line without its newline that does not parse is a write that a crash (or the running trainer)
        has not finished: it is left out, not an error. Any other line that is not a JSON object with an integer ``epoch`` and
        a ``node`` (a peer's index, ``"ensemble"`` or ``"restart"``) is a UserError naming it.
        """
        path = self.path / METRICS_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            if missing_ok:
                return []
            raise UserError(f"{path} is missing: the run has not completed an epoch yet") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is unreadable ({exc})") from None
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if number == len(lines):  # the unterminated last line
                    continue
                raise UserError(f"{path} line {number} is not valid JSON; the file is damaged") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number} is not a dml metrics record (not a JSON object)")
            epoch, node = record.get("epoch"), record.get("node")
            if not _is_int(epoch) or not (_is_int(node) or node in (ENSEMBLE, RESTART)):
                raise UserError(f"{path} line {number} is not a dml metrics record (epoch {epoch!r}, node {node!r})")
            records.append(Record(number, record))
        return records

    def completed_epochs(self, records: list[Record] | None = None) -> dict[int, dict[int | str, Record]]:
        """Epoch -> its records by node, for every complete epoch, in epoch order.

        An epoch is complete once its ensemble record is written: dml train writes it after those of
        all the peers (teachers included), in the same write. A later record of the same epoch and node
        (an epoch run again) replaces the earlier one. ``records``: those of :meth:`records`, when read.
        """
        by_epoch: dict[int, dict[int | str, Record]] = {}
        for record in self.records(missing_ok=True) if records is None else records:
            if record.node != RESTART:
                by_epoch.setdefault(record.epoch, {})[record.node] = record
        return {epoch: by_epoch[epoch] for epoch in sorted(by_epoch) if ENSEMBLE in by_epoch[epoch]}

    def last_completed_epoch(self) -> int:
        """The last complete epoch that metrics.jsonl holds (0: none). It can be one ahead of the checkpoints."""
        return max(self.completed_epochs(), default=0)

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop records of epochs after ``last_epoch`` (written before a crash, not checkpointed), and an
        unfinished last line."""
        path = self.path / METRICS_FILE
        if not self.writer or not path.exists():
            return
        kept = [json.dumps(r.data) for r in self.records() if r.epoch <= last_epoch]
        text = "".join(line + "\n" for line in kept)
        atomic_write_bytes(path, lambda f: f.write(text.encode()))

    def log_epoch(self, records: list[dict]) -> None:
        """Append one epoch's records to metrics.jsonl and TensorBoard."""
        if not self.writer:
            return
        self._append(records)
        for record in records:
            ensemble = record["node"] == ENSEMBLE
            folder = ENSEMBLE if ensemble else peer_dir_name(record["node"], record["model"])
            keys = (
                ("val_acc", "test_acc")
                if ensemble
                else ("lr", "train_loss", "train_ce", "train_kd", "train_acc", "val_acc", "test_acc")
            )
            for key in keys:
                if key in record:
                    self._scalar(folder, key, record[key], record["epoch"])
        for writer in self._tensorboard.values():
            writer.flush()

    def log_restart(self, saved_epoch: int, restart: int, max_restarts: int) -> None:
        """Record that the launcher restarted the process group (restart ``restart`` of ``max_restarts``)
        and that the run goes on after ``saved_epoch``: the epoch after it runs again. Its ``epoch`` is the
        saved one, so that a later resume from there keeps the record."""
        if self.writer:
            self._append(
                [
                    {
                        "epoch": saved_epoch,
                        "node": RESTART,
                        "restart": restart,
                        "max_restarts": max_restarts,
                        "repeats_epoch": saved_epoch + 1,
                    }
                ]
            )

    def _append(self, records: list[dict]) -> None:
        """Append ``records`` to metrics.jsonl in one write, on disk before this returns."""
        try:
            with open(self.path / METRICS_FILE, "a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise write_failed(self.path / METRICS_FILE, exc) from None

    def _scalar(self, folder: str, tag: str, value: float, step: int) -> None:
        if folder not in self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

            self._tensorboard[folder] = SummaryWriter(str(self.path / folder), purge_step=self.first_epoch)
        self._tensorboard[folder].add_scalar(tag, value, step)

    def close(self) -> None:
        for writer in self._tensorboard.values():
            writer.close()
        self._tensorboard.clear()

    # --- checkpoints ---------------------------------------------------------------------
    def publish_last(self, index: int) -> None:
        """Phase 2 of an epoch's commit (checkpoint.save_epoch): make the staged state the peer's ``last.pt``."""
        try:
            os.replace(self.peer_path(index) / LAST_NEXT, self.peer_path(index) / LAST)
        except OSError as exc:
            raise write_failed(self.peer_path(index) / LAST, exc) from None

    def resume_point(self, epochs_by_peer: dict[int, set[int]]) -> int:
        """The newest epoch every peer of the cohort has a checkpoint for; 0 where some peer has
        none at all (the first epoch's commit was cut short: the run starts again).

        ``epochs_by_peer`` holds, for every peer of the cohort, the epochs it can restore.
        """
        if not epochs_by_peer or not all(epochs_by_peer.values()):
            missing = sorted(i for i, epochs in epochs_by_peer.items() if not epochs)
            logged = self.last_completed_epoch()
            # metrics.jsonl runs at most one epoch ahead of the checkpoints: past epoch 1, every peer has one, so a
            # peer without any lost its files (a first epoch's commit cut short leaves logged <= 1)
            if logged > 1 and len(missing) < len(epochs_by_peer):
                folders = ", ".join(self.peer_path(i).name for i in missing)
                raise UserError(
                    f"{self.path}: {folders} has no checkpoint while the run logged {logged} complete "
                    "epochs; resuming would start over from epoch 1: put back its last.pt, or start over "
                    "with another --name"
                )
            return 0
        common = set.intersection(*epochs_by_peer.values())
        if not common:
            raise UserError(
                f"{self.path} holds no epoch that every peer has a checkpoint for; start a new run with another --name"
            )
        return max(common)
