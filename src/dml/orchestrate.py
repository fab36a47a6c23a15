"""What ``dml experiment`` and ``dml tune`` share to run ``dml train`` processes: the output directory
(claimed with a lock, its plan recorded), the state of a run read from its folder, the runs' processes
(each dies with this one: Linux's PR_SET_PDEATHSIG) and the signals that stop them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import checkpoint_epoch
from .config import train_flags
from .errors import RunStopped, UserError
from .plan import Plan, PlannedRun, differences
from .runlog import CONFIG_FILE, LAST, RunDir, atomic_write_bytes

PLAN_RECORD = "plan.json"
LOCK_FILE = ".lock"
LOGS = "logs"
POLL_SECONDS = 0.25  # how often a run's process and files are looked at: cheap reads


# --- the state of a run, read from its folder -------------------------------------------------------
def epochs_saved(path: Path) -> int | None:
    """The epoch of the oldest published last.pt among the saved peers (all but the teachers) of the
    run in ``path`` (0: none yet); None where no run was started there. A run killed between staging and publishing
    its final epoch counts as unfinished: its --resume completes the commit."""
    if not (path / CONFIG_FILE).exists():
        return None
    try:
        run = RunDir.open(path)
        lasts = [run.peer_path(i) / LAST for i in run.peer_names]
        return min(checkpoint_epoch(p) if p.exists() else 0 for p in lasts)
    except UserError:
        return 0  # damaged: dml train --resume says what is wrong


def epochs_logged(path: Path) -> int:
    """The last complete epoch in the run's metrics.jsonl (for progress only: it can run one epoch ahead
    of the checkpoints); a UserError where the file is damaged."""
    return RunDir(path, {}, writer=False).last_completed_epoch()


def is_finished(run: PlannedRun, saved: int | None) -> bool:
    """Whether a run whose folder holds ``saved`` epochs (see epochs_saved) has nothing left to do."""
    return (saved or 0) >= run.epochs


# --- the output directory ---------------------------------------------------------------------------
def claim_out_dir(plan: Plan, out_dir: Path) -> int:
    """Lock ``out_dir`` for this plan (returns the lock's file descriptor) and record the plan there;
    refuse a plan that differs from the one recorded, and a directory another plan is running in."""
    try:
        (out_dir / LOGS).mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot use {out_dir} as the output directory ({exc})") from None
    # Runs of a plan killed a moment ago hold the lock until they have died (they share it).
    for _ in range(50):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.2)
    else:
        os.close(fd)
        raise UserError(f"another dml experiment is running in {out_dir}; wait for it to end or use another --out-dir")
    try:
        grows = check_plan(plan, out_dir)
        record = {
            "plan": str(plan.path.resolve()),
            "runs": {run.name: run.settings for run in plan.runs},
            "search": plan.search,
            "set": plan.overrides,
        }
        if grows or not (out_dir / PLAN_RECORD).exists():  # the record and copy follow a plan that gained runs
            atomic_write_bytes(out_dir / PLAN_RECORD, lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))
            atomic_write_bytes(out_dir / "plan.toml", lambda f: f.write(plan.path.read_bytes()))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_plan(plan: Plan, out_dir: Path) -> bool:
    """Refuse a plan that would change the runs an output directory already holds (as --resume does);
    return whether it adds runs to them (which changes nothing that ran)."""
    path = out_dir / PLAN_RECORD
    if not path.exists():
        return False
    try:
        recorded = json.loads(path.read_text())
        changed = differences(recorded["runs"], {run.name: run.settings for run in plan.runs})
        grows = any(run.name not in recorded["runs"] for run in plan.runs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); it was not written by dml experiment") from None
    # --set is not in the plan file, so nothing else would notice it missing (a data_dir back to the plan's)
    if recorded.get("set", {}) != plan.overrides:
        raise UserError(
            f"{out_dir} was started with {set_text(recorded.get('set', {}))}, not "
            f"{set_text(plan.overrides)}; continue it with the same --set, or use another --out-dir"
        )
    if recorded.get("search", {}) != plan.search:
        changed.append(f"[search] {recorded.get('search', {})!r} -> {plan.search!r}")
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise UserError(
            f"the plan differs from the one that started {out_dir} ({shown}); run the original plan "
            "there, or this one with another --out-dir"
        )
    return grows


def set_text(overrides: dict) -> str:
    """``--set`` overrides as typed: ``--set data_dir=/data --set lr=0.05`` (``no --set`` for none)."""
    if not overrides:
        return "no --set"
    return " ".join(f"--set {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())


# --- the runs' processes ----------------------------------------------------------------------------
def train_command(run: PlannedRun, out_dir: Path, resume: bool) -> list[str]:
    """The ``dml train ...`` command of one planned run."""
    settings = {k: v for k, v in run.settings.items() if k != "progress"}
    return [
        "dml",
        "train",
        *train_flags(settings),
        "--out-dir",
        str(out_dir),
        "--name",
        run.name,
        "--no-progress",
        *(["--resume"] if resume else []),
    ]


def die_with_parent():
    """What a run's process does before it starts: ask to be killed when this process dies, even by
    kill -9 (Linux's PR_SET_PDEATHSIG). Resolved here, in the parent, so that the forked child runs no
    import or library lookup. Elsewhere (None) the lock a run inherits keeps a second experiment out
    until it has ended."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before it took effect
            os._exit(1)

    return arm


def start_run(run: PlannedRun, out_dir: Path, resume: bool, lock_fd: int, env: dict | None = None) -> subprocess.Popen:
    """``dml train`` of one planned run as a process of its own, its output appended to its log; it
    holds the output directory's lock while it lives and dies with this process."""
    command = train_command(run, out_dir, resume)
    with open(out_dir / LOGS / f"{run.name}.log", "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        log.flush()
        return subprocess.Popen(
            [sys.executable, "-m", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env or child_env(0, 1),
            start_new_session=True,
            preexec_fn=die_with_parent(),
            pass_fds=(lock_fd,),
        )


def child_env(slot: int, jobs: int) -> dict:
    """Runs side by side share the CPU cores, or get a GPU each where there are several."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# --- stopping ---------------------------------------------------------------------------------------
@contextmanager
def signals_to(handler):
    """SIGINT and SIGTERM go to ``handler`` inside the block (which stops its runs at an epoch boundary)."""
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, earlier in previous.items():
            signal.signal(sig, earlier)


def stopped_by(signum: int, kept: str) -> RunStopped:
    """The error of work stopped by a signal, with the shell's exit status for it (130, 143)."""
    return RunStopped(
        f"stopped by {signal.Signals(signum).name}; {kept}: run the same command again to continue",
        exit_code=128 + signum,
    )
