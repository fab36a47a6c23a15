"""`dml train --procs P`: P local processes through torch.distributed's own launcher (torchrun), which
restarts the whole group up to ``--max-restarts`` times when a process is lost.

A failure that repeats at every start is a bug or bad input, not a lost process: each process started
here writes the line its failure ends with to a folder of the launcher's (FAILURES_ENV), prints it only
where it differs from the previous start's, and the launcher's last line says it once, with the
restarts it used.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

FAILURES_ENV = "DML_FAILURES_DIR"  # where each start of each process writes the line it failed with


def launch_processes(procs: int, train_argv: list[str], after_failure: Callable[[], str] | None = None,
                     max_restarts: int = 0) -> int:
    """Run ``python -m dml <train_argv>`` in ``procs`` processes on this machine; 0 on success.

    ``after_failure()`` (what is left, looked at once the processes have ended) ends the one-line error
    when a process fails or a signal stops them. ``max_restarts``: how often a failed group starts again.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(procs), "--max-restarts",
                                         str(max_restarts), "--module", "dml", *train_argv])
    # Each process takes its share of the cores (the engine sets it too; this silences torchrun's
    # warning and covers libraries that read the variable at import). The launcher passes its own
    # environment to the children and also edits it: restore it, so that this process and anything
    # it starts later keep theirs.
    saved_environment = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    with tempfile.TemporaryDirectory(prefix="dml-failures-") as failures:
        os.environ[FAILURES_ENV] = failures
        try:
            run(args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            left = f"; {after_failure()}" if after_failure else ""
            repeated = _same_failure_every_start(Path(failures), rank, max_restarts)
            if repeated is not None:
                status = 2 if failure.exitcode == 2 else 1
                print(f"error: {repeated.removeprefix('error: ')} (process {rank} of {procs}, the same at all "
                      f"{max_restarts + 1} starts: {max_restarts} restart{'s' if max_restarts > 1 else ''} used; "
                      f"restarting does not help a failure that repeats){left}", file=sys.stderr)
                return status
            if failure.exitcode == 2 and not max_restarts:  # a user error: the process has said what it is
                return 2
            restarts = f" after {max_restarts} restart{'s' if max_restarts > 1 else ''}" if max_restarts else ""
            print(f"error: process {rank} of {procs} failed (exit code {failure.exitcode}){restarts}{left}",
                  file=sys.stderr)
            return 1
        except SignalException as exc:  # Ctrl-C or SIGTERM reached the launcher, which has stopped the processes
            left = f"; {after_failure()}" if after_failure else ""
            print(f"error: stopped by {signal.Signals(exc.sigval).name}{left}", file=sys.stderr)
            return 128 + exc.sigval
        finally:
            os.environ.clear()
            os.environ.update(saved_environment)
    return 0


def _same_failure_every_start(failures: Path, rank: int, max_restarts: int) -> str | None:
    """The line process ``rank`` failed with, where it failed with that same line at every start and there
    were restarts; None otherwise."""
    if not max_restarts:
        return None
    lines = {_read(failures / f"start{start}.rank{rank}") for start in range(max_restarts + 1)}
    return next(iter(lines)) if len(lines) == 1 and None not in lines else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def error_line(exc: BaseException) -> str:
    """The one line that ends what a process prints for ``exc``: an ``error:`` line, or a traceback's last."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def report_failure(line: str, printed: Callable[[], None]) -> None:
    """Say how this process failed: ``printed()`` prints it (the error line or the traceback), except at a
    restart that fails exactly as the start before did (the launcher then says it once). Under a launcher
    of ours (FAILURES_ENV), the line is kept for it."""
    folder = os.environ.get(FAILURES_ENV)
    if not folder:
        printed()
        return
    start = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    rank = os.environ.get("RANK", "0")
    try:
        (Path(folder) / f"start{start}.rank{rank}").write_text(line)
    except OSError:
        pass  # the launcher has gone: print as usual
    if start == 0 or _read(Path(folder) / f"start{start - 1}.rank{rank}") != line:
        printed()
