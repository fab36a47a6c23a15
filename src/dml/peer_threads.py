"""Running this process's peers side by side: one worker thread per peer (or group of peers).

On a CPU, one peer's small convolutions keep few cores busy: splitting every operation over all
cores costs a synchronisation per operation. Giving each peer its own thread with its own share
of the cores (PyTorch releases the GIL inside operations) trained 2 and 4 x ResNet-32 cohorts on
2 cores 4 to 11 % faster than one thread driving the peers over both cores.

Peer k always runs on worker k mod W, and a worker runs its peers in order, so the result does
not depend on thread timing. The models must not draw random numbers while they run (no
dropout): the global generator would be shared by the workers in an unpredictable order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from .threads import environment_fixes_threads, fastest_thread_count

T = TypeVar("T")
R = TypeVar("R")


class SerialPeers:
    """Every peer in turn on the calling thread, with ``threads`` intra-op threads until ``close``
    (None: torch's count as it is)."""

    workers = 1
    share, measured = 1, False  # the most threads a peer may take; whether the count was measured

    def __init__(self, threads: int | None = None):
        self._caller_threads = torch.get_num_threads()
        self.set_threads(threads or self._caller_threads)

    def set_threads(self, threads: int) -> None:
        self.threads_per_worker = threads
        torch.set_num_threads(threads)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(item) for item in items]

    def close(self) -> None:
        torch.set_num_threads(self._caller_threads)


class ThreadedPeers:
    """Item k of every ``map`` on worker k mod ``workers``; each worker computes with
    ``threads_per_worker`` intra-op threads and the caller's denormal setting.

    Until ``close``, the calling thread computes with one thread: its own batch preparation is
    small, and an idle team of its threads would spin on the cores the workers use (that took
    the whole gain).
    """

    share, measured = 1, False

    def __init__(self, workers: int, threads_per_worker: int):
        self._caller_threads = torch.get_num_threads()
        flush_denormal = flushes_denormals()
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self._pools = [
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"dml-peer-{w}",
                initializer=_init_worker,
                initargs=(threads_per_worker, flush_denormal),
            )
            for w in range(workers)
        ]
        for pool in self._pools:
            pool.submit(lambda: None).result()  # start the thread now, so its settings are in place
        torch.set_num_threads(1)
        self._seen: set = set()

    def set_threads(self, threads: int) -> None:
        """Every worker computes with ``threads`` intra-op threads from its next task on."""
        for pool in self._pools:
            pool.submit(torch.set_num_threads, threads).result()
        self.threads_per_worker = threads

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        code = _code_of(fn)
        if code not in self._seen:
            # The first run of each function goes one peer at a time (each on its own worker): when
            # two workers ran their first loss computation at once, one of them computed a slightly
            # different loss in about 1 run in 25 (measured on 2 x resnet20, 60 and 80 fresh runs),
            # so the same command did not always give the same result. Later calls run side by side.
            self._seen.add(code)
            return [self._pools[k % self.workers].submit(fn, item).result() for k, item in enumerate(items)]
        futures = [self._pools[k % self.workers].submit(fn, item) for k, item in enumerate(items)]
        return [f.result() for f in futures]

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        if self._pools:
            self._pools = []
            torch.set_num_threads(self._caller_threads)


def _code_of(fn: Callable) -> object:
    """What identifies a function across calls: its code (closures and partials are new objects each step)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__code__", fn)


def _init_worker(threads: int, flush_denormal: bool) -> None:
    torch.get_num_threads()  # a thread takes the process default at its first use: take it now, then override
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)  # a per-thread CPU flag


def flushes_denormals() -> bool:
    """Whether the calling thread flushes denormal floats to zero (torch.set_flush_denormal)."""
    return (torch.tensor([1e-39]) * 2.0).item() == 0.0


def peer_runner(
    num_peers: int, device: torch.device, side_by_side: bool = True, threads: int | None = None
) -> SerialPeers | ThreadedPeers:
    """Threads for two or more peers side by side on a CPU with two or more threads; the calling
    thread otherwise.

    The cores are shared out among min(peers, cores) workers. Each worker computes with ``threads``
    intra-op threads; None: its share of the cores, or fewer where other programs keep them busy
    (measured once here, see threads.py; not where OMP_NUM_THREADS fixes the count). On a GPU the
    peers' kernels queue on one device and threads gain nothing.
    """
    cores = torch.get_num_threads()
    if device.type != "cpu":
        return SerialPeers(threads)
    workers = min(num_peers, cores) if side_by_side and num_peers >= 2 and cores >= 2 else 1
    share = max(1, cores // workers)
    measured = threads is None and share > 1 and not environment_fixes_threads()
    if threads is None:
        threads = fastest_thread_count(share) if measured else share
    runner = SerialPeers(threads) if workers == 1 else ThreadedPeers(workers, threads)
    runner.share, runner.measured = share, measured  # what Runtime.rethink_threads measures again
    return runner
