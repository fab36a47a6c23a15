"""Long runs survive signals, kill -9, divergence and write failures; bad files get clear errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dml.engine
import dml.step
import dml.runlog
from dml.cli import main

TINY = ["--train-samples", "512", "--test-samples", "100", "--batch-size", "32", "--skip-checksum",
        "--no-download", "--no-progress", "--models", "resnet20", "--num-nodes", "2"]
RUN = "dml_n2_resnet20_s42"


def _cmd(cifar_root, out_dir, *args):
    return [sys.executable, "-m", "dml", "train", "--data-dir", str(cifar_root), "--out-dir", str(out_dir),
            *TINY, *args]


def _metrics(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    return records


def _assert_same_run(a, b):
    assert _metrics(a) == _metrics(b)
    for peer in ("0_resnet20", "1_resnet20"):
        sa = torch.load(a / peer / "last.pt", weights_only=True)["model"]
        sb = torch.load(b / peer / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), peer


@pytest.fixture(scope="module")
def straight_run(cifar_root, tmp_path_factory):
    """The uninterrupted 3-epoch run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(_cmd(cifar_root, out, "--epochs", "3"), check=True, capture_output=True)
    return out / RUN


def _wait_for_lines(proc, metrics, lines, timeout=120):
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= lines):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.processes
@pytest.mark.parametrize("lines", [3, 6], ids=["killed-in-epoch-2", "killed-in-epoch-3"])
def test_kill_9_at_any_moment_then_resume_equals_the_uninterrupted_run(cifar_root, tmp_path, straight_run, lines):
    proc = subprocess.Popen(_cmd(cifar_root, tmp_path, "--epochs", "3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    # The epoch's metrics are written before its checkpoints: killing now may land before, during
    # or after the commit of that epoch, and each case must resume correctly.
    _wait_for_lines(proc, tmp_path / RUN / "metrics.jsonl", lines)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    resumed = subprocess.run(_cmd(cifar_root, tmp_path, "--epochs", "3", "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(tmp_path / RUN, straight_run)


@pytest.mark.processes
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_with_a_resumable_checkpoint(cifar_root, tmp_path, straight_run, sig, code):
    proc = subprocess.Popen(_cmd(cifar_root, tmp_path, "--epochs", "3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_lines(proc, tmp_path / RUN / "metrics.jsonl", 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err.startswith(f"error: stopped by {signal.Signals(sig).name}") and "--resume" in err, err
    assert err.count("\n") == 1
    resumed = subprocess.run(_cmd(cifar_root, tmp_path, "--epochs", "3", "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(tmp_path / RUN, straight_run)


def _train(cifar_root, out, *args):
    return main(["train", "--data-dir", str(cifar_root), "--out-dir", str(out), *TINY, *args])


def test_divergence_names_peer_and_step_and_keeps_the_last_good_checkpoint(cifar_root, tmp_path, monkeypatch, capsys):
    assert _train(cifar_root, tmp_path, "--epochs", "3", "--stop-after", "1") == 0
    last = tmp_path / RUN / "1_resnet20" / "last.pt"
    best = tmp_path / RUN / "1_resnet20" / "best.pt"
    before = last.read_bytes(), best.read_bytes()
    real_step = dml.step.STEPS["simultaneous"]
    calls = []

    def poisoning_step(cohort, *args):
        calls.append(1)
        if len(calls) == 5:  # from the 5th step of epoch 2 on, peer 1's weights are broken
            with torch.no_grad():
                cohort.peers[1].model.fc.weight.fill_(float("nan"))
        return real_step(cohort, *args)

    monkeypatch.setitem(dml.step.STEPS, "simultaneous", poisoning_step)
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--epochs", "3", "--resume") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: peer 1_resnet20 diverged: its loss is not finite at epoch 2, step 5"), err
    assert err.count("\n") == 1
    assert (last.read_bytes(), best.read_bytes()) == before
    assert {r["epoch"] for r in _metrics(tmp_path / RUN)} == {1}


def test_absurd_learning_rate_diverges_with_an_error(cifar_root, tmp_path, capsys):
    assert _train(cifar_root, tmp_path, "--epochs", "2", "--lr", "1e30", "--precision", "fp32") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: peer 0_resnet20 diverged") and "lower --lr" in err
    assert not (tmp_path / RUN / "0_resnet20" / "last.pt").exists()


def test_full_disk_keeps_the_previous_checkpoint_and_resumes(cifar_root, tmp_path, straight_run, monkeypatch, capsys):
    assert _train(cifar_root, tmp_path, "--epochs", "3", "--stop-after", "1") == 0
    last = tmp_path / RUN / "0_resnet20" / "last.pt"
    before = last.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dml.runlog.torch, "save", full_disk)
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--epochs", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "No space left on device" in err and err.count("\n") == 1
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(dml.runlog.torch, "save", real_save)
    assert _train(cifar_root, tmp_path, "--epochs", "3", "--resume") == 0
    _assert_same_run(tmp_path / RUN, straight_run)


def test_an_output_directory_below_a_file_is_called_a_file(cifar_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _train(cifar_root, blocker / "runs", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out-dir {blocker / 'runs'} cannot be created: {blocker} is a file, not a directory; "
                   "pass a folder as --out-dir (nothing was written)\n")


def test_an_out_dir_that_is_a_file_is_called_a_file_not_a_full_disk(cifar_root, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _train(cifar_root, blocker, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err == (f"error: --out-dir {blocker} is a file, not a directory; pass a folder as --out-dir "
                   "(nothing was written)\n")
    assert blocker.read_text() == "not a folder" and list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-a-checkpoint", "wrong-model"])
def test_damaged_checkpoint_is_a_clear_error(cifar_root, tmp_path, capsys, damage):
    assert _train(cifar_root, tmp_path, "--epochs", "2", "--stop-after", "1") == 0
    last = tmp_path / RUN / "1_resnet20" / "last.pt"
    data = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    elif damage == "not-a-checkpoint":
        torch.save({"hello": torch.zeros(1)}, last)
    else:
        state = torch.load(last, weights_only=True)
        state["model"] = {k: v[:1] if v.dim() else v for k, v in state["model"].items()}
        torch.save(state, last)
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--epochs", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and str(last) in err and err.count("\n") == 1, err
    # a run's own damaged checkpoint: resuming can fall back to an earlier one
    assert ("delete it to fall back to an earlier one" in err) == (damage != "wrong-model"), err


def test_same_command_same_metrics(cifar_root, tmp_path, straight_run):
    again = subprocess.run(_cmd(cifar_root, tmp_path, "--epochs", "3"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    _assert_same_run(tmp_path / RUN, straight_run)
    # Every line but the wall-clock "seconds" is byte-identical.
    strip = lambda path: [json.dumps({k: v for k, v in json.loads(l).items() if k != "seconds"})  # noqa: E731
                          for l in path.read_text().splitlines()]
    assert strip(tmp_path / RUN / "metrics.jsonl") == strip(straight_run / "metrics.jsonl")
