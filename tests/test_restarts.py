"""Runs that go on by themselves: --resume auto, and a process group that torchrun restarts after a lost
process (--max-restarts), ending as the uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_data_parallel import BN_NET
from test_distributed import _children
from tiny_run import metrics, tiny_flags, train, train_command

TINY = tiny_flags("--precision", "fp32")
_train = partial(train, tiny=TINY)
ARGS = ["--models", "resnet20", "--epochs", "2"]
RUN = "independent_resnet20_s42"


def _weights(run_dir, peer):
    return torch.load(run_dir / peer / "last.pt", weights_only=True)["model"]


def _assert_same_weights(a, b, peers):
    for peer in peers:
        wa, wb = _weights(a, peer), _weights(b, peer)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), peer


@pytest.fixture(scope="module")
def straight(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    assert _train(cifar_root, out, *ARGS) == 0
    return out / RUN


def test_resume_auto_starts_a_new_run_and_continues_one_that_stopped(cifar_root, tmp_path, straight):
    assert _train(cifar_root, tmp_path, *ARGS, "--resume", "auto", "--stop-after", "1") == 0  # nothing there: starts
    run = tmp_path / RUN
    assert [r["epoch"] for r in metrics(run)] == [1, 1]
    assert _train(cifar_root, tmp_path, *ARGS, "--resume", "auto") == 0  # epoch 1 saved: continues
    assert metrics(run) == metrics(straight)
    _assert_same_weights(run, straight, ["0_resnet20"])


@pytest.mark.parametrize("left", ["config-only", "epoch-1-logged-not-saved"])
def test_resume_auto_starts_over_a_run_that_saved_no_epoch(cifar_root, tmp_path, straight, left):
    """What a process lost in epoch 1 leaves: config.json, and perhaps epoch 1's records without a checkpoint."""
    assert _train(cifar_root, tmp_path, *ARGS, "--stop-after", "1") == 0
    run = tmp_path / RUN
    (run / "0_resnet20" / "last.pt").unlink()
    (run / "0_resnet20" / "best.pt").unlink()
    if left == "config-only":
        (run / "metrics.jsonl").write_text("")
    assert _train(cifar_root, tmp_path, *ARGS, "--resume", "auto") == 0
    assert metrics(run) == metrics(straight)
    _assert_same_weights(run, straight, ["0_resnet20"])


def test_resume_auto_refuses_a_run_of_another_configuration(cifar_root, tmp_path, capsys):
    assert _train(cifar_root, tmp_path, *ARGS, "--stop-after", "1") == 0
    run = tmp_path / RUN
    before = {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "0_resnet20" / "last.pt")}
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, *ARGS, "--lr", "0.05", "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume with a configuration that differs") and "lr: 0.1 -> 0.05" in err
    assert err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in (run / "metrics.jsonl", run / "0_resnet20" / "last.pt")} == before


# --- the process group restarted by its launcher -----------------------------------------------------

BROKEN_NET = """
from torch import nn


class Broken(nn.Linear):
    def forward(self, x):
        raise RuntimeError("this network cannot compute")


def net(num_classes):
    return Broken(3, num_classes)
"""


def _env(tmp_path):
    (tmp_path / "bn_net.py").write_text(BN_NET)
    (tmp_path / "broken_net.py").write_text(BROKEN_NET)
    return {**os.environ, "OMP_NUM_THREADS": "1", "DML_MEASURE_THREADS": "0",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def _command(cifar_root, out, *args):
    return train_command(cifar_root, out, "--num-nodes", "2", "--epochs", "3", "--plain", "--precision", "fp32",
                         *args, tiny=tiny_flags(train=4096))


def _steps(event_dir, tag):
    events = EventAccumulator(str(event_dir))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.mark.processes
@pytest.mark.parametrize("layout", [["--procs", "2"], ["--procs", "4", "--data-parallel", "2"]],
                         ids=["peers-over-2-processes", "2-peers-x-2-replicas"])
def test_a_process_killed_in_epoch_2_restarts_the_group_and_the_run_ends_as_if_uninterrupted(
        cifar_root, tmp_path, layout):
    env = _env(tmp_path)
    net = ["--models", "bn_net:small", *layout]
    done = subprocess.run(_command(cifar_root, tmp_path / "straight", *net), capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    killed = subprocess.Popen(_command(cifar_root, tmp_path / "killed", *net, "--max-restarts", "1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    run = tmp_path / "killed" / "dml_n2_bn_net-small_s42"
    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 3):
        assert killed.poll() is None and time.monotonic() < deadline, "the run never finished epoch 1"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2 (an epoch takes seconds)
    workers = _children(killed.pid)
    assert len(workers) == int(layout[1]), workers
    os.kill(workers[-1], signal.SIGKILL)
    out, err = killed.communicate(timeout=300)
    assert killed.returncode == 0, err

    records = metrics(run)
    restarts = [r for r in records if r["node"] == "restart"]
    assert restarts == [{"epoch": 1, "node": "restart", "restart": 1, "max_restarts": 1, "repeats_epoch": 2}]
    assert "restart 1 of 1 after a lost process: epoch 1 is saved, epoch 2 runs again" in out
    straight = tmp_path / "straight" / "dml_n2_bn_net-small_s42"
    assert [r for r in records if r["node"] != "restart"] == metrics(straight)
    _assert_same_weights(run, straight, ["0_bn_net-small", "1_bn_net-small"])
    for folder, tag in (("0_bn_net-small", "train_loss"), ("1_bn_net-small", "test_acc"), ("ensemble", "test_acc")):
        assert _steps(run / folder, tag) == [1, 2, 3], folder  # epoch 2 once, though it ran twice


@pytest.mark.processes
def test_a_failure_that_repeats_at_every_start_is_said_once(cifar_root, tmp_path):
    done = subprocess.run(_command(cifar_root, tmp_path, "--models", "broken_net:net", "--procs", "2",
                                   "--max-restarts", "1"),
                          capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    # each process's traceback from the first start, none from the restart that failed the same way
    assert done.stderr.count("Traceback (most recent call last)") == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: RuntimeError: this network cannot compute (process ")
    assert "the same at all 2 starts: 1 restart used; restarting does not help a failure that repeats" in last
    assert last.endswith("nothing was saved; run the same command again")


@pytest.mark.processes
def test_max_restarts_checks_the_run_directory_before_starting_processes(cifar_root, tmp_path):
    env = _env(tmp_path)
    args = ["--models", "bn_net:small", "--procs", "2", "--max-restarts", "1", "--epochs", "1"]
    first = subprocess.run(_command(cifar_root, tmp_path, *args), capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(_command(cifar_root, tmp_path, *args), capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and again.stderr.count("\n") == 1  # said once, by the launcher
    assert "already holds a run; pass --resume to continue it" in again.stderr
    assert json.loads((tmp_path / "dml_n2_bn_net-small_s42" / "config.json").read_text())["config"]["epochs"] == 1


@pytest.mark.processes
@pytest.mark.parametrize("restarts", ["0", "1"])
def test_bad_input_found_by_every_process_is_one_line(tmp_path, restarts):
    done = subprocess.run(
        [sys.executable, "-m", "dml", "train", "--data-dir", str(tmp_path / "nodata"), "--no-download", "--num-nodes",
         "2", "--out-dir", str(tmp_path / "runs"), "--procs", "2", "--max-restarts", restarts],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: CIFAR-100 not found under "), done.stderr
    assert errors[0].endswith("restarting does not help a failure that repeats)") == (restarts == "1")
