"""Peers spread over processes with torch.distributed (gloo on CPU), against single-process runs."""

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dml.distributed import TorchExchange, peers_of_rank
from ranks import run_ranks  # the tests folder is on sys.path
from tiny_run import metrics as _metrics
from tiny_run import tiny_flags, train_command

pytestmark = pytest.mark.processes  # every test here starts processes (gloo groups, torchrun)

TINY = tiny_flags("--precision", "fp32")


def _dml(cifar_root, out_dir, *args, launcher=(), threads=None, **kwargs):
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = train_command(cifar_root, out_dir, *args, tiny=TINY, launcher=launcher)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def _assert_same_parameters(run_a, run_b, peers):
    for peer in peers:
        a = torch.load(run_a / peer / "last.pt", weights_only=True)["model"]
        b = torch.load(run_b / peer / "last.pt", weights_only=True)["model"]
        for key in a:
            assert torch.equal(a[key], b[key]), (peer, key)


def test_peers_are_split_in_contiguous_groups():
    assert [peers_of_rank(4, 2, r) for r in range(2)] == [[0, 1], [2, 3]]
    assert [peers_of_rank(3, 2, r) for r in range(2)] == [[0, 1], [2]]
    assert [peers_of_rank(5, 3, r) for r in range(3)] == [[0, 1], [2, 3], [4]]
    assert [peers_of_rank(2, 2, r) for r in range(2)] == [[0], [1]]
    # a temporal mean (index -> its source) lives with its source: the cohort order is not the ranks' order
    assert [peers_of_rank(4, 2, r, {2: 0, 3: 1}) for r in range(2)] == [[0, 2], [1, 3]]
    assert [peers_of_rank(5, 2, r, {4: 0}) for r in range(2)] == [[0, 1, 4], [2, 3]]


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
def test_two_processes_match_one_process(cifar_root, tmp_path, update):
    # With the same thread count per peer, the CPU kernels and hence every number are identical.
    args = ["--models", "resnet20", "--num-nodes", "2", "--epochs", "2", "--update", update]
    spread = _dml(cifar_root, tmp_path / "spread", *args, "--procs", "2", "--check-batches")
    assert spread.returncode == 0, spread.stderr
    single = _dml(cifar_root, tmp_path / "single", *args, threads=1)
    assert single.returncode == 0, single.stderr
    a, b = tmp_path / "spread" / "dml_n2_resnet20_s42", tmp_path / "single" / "dml_n2_resnet20_s42"
    assert _metrics(a) == _metrics(b)
    _assert_same_parameters(a, b, ["0_resnet20", "1_resnet20"])
    assert json.loads((a / "config.json").read_text())["config"]["num_nodes"] == 2


