"""Checkpoints: the one place that writes and reads ``best.pt`` and ``last.pt``, and a run's state on
disk around them (refusing to overwrite or mis-resume a run, the resume point, the RNG state).

Every epoch, ``best.pt`` is written where a peer improved on validation accuracy (on test accuracy
without a validation split), then every peer's ``last.pt`` is committed in two phases (all
``last.next.pt`` first, then the renames) so that a crash between peers or processes never leaves a
cohort that cannot resume. A file is written to a temporary file and renamed, never torn.

Schema (format 1). A checkpoint is a dict of tensors and plain containers, written with
``torch.save`` and read with ``torch.load(..., weights_only=True)``: loading one never runs code, and
a network of the user's own (``package.module:factory``) is imported only where the user names it.

Both files hold:

    format        FORMAT_VERSION (1); files written before the stamp existed have no "format": 1
    model         the network's state_dict
    model_name    the network: a registry name (resnet32) or package.module:factory
    index         the peer's position in the cohort
    num_classes   the classes its last layer predicts
    dataset       the run's dataset (config["dataset"])
    config        the run's settings (TrainConfig.to_dict())
    working_dir   the directory the run was started in: the relative paths of config start there

``best.pt`` (the peer at its best epoch) adds:

    epoch         the epoch it was saved after
    selected_on   "val_acc" or "test_acc": the accuracy that chose it
    val_acc       its validation accuracy (%), where the run holds a validation split
    test_acc      its test accuracy (%)

``last.pt`` (the peer after the newest complete epoch; ``last.next.pt`` while staged) adds the rest
of ``Peer.state_dict()`` and the run state that resumes it:

    optimizer     the optimizer's state_dict
    scheduler     the schedule's state_dict, or None
    best_acc      the best selection accuracy so far (-inf before the first)
    best_epoch    its epoch (0 before the first)
    run           {"epoch": the epoch it was saved after, "threads": the thread count the next epoch
                  computes with, "data_generator" / "torch_rng" / "cuda_rng" (CUDA only): RNG states}

A temporal mean's files (a peer that follows another's weights, ``peer.MeanOf``) differ: both add

    mean_of       the index of the peer it follows

and its ``last.pt`` holds, in place of "optimizer" and "scheduler",

    decay         the weight each update gives the mean's own weights (once past the warm-up)
    updates       how many steps of its source it has followed (the warm-up's t; files without it
                  were written before the warm-up and continue at 1 - decay)

A file of another format (a later version of dml) is refused with one line naming both versions.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__
from .choices import AUTO
from .errors import RunStopped, UserError
from .models import is_import_path
from .runlog import BEST, CONFIG_FILE, LAST, LAST_NEXT, RunDir, atomic_write_bytes

if TYPE_CHECKING:  # imported for annotations only: config and cohort import modules that read checkpoints
    from .cohort import Cohort
    from .config import TrainConfig

FORMAT_KEY = "format"
FORMAT_VERSION = 1  # raise where the schema above changes, and read the earlier versions that still can be

# What a checkpoint is read for (``read_checkpoint``): each needs different entries and gives
# different advice where the file cannot be used.
EVALUATE = "evaluate"  # a network to build: model name, class count and weights (dml evaluate, teachers)
TEACHER = "teacher"  # a frozen peer of a graph or --teacher: the model name it holds
RESUME = "resume"  # a run's own last.pt: the peer's whole state and the run state
PURPOSES = (EVALUATE, TEACHER, RESUME)

CHECKPOINT_NAMES = (BEST, LAST)
# What to do about a checkpoint that cannot be read, where it is one of a run's own (resume).
RESUME_ADVICE = "delete it to fall back to an earlier one, or start a new run"
OTHER_FILE_ADVICE = "pass another best.pt or last.pt of a dml run"


@dataclass(frozen=True)
class SavedPeer:
    """What a checkpoint file holds, as read for one purpose (see the schema above)."""

    path: Path
    format: int
    model_name: str | None  # a str, except where read to resume (restore names the mismatch)
    num_classes: int | None  # an int where read to evaluate
    weights: dict  # the network's state_dict
    epoch: int | None  # best.pt's epoch, or last.pt's run epoch; an int >= 1 where read to resume
    dataset: str | None
    config: dict  # the run's settings ({} where the file records none)
    working_dir: str | None
    state: dict = field(repr=False)  # every entry, as Peer.load_state_dict and the run state read them

    @property
    def run(self) -> dict:
        """last.pt's run state (epoch, threads, RNG states); KeyError where the file holds none."""
        return self.state["run"]


