"""``dml experiment``: every run of a plan, one after another or ``--jobs`` at a time, each its own
``dml train`` process; then the report of the whole plan.

The output directory holds the runs, ``plan.json`` (the runs' settings and ``--set`` overrides, to
refuse a changed plan),
``logs/<run>.log`` (each run's console output) and ``report.md`` with ``plots/``. The state of a run
is read from its checkpoints, never from a record of our own: a plan killed at any moment (kill -9
included) is finished by the same command, skipping finished runs and resuming interrupted ones
from their last complete epoch, so that every run is trained exactly once.
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
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .config import train_flags
from .errors import RunStopped, UserError
from .plan import Plan, PlannedRun, differences, read_plan
from .checkpoint import checkpoint_epoch
from .runlog import CONFIG_FILE, LAST, METRICS_FILE, RunDir, atomic_write_bytes

PLAN_RECORD = "plan.json"
LOCK_FILE = ".lock"
LOGS = "logs"
POLL_SECONDS = 0.25  # how often a run's process and files are looked at: cheap reads


# --- the state of a run, read from its folder -------------------------------------------------------
def epochs_saved(path: Path) -> int | None:
    """The epoch of the oldest published last.pt among the trainable peers of the run in ``path``
    (0: none yet); None where no run was started there. A run killed between staging and publishing
    its final epoch counts as unfinished: its --resume completes the commit."""
    if not (path / CONFIG_FILE).exists():
        return None
    try:
        cfg = RunDir(path, {}).read_config()
        run = RunDir(path, {i: m for i, m in enumerate(cfg.models) if i not in cfg.frozen})
        lasts = [run.peer_path(i) / LAST for i in run.peer_names]
        return min(checkpoint_epoch(p) if p.exists() else 0 for p in lasts)
    except UserError:
        return 0  # damaged: dml train --resume says what is wrong


def epochs_logged(path: Path) -> int:
    """The last epoch in the run's metrics.jsonl (for progress only: it can run one epoch ahead of
    the checkpoints)."""
    try:
        lines = (path / METRICS_FILE).read_text().splitlines()
    except OSError:
        return 0
    last = 0
    for line in lines:
        if '"ensemble"' in line:
            try:
                last = max(last, int(json.loads(line)["epoch"]))
            except (ValueError, KeyError, TypeError):
                pass  # a line being written
    return last


def is_finished(run: PlannedRun, saved: int | None) -> bool:
    """Whether a run whose folder holds ``saved`` epochs (see epochs_saved) has nothing left to do."""
    return (saved or 0) >= run.epochs


def status_text(run: PlannedRun, saved: int | None) -> str:
    if saved is None:
        return "new"
    if saved == 0:  # started, but stopped before its first epoch was saved
        return f"interrupted in epoch 1 of {run.epochs}"
    return "done" if is_finished(run, saved) else f"interrupted after epoch {saved} of {run.epochs}"


def train_command(run: PlannedRun, out_dir: Path, resume: bool) -> list[str]:
    """The ``dml train ...`` command of one planned run."""
    settings = {k: v for k, v in run.settings.items() if k != "progress"}
    return ["dml", "train", *train_flags(settings), "--out-dir", str(out_dir), "--name", run.name,
            "--no-progress", *(["--resume"] if resume else [])]


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
        raise UserError(f"another dml experiment is running in {out_dir}; wait for it to end or use another "
                        "--out-dir")
    try:
        check_plan(plan, out_dir)
        record = {"plan": str(plan.path.resolve()), "runs": {run.name: run.settings for run in plan.runs},
                  "search": plan.search, "set": plan.overrides}
        if not (out_dir / PLAN_RECORD).exists():
            atomic_write_bytes(out_dir / PLAN_RECORD, lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))
            atomic_write_bytes(out_dir / "plan.toml", lambda f: f.write(plan.path.read_bytes()))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_plan(plan: Plan, out_dir: Path) -> None:
    """Refuse a plan that would change the runs an output directory already holds (as --resume does)."""
    path = out_dir / PLAN_RECORD
    if not path.exists():
        return
    try:
        recorded = json.loads(path.read_text())
        changed = differences(recorded["runs"], {run.name: run.settings for run in plan.runs})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is unreadable ({exc}); it was not written by dml experiment") from None
    # --set is not in the plan file, so nothing else would notice it missing (a data_dir back to the plan's)
    if recorded.get("set", {}) != plan.overrides:
        raise UserError(f"{out_dir} was started with {set_text(recorded.get('set', {}))}, not "
                        f"{set_text(plan.overrides)}; continue it with the same --set, or use another --out-dir")
    if recorded.get("search", {}) != plan.search:
        changed.append(f"[search] {recorded.get('search', {})!r} -> {plan.search!r}")
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise UserError(f"the plan differs from the one that started {out_dir} ({shown}); run the original plan "
                        "there, or this one with another --out-dir")


def set_text(overrides: dict) -> str:
    """``--set`` overrides as typed: ``--set data_dir=/data --set lr=0.05`` (``no --set`` for none)."""
    if not overrides:
        return "no --set"
    return " ".join(f"--set {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items())


# --- running ----------------------------------------------------------------------------------------
def _die_with_parent():
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
    return RunStopped(f"stopped by {signal.Signals(signum).name}; {kept}: run the same command again to continue",
                      exit_code=128 + signum)


@dataclass
class Child:
    run: PlannedRun
    process: subprocess.Popen
    started: float
    slot: int  # which of the --jobs places (and GPU, where there are several) it has
    shown_epoch: int = 0  # the last epoch a progress line was printed for


def start_run(run: PlannedRun, out_dir: Path, resume: bool, lock_fd: int, env: dict | None = None) -> subprocess.Popen:
    """``dml train`` of one planned run as a process of its own, its output appended to its log; it
    holds the output directory's lock while it lives and dies with this process."""
    command = train_command(run, out_dir, resume)
    with open(out_dir / LOGS / f"{run.name}.log", "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        log.flush()
        return subprocess.Popen([sys.executable, "-m", *command], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env or _child_env(0, 1), start_new_session=True,
                                preexec_fn=_die_with_parent(), pass_fds=(lock_fd,))


def _format_duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{seconds:.0f}s"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


def _child_env(slot: int, jobs: int) -> dict:
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


class Runner:
    """Starts the plan's runs as processes, at most ``jobs`` at a time, in plan order (a run that
    reads another's checkpoint waits for it), and shows the plan's progress."""

    def __init__(self, plan: Plan, out_dir: Path, jobs: int, lock_fd: int, progress: bool):
        self.plan, self.out_dir, self.jobs, self.lock_fd = plan, out_dir, jobs, lock_fd
        self.saved = {run.name: epochs_saved(out_dir / run.name) for run in plan.runs}
        self.done = {run.name for run in plan.runs if is_finished(run, self.saved[run.name])}
        self.failed: dict[str, str] = {}
        self.running: dict[str, Child] = {}
        self.total_epochs = sum(run.epochs for run in plan.runs)
        self.start_epochs, self.start_peer_epochs = self.trained({})
        self.started = time.monotonic()
        # tqdm's own rate and remaining time would count a 4-peer epoch as one 1-peer epoch: eta() counts peers
        self.bar = tqdm(total=self.total_epochs, initial=self.start_epochs, unit="epoch", desc="plan",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} epochs [{elapsed}{postfix}]",
                        disable=None if progress else True, dynamic_ncols=True, leave=False)
        self.stop_signal: int | None = None

    def log(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()  # a log file reads each line as it happens

    def trained(self, logged: dict[str, int]) -> tuple[int, int]:
        """Epochs trained so far over all runs, plainly and once per trained peer; ``logged``: the
        epochs the running runs have logged."""
        epochs = peer_epochs = 0
        for run in self.plan.runs:
            if run.name in self.running:
                n = min(logged[run.name], run.epochs)
            else:
                n = run.epochs if run.name in self.done else min(self.saved[run.name] or 0, run.epochs)
            epochs, peer_epochs = epochs + n, peer_epochs + n * run.peers
        return epochs, peer_epochs

    def eta(self, peer_epochs: int) -> str:
        """From this invocation's pace per peer-epoch: a 4-peer run's epoch costs about four 1-peer
        epochs (a frozen teacher's forward pass is not counted)."""
        trained = peer_epochs - self.start_peer_epochs
        if trained <= 0:
            return "ETA after the first epoch"
        left = sum(run.epochs * run.peers for run in self.plan.runs) - peer_epochs
        return f"ETA {_format_duration((time.monotonic() - self.started) / trained * left)}"

    def _logged(self) -> dict[str, int]:
        return {name: epochs_logged(self.out_dir / name) for name in self.running}

    def _start(self, run: PlannedRun, slot: int) -> None:
        saved = self.saved[run.name]
        process = start_run(run, self.out_dir, saved is not None, self.lock_fd, _child_env(slot, self.jobs))
        log_path = self.out_dir / LOGS / f"{run.name}.log"
        self.running[run.name] = Child(run, process, time.monotonic(), slot, saved or 0)
        if self.stop_signal is not None:  # a signal that came while it started
            process.send_signal(signal.SIGTERM)
        how = "starts" if saved is None else "starts again (no epoch was saved)" if saved == 0 else \
            f"resumes after epoch {saved}"
        self.log(f"[{len(self.done)}/{len(self.plan.runs)} done] {run.name} {how} (log: {log_path})")

    def _finish(self, child: Child, code: int) -> None:
        run = child.run
        del self.running[run.name]
        self.saved[run.name] = epochs_saved(self.out_dir / run.name)
        if code == 0 and is_finished(run, self.saved[run.name]):
            self.done.add(run.name)
            took = _format_duration(time.monotonic() - child.started)
            self.log(f"[{len(self.done)}/{len(self.plan.runs)} done] {run.name} finished in {took}; "
                     f"{self.eta(self.trained(self._logged())[1])}")
        elif self.stop_signal is None:
            self.failed[run.name] = f"exit status {code}: {last_line(self.out_dir / LOGS / f'{run.name}.log')}"
            self.log(f"{run.name} failed ({self.failed[run.name]})")

    def _ready(self) -> list[PlannedRun]:
        ready = []
        for run in self.plan.runs:
            if run.name in self.done or run.name in self.failed or run.name in self.running:
                continue
            blocked = [name for name in run.after if name in self.failed]
            if blocked:
                self.failed[run.name] = f"not started: {blocked[0]}, whose checkpoint it reads, failed"
            elif all(name in self.done for name in run.after):
                ready.append(run)
        return ready

    def run(self) -> None:
        with signals_to(self._handle):
            try:
                while True:
                    if self.stop_signal is None:
                        free = sorted(set(range(self.jobs)) - {c.slot for c in self.running.values()})
                        for run, slot in zip(self._ready(), free):
                            if self.stop_signal is None:
                                self._start(run, slot)
                    if not self.running:
                        break
                    time.sleep(POLL_SECONDS)
                    for child in list(self.running.values()):
                        code = child.process.poll()
                        if code is not None:
                            self._finish(child, code)
                    self._show_progress()
            finally:
                self.bar.close()
        if self.stop_signal is not None:
            raise stopped_by(self.stop_signal, "every run keeps its last complete epoch")

    def _show_progress(self) -> None:
        """The bar on a terminal; elsewhere (a log file) a line per epoch a run completes."""
        logged = self._logged()
        epochs, peer_epochs = self.trained(logged)
        if self.bar.disable:
            for name, epoch in logged.items():
                child = self.running[name]
                if epoch > child.shown_epoch:
                    child.shown_epoch = epoch
                    self.log(f"[{len(self.done)}/{len(self.plan.runs)} done] {name} epoch {epoch}/{child.run.epochs}; "
                             f"{self.eta(peer_epochs)}")
            return
        self.bar.n = epochs
        parts = [f"runs {len(self.done)}/{len(self.plan.runs)} done"]
        parts += [f"{name} epoch {min(logged[name] + 1, c.run.epochs)}/{c.run.epochs}" for name, c in self.running.items()]
        self.bar.set_postfix_str("; ".join(parts + [self.eta(peer_epochs)]), refresh=True)

    def _handle(self, signum, frame) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum
        for child in self.running.values():  # each stops before its next step, its last epoch saved
            child.process.send_signal(signal.SIGTERM)


# --- the command ------------------------------------------------------------------------------------
def write_report(plan: Plan, out_dir: Path) -> Path | None:
    """report.md and plots/ of every run that has completed an epoch (compared with the plan's baseline)."""
    from .report import report

    started = [out_dir / run.name for run in plan.runs if epochs_logged(out_dir / run.name) > 0]
    # finished baseline runs only: an interrupted seed would not be comparable with the others
    baseline = [out_dir / r.name for r in plan.baseline_runs() if is_finished(r, epochs_saved(out_dir / r.name))]
    if not started:
        return None
    report(started, baseline=baseline or None, out=out_dir / "report.md", plots=out_dir / "plots")
    return out_dir / "report.md"


def dry_run(plan: Plan, out_dir: Path) -> None:
    check_plan(plan, out_dir)
    width = max(len(run.name) for run in plan.runs)
    for run in plan.runs:
        saved = epochs_saved(out_dir / run.name)
        after = f" (after {', '.join(run.after)})" if run.after else ""
        print(f"{run.name:<{width}}  {status_text(run, saved)}{after}")
        print(f"{'':<{width}}  {shlex.join(train_command(run, out_dir, resume=saved is not None))}")
    print(f"{len(plan.runs)} runs, {sum(r.epochs for r in plan.runs)} epochs in all; output in {out_dir}")


def experiment(plan_path: str, out_dir: str | None = None, jobs: int = 1, dry: bool = False,
               progress: bool = True, overrides: dict | None = None) -> int:
    """Run the plan, with the settings ``overrides`` (``--set``) in every run (``dry``: list its runs and
    their state); returns the exit status."""
    if jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {jobs}")
    folder = Path(out_dir if out_dir is not None else Path("runs") / Path(plan_path).stem).resolve()
    plan = read_plan(plan_path, folder, overrides)
    if dry:
        dry_run(plan, folder)
        return 0
    lock_fd = claim_out_dir(plan, folder)
    try:
        runner = Runner(plan, folder, jobs, lock_fd, progress)
        todo = len(plan.runs) - len(runner.done)
        runner.log(f"{plan.path}: {len(plan.runs)} runs in {folder}, {len(runner.done)} done, {todo} to run, "
                   f"{jobs} at a time")  # above the bar, which already stands
        runner.run()
        try:
            report_path = write_report(plan, folder)
            if report_path is not None:
                print(f"wrote {report_path}")
        except UserError as exc:  # the runs are done; a report that cannot be made must not hide that
            print(f"warning: no report: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        raise RunStopped("interrupted; every run keeps its last complete epoch: run the same command again to "
                         "finish the plan", exit_code=130) from None
    finally:
        os.close(lock_fd)
    if runner.failed:
        for name, why in runner.failed.items():
            print(f"error: run {name} {why} (log: {folder / LOGS / (name + '.log')})", file=sys.stderr)
        print(f"error: {len(runner.failed)} of {len(plan.runs)} runs did not finish; fix the cause and run the "
              "same command again", file=sys.stderr)
        return 1
    return 0
