"""`dml train --procs P`: P local processes through torch.distributed's own launcher (torchrun), which
restarts the whole group up to ``--max-restarts`` times when a process is lost.

Each process started here writes the line its failure ends with to a folder of the launcher's
(FAILURES_ENV) instead of printing an ``error:`` line itself: the launcher prints the line of the
process that failed first, once. A failure that repeats at every start is a bug or bad input, not a
lost process: its traceback is printed at the first start only, and the launcher's line says that it
repeated, with the restarts it used.
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


def launch_processes(
    procs: int, train_argv: list[str], after_failure: Callable[[], str] | None = None, max_restarts: int = 0
) -> int:
    """Run ``python -m dml <train_argv>`` in ``procs`` processes on this machine; 0 on success.

    ``after_failure()`` (what is left, looked at once the processes have ended) ends the one-line error
    when a process fails or a signal stops them. ``max_restarts``: how often a failed group starts again.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        [
            "--standalone",
            "--nproc-per-node",
            str(procs),
            "--max-restarts",
            str(max_restarts),
            "--module",
            "dml",
            *train_argv,
        ]
    )
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
            line = _failure_line(Path(failures), rank, procs, failure.exitcode, max_restarts)
            if line is None:  # the process said what it is: a user error, or a stop that names what is saved
                line = _read(Path(failures) / f"start{max_restarts}.rank{rank}")
            elif after_failure and failure.exitcode != 2:  # bad input: what is saved is not the question
                line += f"; {after_failure()}"
            print(line, file=sys.stderr)
            return 2 if failure.exitcode == 2 else 1
        except SignalException as exc:  # Ctrl-C or SIGTERM reached the launcher, which has stopped the processes
            left = f"; {after_failure()}" if after_failure else ""
            print(f"error: stopped by {signal.Signals(exc.sigval).name}{left}", file=sys.stderr)
            return 128 + exc.sigval
        finally:
            os.environ.clear()
            os.environ.update(saved_environment)
    return 0


def _failure_line(failures: Path, rank: int, procs: int, exit_code: int, max_restarts: int) -> str | None:
    """The launcher's last line for a group that failed at every start, process ``rank`` first, before
    what is saved; None where that process's own ``error:`` line says it all."""
    lines = [_read(failures / f"start{start}.rank{rank}") for start in range(max_restarts + 1)]
    last = lines[-1]
    if max_restarts and last is not None and all(line == last for line in lines):
        return (
            f"error: {last.removeprefix('error: ')} (process {rank} of {procs}, the same at all "
            f"{max_restarts + 1} starts: {_restarts(max_restarts)} used; restarting does not help a failure "
            "that repeats)"
        )
    if last is not None and last.startswith("error: "):
        return None
    after = f" after {_restarts(max_restarts)}" if max_restarts else ""
    return f"error: process {rank} of {procs} failed (exit code {exit_code}){after}"


def _restarts(count: int) -> str:
    return f"{count} restart{'s' if count > 1 else ''}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def error_line(exc: BaseException) -> str:
    """The one line that ends what a process prints for ``exc``: an ``error:`` line, or a traceback's last."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


def report_failure(line: str, printed: Callable[[], None] | None = None) -> None:
    """Say how this process failed: an ``error:`` line (``printed`` None), or ``printed()`` (a traceback).
    Under a launcher of ours (FAILURES_ENV) the line is kept for it: it prints an error line once for
    all its processes, and a traceback is printed here except at a restart that fails as the start
    before did."""
    folder = os.environ.get(FAILURES_ENV)
    if not folder:
        print(line, file=sys.stderr) if printed is None else printed()
        return
    start = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    rank = os.environ.get("RANK", "0")
    try:
        (Path(folder) / f"start{start}.rank{rank}").write_text(line)
    except OSError:  # the launcher has gone: say it here
        printed = printed or (lambda: print(line, file=sys.stderr))
    if printed is not None and (start == 0 or _read(Path(folder) / f"start{start - 1}.rank{rank}") != line):
        printed()
