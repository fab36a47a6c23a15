"""`dml train --procs P`: P local processes through torch.distributed's own launcher (torchrun)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable


def launch_processes(procs: int, train_argv: list[str], after_failure: Callable[[], str] | None = None) -> int:
    """Run ``python -m dml <train_argv>`` in ``procs`` processes on this machine; 0 on success.

    ``after_failure()`` (what is left, looked at once the processes have ended) ends the one-line error
    when a process fails or a signal stops them.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(procs), "--module", "dml", *train_argv]
    )
    # Each process takes its share of the cores (the engine sets it too; this silences torchrun's
    # warning and covers libraries that read the variable at import). The launcher passes its own
    # environment to the children and also edits it: restore it, so that this process and anything
    # it starts later keep theirs.
    saved_environment = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = next(iter(sorted(exc.failures.items())))
        if failure.exitcode == 2:  # a user error: the process has said what it is
            return 2
        left = f"; {after_failure()}" if after_failure else ""
        print(f"error: process {rank} of {procs} failed (exit code {failure.exitcode}){left}", file=sys.stderr)
        return 1
    except SignalException as exc:  # Ctrl-C or SIGTERM reached the launcher, which has stopped the processes
        left = f"; {after_failure()}" if after_failure else ""
        print(f"error: stopped by {signal.Signals(exc.sigval).name}{left}", file=sys.stderr)
        return 128 + exc.sigval
    finally:
        os.environ.clear()
        os.environ.update(saved_environment)
    return 0
