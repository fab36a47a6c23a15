"""Peers side by side on worker threads compute exactly what one thread computes, in order."""

import copy

import pytest
import torch

from cifar_fixtures import make_cohort
from dml.data.augment import NORMALISATION, Normalise
from dml.data.batches import test_batches
from dml.peer_threads import SerialPeers, ThreadedPeers, flushes_denormals, peer_runner

CPU = torch.device("cpu")


@pytest.fixture
def one_thread():
    """The calling thread computes with one intra-op thread, as every worker does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cohort(num_nodes: int, precision: str, channels_last: bool, runner=None, update="simultaneous"):
    return make_cohort(num_nodes, num_classes=100, precision=precision, channels_last=channels_last, runner=runner,
                       update=update)


def _batches(n: int, channels_last: bool):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        x = torch.randn(16, 3, 32, 32, generator=g)
        out.append((x.contiguous(memory_format=torch.channels_last) if channels_last else x,
                    torch.randint(0, 100, (16,), generator=g)))
    return out


def _train(cohort, batches):
    return torch.stack([torch.stack(cohort.step(x, y).losses).detach() for x, y in batches])


def _state(peers):
    return [copy.deepcopy(p.model.state_dict()) for p in peers]


@pytest.mark.parametrize(("num_nodes", "precision", "channels_last"),
                         [(2, "fp32", False), (2, "bf16", True), (3, "bf16", True)])
def test_threaded_steps_are_bit_identical_to_one_thread(one_thread, num_nodes, precision, channels_last):
    """Three simultaneous steps; with 3 peers on 2 workers, worker 0 runs peers 0 and 2 in turn."""
    serial = _cohort(num_nodes, precision, channels_last)
    batches = _batches(3, channels_last)
    expected = _train(serial, batches)
    runner = ThreadedPeers(workers=2, threads_per_worker=1)
    try:
        threaded = _cohort(num_nodes, precision, channels_last, runner)
        got = _train(threaded, batches)
    finally:
        runner.close()
    assert torch.equal(got, expected)
    for a, b in zip(_state(threaded.peers), _state(serial.peers)):
        for key in b:
            assert torch.equal(a[key], b[key]), key


def test_threaded_sequential_forward_matches(one_thread):
    batches = _batches(2, False)
    expected = _train(_cohort(2, "fp32", False, update="sequential"), batches)
    runner = ThreadedPeers(workers=2, threads_per_worker=1)
    try:
        got = _train(_cohort(2, "fp32", False, runner, update="sequential"), batches)
    finally:
        runner.close()
    assert torch.equal(got, expected)


def test_threaded_evaluation_matches(one_thread):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (1200, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (1200,), generator=g)
    normalise = Normalise(*NORMALISATION["cifar100"], CPU, channels_last=True)
    serial = _cohort(3, "bf16", True)
    expected = serial.evaluate(test_batches(images, labels, 1000, normalise))
    runner = ThreadedPeers(workers=2, threads_per_worker=1)
    try:
        threaded = _cohort(3, "bf16", True, runner)
        got = threaded.evaluate(test_batches(images, labels, 1000, normalise))
    finally:
        runner.close()
    assert got == expected
    assert got.samples == 1200 and 0 <= min(got.top1) <= max(got.top5) <= 100
    assert all(p.model.training for p in threaded.peers)


def test_worker_and_caller_thread_settings():
    before = torch.get_num_threads()
    previous_flush = torch.set_flush_denormal(True)
    try:
        runner = ThreadedPeers(workers=2, threads_per_worker=1)
        try:
            seen = runner.map(lambda _: (torch.get_num_threads(), flushes_denormals()), range(4))
            assert seen == [(1, True)] * 4
            assert torch.get_num_threads() == 1  # the caller does no heavy work meanwhile
        finally:
            runner.close()
        assert torch.get_num_threads() == before
        runner.close()  # closing twice is harmless
        assert torch.get_num_threads() == before
    finally:
        torch.set_flush_denormal(False)
    del previous_flush


def test_worker_errors_reach_the_caller():
    runner = ThreadedPeers(workers=2, threads_per_worker=1)
    try:
        def fail_on_odd(k):
            if k % 2:
                raise ValueError(f"item {k}")
            return k

        with pytest.raises(ValueError, match="item 1"):
            runner.map(fail_on_odd, range(3))
        assert runner.map(lambda k: k * 10, range(3)) == [0, 10, 20]  # still usable
    finally:
        runner.close()


def test_when_peers_run_side_by_side():
    if torch.get_num_threads() < 2:
        pytest.skip("this machine gives PyTorch one thread: side by side is never chosen")
    runner = peer_runner(2, CPU)
    try:
        assert isinstance(runner, ThreadedPeers)
        assert runner.workers == 2
    finally:
        runner.close()
    before = torch.get_num_threads()
    for make in (lambda: peer_runner(1, CPU, threads=1), lambda: peer_runner(2, CPU, side_by_side=False, threads=1),
                 lambda: peer_runner(2, torch.device("meta"))):
        runner = make()  # one at a time: each gives back the count it found
        try:
            assert isinstance(runner, SerialPeers)
        finally:
            runner.close()
    assert torch.get_num_threads() == before