def read_checkpoint(path: str | Path, purpose: str, map_location="cpu") -> SavedPeer:
    """Read a checkpoint for ``purpose`` (EVALUATE, TEACHER or RESUME); one UserError line where the
    file cannot serve it. Tensors and plain containers only: a pickled object is refused unread."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    path = Path(path)
    advice = RESUME_ADVICE if purpose == RESUME else OTHER_FILE_ADVICE
    if purpose == TEACHER:
        path = teacher_path(path)
    state = _load(path, map_location, advice)
    version = state.get(FORMAT_KEY, 1)  # files of before the stamp: the layout of format 1
    if version != FORMAT_VERSION or isinstance(version, bool):
        instead = ", or start a new run with another --name" if purpose == RESUME else ""
        raise UserError(
            f"checkpoint {path} is in checkpoint format {version!r}, which dml {__version__} does not read "
            f"(it reads format {FORMAT_VERSION}); use the version of dml that wrote it{instead}"
        )
    if "model" not in state:
        raise UserError(f"checkpoint {path} is not a dml checkpoint (no model state in it); {advice}")
    name, num_classes = state.get("model_name"), state.get("num_classes")
    run = state.get("run")
    epoch = state.get("epoch", run.get("epoch") if isinstance(run, dict) else None)  # best.pt, or last.pt's run
    if purpose == EVALUATE and (not isinstance(name, str) or not isinstance(num_classes, int)):
        raise UserError(f"checkpoint {path} does not name a model and class count; it was not written by dml train")
    if purpose == TEACHER and not isinstance(name, str):
        raise UserError(f"checkpoint {path} does not name its model; it was not written by dml train")
    if purpose == RESUME:
        epoch = run.get("epoch") if isinstance(run, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise UserError(
                f"checkpoint {path} records no epoch: it is not a resumable dml checkpoint; "
                "start a new run with another --name"
            )
    config = state.get("config")
    config = config if isinstance(config, dict) else {}
    working_dir = state.get("working_dir") if isinstance(state.get("working_dir"), str) else None
    return SavedPeer(
        path, FORMAT_VERSION, name, num_classes, state["model"], epoch, state.get("dataset"), config, working_dir, state
    )


def teacher_path(path: str | Path) -> Path:
    """A teacher's checkpoint file, checked to be one (not read)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"teacher checkpoint {path} is a directory, not a checkpoint file; {directory_advice(path)}")
    if not path.is_file():
        raise UserError(
            f"teacher checkpoint {path} does not exist; train the teacher first (dml train --models "
            "MODEL) and pass its best.pt or last.pt"
        )
    return path


