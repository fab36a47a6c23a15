"""Functions run as the ranks of a torch.distributed job on 127.0.0.1: spawned processes, gloo."""

import os
import queue
import socket
import time

import torch.multiprocessing as mp


def run_ranks(world: int, target, *args, timeout: float = 180) -> dict:
    """``target(*args)`` in ``world`` spawned processes, each with the torch.distributed environment of
    its rank; rank -> what it returned. Return values that pickle by value: a tensor would be shared
    memory of a process that has ended (numpy arrays, numbers and lists travel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_as_rank, args=(rank, world, port, results, target, args)) for rank in range(world)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout
    while len(got) < world:
        try:
            rank, value = results.get(timeout=1)
            got[rank] = value
        except queue.Empty:
            failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:  # a rank that raised: the others would wait for it
                for p in procs:
                    p.kill()
                raise RuntimeError(f"ranks that failed (rank, exit code): {failed}" if failed else
                                   f"no answer from every rank within {timeout} s") from None
    for p in procs:
        p.join(timeout=30)
    return got


def _as_rank(rank, world, port, results, target, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    results.put((rank, target(*args)))
