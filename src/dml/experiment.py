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

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import RunStopped, UserError
from .orchestrate import (
    LOGS,
    POLL_SECONDS,
    check_plan,
    child_env,
    claim_out_dir,
    epochs_logged,
    epochs_saved,
    is_finished,
    last_line,
    signals_to,
    start_run,
    stopped_by,
    train_command,
)
from .plan import Plan, PlannedRun, read_plan


# --- the state of a run ------------------------------------------------------------------------------
def status_text(run: PlannedRun, saved: int | None) -> str:
    if saved is None:
        return "new"
    if saved == 0:  # started, but stopped before its first epoch was saved
        return f"interrupted in epoch 1 of {run.epochs}"
    return "done" if is_finished(run, saved) else f"interrupted after epoch {saved} of {run.epochs}"


# --- running ----------------------------------------------------------------------------------------


@dataclass
class Child:
    run: PlannedRun
    process: subprocess.Popen
    started: float
    slot: int  # which of the --jobs places (and GPU, where there are several) it has
    shown_epoch: int = 0  # the last epoch a progress line was printed for


def _format_duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{seconds:.0f}s"
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes:02d}m" if hours else f"{minutes}m"


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
        self.bar = tqdm(
            total=self.total_epochs,
            initial=self.start_epochs,
            unit="epoch",
            desc="plan",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} epochs [{elapsed}{postfix}]",
            disable=None if progress else True,
            dynamic_ncols=True,
            leave=False,
        )
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
        logged = {}
        for name in self.running:
            try:
                logged[name] = epochs_logged(self.out_dir / name)
            except UserError:  # a damaged metrics.jsonl: its run's dml train or the report says what is wrong
                logged[name] = 0
        return logged

    def _start(self, run: PlannedRun, slot: int) -> None:
        saved = self.saved[run.name]
        process = start_run(run, self.out_dir, saved is not None, self.lock_fd, child_env(slot, self.jobs))
        log_path = self.out_dir / LOGS / f"{run.name}.log"
        self.running[run.name] = Child(run, process, time.monotonic(), slot, saved or 0)
        if self.stop_signal is not None:  # a signal that came while it started
            process.send_signal(signal.SIGTERM)
        how = (
            "starts"
            if saved is None
            else "starts again (no epoch was saved)"
            if saved == 0
            else f"resumes after epoch {saved}"
        )
        self.log(f"[{len(self.done)}/{len(self.plan.runs)} done] {run.name} {how} (log: {log_path})")

    def _finish(self, child: Child, code: int) -> None:
        run = child.run
        del self.running[run.name]
        self.saved[run.name] = epochs_saved(self.out_dir / run.name)
        if code == 0 and is_finished(run, self.saved[run.name]):
            self.done.add(run.name)
            took = _format_duration(time.monotonic() - child.started)
            self.log(
                f"[{len(self.done)}/{len(self.plan.runs)} done] {run.name} finished in {took}; "
                f"{self.eta(self.trained(self._logged())[1])}"
            )
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
                    self.log(
                        f"[{len(self.done)}/{len(self.plan.runs)} done] {name} epoch {epoch}/{child.run.epochs}; "
                        f"{self.eta(peer_epochs)}"
                    )
            return
        self.bar.n = epochs
        parts = [f"runs {len(self.done)}/{len(self.plan.runs)} done"]
        parts += [
            f"{name} epoch {min(logged[name] + 1, c.run.epochs)}/{c.run.epochs}" for name, c in self.running.items()
        ]
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

    # sorted as `dml report OUT_DIR` finds them, so that both print the same tables
    started = sorted(out_dir / run.name for run in plan.runs if epochs_logged(out_dir / run.name) > 0)
    # finished baseline runs only: an interrupted seed would not be comparable with the others
    baseline = sorted(out_dir / r.name for r in plan.baseline_runs() if is_finished(r, epochs_saved(out_dir / r.name)))
    if not started:
        return None
    report(
        started, baseline=baseline or None, out=out_dir / "report.md", plots=out_dir / "plots", published=plan.published
    )
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


def experiment(
    plan_path: str,
    out_dir: str | None = None,
    jobs: int = 1,
    dry: bool = False,
    progress: bool = True,
    overrides: dict | None = None,
) -> int:
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
        runner.log(
            f"{plan.path}: {len(plan.runs)} runs in {folder}, {len(runner.done)} done, {todo} to run, {jobs} at a time"
        )  # above the bar, which already stands
        runner.run()
        try:
            report_path = write_report(plan, folder)
            if report_path is not None:
                print(f"wrote {report_path}")
        except UserError as exc:  # the runs are done; a report that cannot be made must not hide that
            print(f"warning: no report: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        raise RunStopped(
            "interrupted; every run keeps its last complete epoch: run the same command again to finish the plan",
            exit_code=130,
        ) from None
    finally:
        os.close(lock_fd)
    if runner.failed:
        for name, why in runner.failed.items():
            print(f"error: run {name} {why} (log: {folder / LOGS / (name + '.log')})", file=sys.stderr)
        print(
            f"error: {len(runner.failed)} of {len(plan.runs)} runs did not finish; fix the cause and run the "
            "same command again",
            file=sys.stderr,
        )
        return 1
    return 0