def test_uneven_peers_under_torchrun_and_resume_with_another_process_count(cifar_root, tmp_path):
    args = ["--models", "resnet20", "--num-nodes", "3", "--epochs", "2"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    first = _dml(cifar_root, tmp_path / "resumed", *args, "--stop-after", "1", launcher=torchrun)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "resumed" / "dml_n3_resnet20_s42"
    assert {r["epoch"] for r in _metrics(run)} == {1}
    second = _dml(cifar_root, tmp_path / "resumed", *args, "--resume", threads=1)  # one process now
    assert second.returncode == 0, second.stderr
    straight = _dml(cifar_root, tmp_path / "straight", *args, threads=1)
    assert straight.returncode == 0, straight.stderr
    reference = tmp_path / "straight" / "dml_n3_resnet20_s42"
    assert _metrics(run) == _metrics(reference)
    _assert_same_parameters(run, reference, ["0_resnet20", "1_resnet20", "2_resnet20"])


def _children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_killed_process_stops_the_others_and_the_run_resumes(cifar_root, tmp_path):
    args = ["--models", "resnet20", "--num-nodes", "2", "--epochs", "4", "--train-samples", "1024"]
    cmd = [sys.executable, "-m", "dml", "train", "--data-dir", str(cifar_root), "--out-dir", str(tmp_path), *TINY,
           *args, "--procs", "2", "--max-restarts", "0"]  # 0, the default: a lost process stops the run
    # The survivor would wait this long in a collective: ending well before it shows the launcher stopped it.
    environment = {**os.environ, "DML_DIST_TIMEOUT": "3600"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    metrics = tmp_path / "dml_n2_resnet20_s42" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "the run never finished epoch 1"
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "error: process" in stderr and "--resume" in stderr
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    records = _metrics(tmp_path / "dml_n2_resnet20_s42")
    assert [(r["epoch"], r["node"]) for r in records] == [(e, n) for e in range(1, 5) for n in (0, 1, "ensemble")]


def _fingerprints():
    exchange = TorchExchange(2, "cpu")
    try:
        exchange.check_same(torch.tensor(1.0), "the same batch")
        try:
            exchange.check_same(torch.tensor(float(exchange.rank)), "a different batch")
            return "no error"
        except RuntimeError as exc:
            return str(exc)
    finally:
        exchange.close()


def test_batch_fingerprint_mismatch_fails_loudly():
    outcome = run_ranks(2, _fingerprints)
    assert set(outcome) == {0, 1}
    for message in outcome.values():
        assert "processes disagree on a different batch" in message


def test_more_processes_than_peers_is_a_user_error(cifar_root, tmp_path):
    proc = _dml(cifar_root, tmp_path, "--num-nodes", "2", "--procs", "3")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --procs must be between 1 and --num-nodes (2)")
    assert not dist.is_initialized()


def _catches_sigterm(pid):
    """Whether the process has a SIGTERM handler: dml train sets one as its first epoch starts."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    except OSError:
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def test_a_signal_to_the_launcher_in_the_first_epoch_says_nothing_was_saved(cifar_root, tmp_path):
    cmd = [sys.executable, "-m", "dml", "train", "--data-dir", str(cifar_root), "--out-dir", str(tmp_path), *TINY,
           "--models", "resnet20", "--num-nodes", "2", "--epochs", "1", "--procs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((workers := _children(proc.pid)) and len(workers) == 2 and all(map(_catches_sigterm, workers))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # a scheduler's time limit: to the launcher, which stops the processes
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM; nothing was saved; run the same command again"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert [(r["epoch"], r["node"]) for r in _metrics(tmp_path / "dml_n2_resnet20_s42")] == [
        (1, 0), (1, 1), (1, "ensemble")]



def _collective_nobody_joins(timeout, done):
    """Rank 0 waits in an all_reduce that rank 1 never joins (alive and idle until rank 0 has written ``done``);
    returns how the wait ended and when."""
    os.environ["DML_DIST_TIMEOUT"] = str(timeout)
    exchange = TorchExchange(2, "cpu")
    if exchange.rank == 1:
        deadline = time.monotonic() + 150
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.2)
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        outcome = "returned"
    except Exception as exc:  # torch raises its DistError (gloo: a RuntimeError naming the timeout)
        outcome = type(exc).__name__
    waited = time.monotonic() - start
    Path(done).touch()
    return outcome, waited


@pytest.mark.processes
def test_dml_dist_timeout_bounds_the_wait_for_a_process_that_never_answers(tmp_path):
    """A collective no other process joins fails after DML_DIST_TIMEOUT seconds (3 here), not the default 60:
    what lets the survivors of a lost process stop and the launcher restart them."""
    got = run_ranks(2, _collective_nobody_joins, 3, str(tmp_path / "done"), timeout=200)
    outcome, waited = got[0]
    assert outcome != "returned" and 3 <= waited < 60, got[0]


def _max_over_replicas():
    from dml.distributed import make_exchange

    exchange = make_exchange(1, "cpu", None, data_parallel=2)
    try:
        mine = torch.tensor([5, 0, 2]) if exchange.replica == 0 else torch.tensor([1, 7, 2])
        return exchange.max_over_replicas(mine).tolist()
    finally:
        exchange.close()


@pytest.mark.processes
def test_max_over_replicas_is_elementwise_over_a_peers_replicas():
    """The first step at which a replica diverged, as every replica reads it (0: none)."""
    assert run_ranks(2, _max_over_replicas) == {0: [5, 7, 2], 1: [5, 7, 2]}


def _group_left_at_close():
    exchange = TorchExchange(2, "cpu")
    group = weakref.ref(dist.group.WORLD)
    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # what a run builds after joining
    exchange.close()
    gc.collect()
    return group() is None


def test_closing_the_exchange_frees_the_process_group_while_both_processes_are_there():
    """A group that outlives close() is torn down as the interpreter ends, where gloo's threads can abort
    a process that had finished (exit code -6 after the work was done)."""
    assert run_ranks(2, _group_left_at_close) == {0: True, 1: True}