def _load(path: Path, map_location, advice: str) -> dict:
    """The file's dict, loaded with weights_only=True. ``advice`` ends the message for a file that
    cannot be read: resuming a run may fall back to an earlier checkpoint, other uses need another file."""
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a checkpoint file; {directory_advice(path)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises several types for truncated, foreign or pickled-object files
        raise UserError(
            f"checkpoint {path} is not a readable dml checkpoint: it is truncated, damaged or another kind of "
            f"file ({type(exc).__name__}); {advice}"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} is not a dml checkpoint (no model state in it); {advice}")
    return state


def write_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (best.pt or last.pt as the schema above) stamped with the format version,
    through a temporary file and a rename."""
    stamped = {FORMAT_KEY: FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda f: torch.save(stamped, f))


def checkpoint_epoch(path: Path) -> int:
    """The epoch a peer's ``last.pt`` was written after."""
    epoch = read_checkpoint(path, RESUME).epoch
    assert epoch is not None  # read to resume: read_checkpoint checked it is an int >= 1
    return epoch


def checkpoint_epochs(run: RunDir, index: int) -> dict[int, Path]:
    """Epochs peer ``index`` of ``run`` has a complete checkpoint for (last.pt and a staged last.next.pt)."""
    found = {}
    for name in (LAST, LAST_NEXT):
        path = run.peer_path(index) / name
        if path.exists():
            found[checkpoint_epoch(path)] = path
    return found


def file_digest(path: Path) -> str:
    """The SHA-256 of a checkpoint file: a graph records its teachers' so that resume notices a changed one."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoints_in(folder: Path) -> list[Path]:
    """The best.pt files in ``folder`` and in its subfolders (a peer's folder, a run directory), or
    their last.pt files where there is no best.pt."""
    for name in CHECKPOINT_NAMES:
        found = sorted(p for p in [Path(folder) / name, *Path(folder).glob(f"*/{name}")] if p.is_file())
        if found:
            return found
    return []


def directory_advice(folder: Path) -> str:
    """What to pass instead of a directory given as a checkpoint."""
    found = checkpoints_in(folder)
    if not found:
        return f"it holds no {' or '.join(CHECKPOINT_NAMES)}; {OTHER_FILE_ADVICE}"
    return f"pass a checkpoint file in it: {' '.join(str(p) for p in found)}"


def check_model_named(what: str, recorded: str, named: str | None, naming: str) -> None:
    """Refuse to build a network of the user's own that a checkpoint records (``package.module:factory``)
    unless the user named it too: a checkpoint never imports code by itself. ``what`` names the
    checkpoint in the message; ``naming`` is the setting that names its model, e.g. ``--models x:y``."""
    if named is not None and named != recorded:
        raise UserError(f"{what} holds a {recorded!r}, not the {named!r} named for it; use {naming}")
    if named is None and is_import_path(recorded):
        raise UserError(
            f"{what} holds a network of your own, {recorded!r}, and a checkpoint does not import code "
            f"by itself: add {naming} to import it"
        )


def check_run_dir(cfg: TrainConfig, resume: bool | str, run: RunDir) -> bool:
    """Refuse to overwrite a run, to resume nothing, or to resume with another configuration; returns
    whether the run continues (True) or starts (False). A folder holding only the start of a run that
    never completed an epoch is no run: it is started over. ``resume`` is False, True or ``AUTO``
    (continue what is there, start what is not: one command for a first start and every restart)."""
    _check_not_a_file(run)
    holds_run = (run.path / CONFIG_FILE).exists() or run.has_checkpoints()
    if resume == AUTO:
        resume = holds_run and not run.holds_no_epoch()
        if not resume:
            return False
    if resume:
        if not (run.path / CONFIG_FILE).exists():
            raise UserError(
                f"nothing to resume in {run.path}: it holds no run (no {CONFIG_FILE}); run without --resume"
            )
        differences = cfg.differences(run.read_config())
        if differences:
            raise UserError(
                f"--resume with a configuration that differs from the run in {run.path} "
                f"({'; '.join(differences)}); repeat the original command with --resume, or --name for a new run"
            )
        return True
    if holds_run and not run.holds_no_epoch():
        # A run stopped before its first epoch was complete holds nothing to lose: it starts over
        # (with this configuration, which may differ: "lower --lr and start again").
        raise UserError(f"{run.path} already holds a run; pass --resume to continue it, or --name for a new run")
    return False


def what_is_saved(run: RunDir) -> str:
    """What a run that stopped somewhere unknown holds, and how to go on (the end of an error line)."""
    try:
        epoch = run.resume_point({i: set(checkpoint_epochs(run, i)) for i in run.peer_names})
    except UserError:  # a damaged checkpoint: --resume says which
        return "the last complete epoch is saved: continue with the same command and --resume"
    if epoch:
        return f"epoch {epoch} is saved: continue with the same command and --resume"
    if not (run.path / CONFIG_FILE).exists() or run.holds_no_epoch():
        return "nothing was saved; run the same command again"
    return "no epoch was saved; run the same command with --resume to start over"  # epoch 1 logged, not saved


def _check_not_a_file(run: RunDir) -> None:
    """A file where the run directory or its --out-dir should be: said before anything is loaded
    (writing would fail later with advice meant for a full disk)."""
    out_dir = run.path.parent
    existing = next((p for p in (run.path, *run.path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return
    if existing == run.path:
        raise UserError(
            f"{run.path} is a file, not a run directory; pass another --name or --out-dir (nothing was written)"
        )
    where = "" if existing == out_dir else f" cannot be created: {existing}"
    raise UserError(
        f"--out-dir {out_dir}{where} is a file, not a directory; pass a folder as --out-dir (nothing was written)"
    )


def restore(run: RunDir, cohort: Cohort) -> dict | None:
    """Load every local peer at the newest epoch the whole cohort reached; return the run state,
    or None where the cohort never completed an epoch (its staged first epoch is discarded)."""
    peers, exchange, device = cohort.saved, cohort.exchange, cohort.device
    local_epochs = {p.index: checkpoint_epochs(run, p.index) for p in peers}
    shared: dict[int, set[int]] = {}
    for part in exchange.gather_objects({i: set(e) for i, e in local_epochs.items()}):
        shared.update(part)
    epoch = run.resume_point(shared)
    writes = exchange.writes_peers  # of a peer's data-parallel replicas, one changes its files
    if epoch == 0:
        exchange.barrier()  # every replica has listed the files before one removes them
        for p in peers if writes else ():
            (run.peer_path(p.index) / LAST_NEXT).unlink(missing_ok=True)
        return None
    run_state, read = {}, []
    for p in peers:
        path = local_epochs[p.index][epoch]
        saved = read_checkpoint(path, RESUME, map_location=device)
        if saved.model_name != p.model_name:
            raise UserError(
                f"checkpoint {path} holds a {saved.model_name!r}, but peer {p.index} is a "
                f"{p.model_name!r}; resume with the run's own --models"
            )
        try:
            p.load_state_dict(saved.state)
            run_state = saved.run
            _check_rng_state(run_state, device)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(
                f"checkpoint {path} does not fit peer {p.label} ({type(exc).__name__}): it is damaged "
                "or from another configuration; start a new run with another --name"
            ) from None
        read.append((p, path))
    exchange.barrier()  # every replica has read its peers' files before one renames them
    for p, path in read if writes else ():
        staged = run.peer_path(p.index) / LAST_NEXT
        if path == staged:
            run.publish_last(p.index)  # finish the commit a crash interrupted
        else:
            staged.unlink(missing_ok=True)  # staged past what every peer reached: discard
    return run_state


def _rng_state(generator: torch.Generator) -> dict:
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {
        "data_generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _check_rng_state(state: dict, device: torch.device) -> None:
    """Setting a state of the wrong size fails; try it on throw-away generators first."""
    for key, generator in (("data_generator", torch.Generator(device=device)), ("torch_rng", torch.Generator())):
        if not isinstance(state.get(key), torch.Tensor) or state[key].dtype != torch.uint8:
            raise ValueError(f"no {key} state")
        generator.set_state(state[key].cpu())


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["data_generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


def save_epoch(
    run: RunDir,
    epoch: int,
    cohort: Cohort,
    records: list[dict],
    generator: torch.Generator,
    cfg: TrainConfig,
    num_classes: int,
) -> None:
    """best.pt where a peer improved, then every peer's last.pt committed in two phases; of a peer
    with data-parallel replicas (all alike), one replica writes."""
    peers = cohort.saved  # teachers are never saved
    writes = cohort.exchange.writes_peers
    for p in peers:
        if not all(torch.isfinite(t).all() for t in p.model.state_dict().values() if t.is_floating_point()):
            raise RunStopped(
                f"peer {p.label} diverged: its parameters are not finite after epoch {epoch}; "
                "the checkpoint of the last complete epoch is kept; lower --lr and start again"
            )
    # threads: the count the next epoch computes with (it orders floating-point sums): a resumed run
    # continues with it, exactly as the run would have
    run_state = {"epoch": epoch, "threads": cohort.runtime.threads, **_rng_state(generator)}
    by_peer = {r["node"]: r for r in records}
    # working_dir: the run's relative paths (its --data-dir) are relative to it; dml evaluate resolves them
    meta = {"config": cfg.to_dict(), "num_classes": num_classes, "dataset": cfg.dataset, "working_dir": os.getcwd()}
    for p in peers:
        record = by_peer[p.index]
        # Chosen on validation accuracy where the run holds a validation split: choosing on the test
        # set would make the test accuracy of best.pt an optimistic estimate.
        selected_on = "val_acc" if "val_acc" in record else "test_acc"
        if record[selected_on] > p.best_acc:
            p.best_acc, p.best_epoch = record[selected_on], epoch
            if writes:
                write_checkpoint(
                    run.peer_path(p.index) / BEST,
                    {
                        "model": p.model.state_dict(),
                        "model_name": p.model_name,
                        "index": p.index,
                        "epoch": epoch,
                        "selected_on": selected_on,
                        **{k: record[k] for k in ("val_acc", "test_acc") if k in record},
                        **({"mean_of": p.mean_of.source} if p.mean_of else {}),
                        **meta,
                    },
                )
    for p in peers if writes else ():  # phase 1 of the commit: every peer's new state beside its current one
        write_checkpoint(run.peer_path(p.index) / LAST_NEXT, {**p.state_dict(), "run": run_state, **meta})
    cohort.exchange.barrier()
    for p in peers if writes else ():
        run.publish_last(p.index)
