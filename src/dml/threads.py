"""How many threads one peer computes with on a CPU, decided once when a cohort starts.

A peer's operations are split over a team of OpenMP threads, and every operation ends at a barrier
that waits for the slowest thread. When other programs keep the cores busy, one of the team is
often descheduled, and every barrier waits for its next time slice: with two busy processes beside
it on 2 cores, one ResNet-20 trained at 176 images/s with 2 threads against 270 with one thread,
while on the idle machine 2 threads gave 852 against 509 (``dml bench``, bf16). Spinning is not the
cause: ``OMP_WAIT_POLICY=PASSIVE`` made the busy case slower still (48 images/s).

So the team size is measured, not assumed: a few small convolutions, the kind of work a CIFAR
network's step is made of, are timed with each candidate team size, alternately, and the fastest
wins (a larger team only when it is clearly faster). The count changes the order of floating-point
sums, so it is decided once per run and recorded (config.json), never changed while training.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

# A larger team must beat a smaller one by this factor: on an idle machine 2 threads run the probe
# about 1.7x faster than one; beside busy processes they run it many times slower.
CLEAR_GAIN = 1.15
PROBE_ROUNDS = 12


MEASURE_ENV = "DML_MEASURE_THREADS"  # "0": every peer takes its share of the cores, unmeasured


def environment_fixes_threads() -> bool:
    """Whether the environment fixes the thread count (then it is not measured): OMP_NUM_THREADS, or
    DML_MEASURE_THREADS=0 for numbers that must not depend on the machine's load (the test suite sets it)."""
    return bool(os.environ.get("OMP_NUM_THREADS")) or os.environ.get(MEASURE_ENV) == "0"


def candidate_counts(most: int) -> list[int]:
    """Team sizes worth probing: ``most``, then halving down to 1."""
    counts = []
    while most >= 1:
        counts.append(most)
        most //= 2
    return sorted(set(counts))


def _probe_work(threads: int, x: torch.Tensor, weight: torch.Tensor) -> float:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    torch.nn.functional.conv2d(x, weight, padding=1)
    return time.perf_counter() - started


def fastest_thread_count(most: int) -> int:
    """The team size, of at most ``most`` threads, that computes small convolutions fastest now.

    The work is a 3x3 convolution of a ResNet's first stage (batch 64, 16 channels, 32x32): on an
    idle 2-core machine 4.3 ms with one thread, 2.5 ms with two; beside busy processes about 30 ms
    with two (each barrier waits for a time slice). The probe costs about 0.1 s on an idle machine.
    Torch's thread count is restored afterwards.
    """
    counts = candidate_counts(most)
    if len(counts) == 1:
        return counts[0]
    before = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, 32, 32, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 16, 3, 3, generator=generator)
    times: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for n in counts:
            _probe_work(n, x, weight)  # warm the team up: its threads start at first use
        for _ in range(PROBE_ROUNDS):
            for n in counts:  # alternately, so that a passing burst of load hits every candidate
                times[n].append(_probe_work(n, x, weight))
    finally:
        torch.set_num_threads(before)
    return fastest(times)


def fastest(times: dict[int, list[float]]) -> int:
    """The team size whose mean time is lowest, a larger team only where it beats every smaller one
    chosen so far by CLEAR_GAIN (``times``: seconds of the same work per team size).

    The mean, not the median: what training loses is the total, and beside busy processes a few
    rounds that wait a whole time slice make most of it. Over 12 measurements on 2 cores beside two
    busy processes, the median chose 2 threads 2 to 3 times, the mean once; idle, both chose 2 every time.
    """
    counts = sorted(times)
    best = counts[0]
    for n in counts[1:]:
        if statistics.fmean(times[n]) * CLEAR_GAIN < statistics.fmean(times[best]):
            best = n
    return best
