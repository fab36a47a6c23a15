"""Long runs survive signals, kill -9, divergence and write failures; bad files get clear errors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from functools import partial

import pytest
import torch

import dml.engine
import dml.runlog
import dml.step
from dml.cli import main
from tiny_run import metrics as _metrics  # the tests folder is on sys.path
from tiny_run import tiny_flags, train, train_command

TINY = tiny_flags("--models", "resnet20", "--num-nodes", "2", train=512)  # 16 batches an epoch
RUN = "dml_n2_resnet20_s42"


_cmd = partial(train_command, tiny=TINY)
_train = partial(train, tiny=TINY)


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


def _catches_sigterm(pid):
    """Whether the process has a SIGTERM handler: dml train sets one as its first epoch starts."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.processes
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads signal handlers from /proc")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_in_the_first_epoch_says_nothing_was_saved_and_the_same_command_starts_over(cifar_root, tmp_path,
                                                                                              sig, code):
    command = _cmd(cifar_root, tmp_path, "--epochs", "1")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert err == (f"error: stopped by {signal.Signals(sig).name} in epoch 1, before any epoch was complete: nothing "
                   "was saved; run the same command again to start over\n")
    assert sorted(p.name for p in (tmp_path / RUN).iterdir()) == ["0_resnet20", "1_resnet20", "config.json", "ensemble"]
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert {r["epoch"] for r in _metrics(tmp_path / RUN)} == {1}


def _interrupt_at_step(monkeypatch, step):
    """Ctrl-C as a KeyboardInterrupt (where no signal handler could be set) at the given step of this process."""
    real_step = dml.step.STEPS["simultaneous"]
    calls = []

    def interrupted_step(cohort, *args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_step(cohort, *args)

    monkeypatch.setitem(dml.step.STEPS, "simultaneous", interrupted_step)


def _header_only_event_file(folder):
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter(str(folder)).close()  # a writer that logged no epoch


def test_an_interrupted_first_epoch_leaves_a_folder_that_any_rerun_starts_over(cifar_root, tmp_path, monkeypatch,
                                                                               capsys):
    _interrupt_at_step(monkeypatch, 3)
    assert _train(cifar_root, tmp_path, "--epochs", "1") == 130
    assert capsys.readouterr().err == ("error: stopped by SIGINT in epoch 1, before any epoch was complete: nothing "
                                       "was saved; run the same command again to start over\n")
    monkeypatch.undo()
    run = tmp_path / RUN
    _header_only_event_file(run / "ensemble")
    (run / ".config.json.k3j_9x2a.tmp").write_text("{")  # an atomic write cut short
    # anything more than dml train writes before a first epoch is complete: the folder is a run, kept as it is
    logged = '{"epoch": 1, "node": "ensemble", "test_acc": 1.0, "seconds": 1.0}\n'
    additions = {"notes.txt": "a user's notes", "0_resnet20/best.pt": "a saved best.pt", "metrics.jsonl": logged,
                 "ensemble/events.out.tfevents.1.host": None, "config.json": "a file dml train did not write"}
    for n, (name, text) in enumerate(additions.items()):
        out = tmp_path / str(n)
        shutil.copytree(run, out / RUN)
        if text is None:  # an event file that logged an epoch
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(out / RUN / "ensemble")) as writer:
                writer.add_scalar("test_acc", 1.0, 1)
        else:
            (out / RUN / name).write_text(text)
        kept = {p: p.read_bytes() for p in (out / RUN).rglob("*") if p.is_file()}
        capsys.readouterr()
        assert _train(cifar_root, out, "--epochs", "1") == 2, name
        assert capsys.readouterr().err == (f"error: {out / RUN} already holds a run; pass --resume to continue it, "
                                           "or --name for a new run\n"), name
        assert {p: p.read_bytes() for p in (out / RUN).rglob("*") if p.is_file()} == kept
    # with another configuration too ("lower --lr and start again"): the folder holds nothing to lose
    assert _train(cifar_root, tmp_path, "--epochs", "1", "--lr", "0.05") == 0
    assert json.loads((run / "config.json").read_text())["config"]["lr"] == 0.05
    assert {r["epoch"] for r in _metrics(run)} == {1}


def test_an_interrupt_after_a_saved_epoch_names_it(cifar_root, tmp_path, monkeypatch, capsys):
    batches = 512 // 32
    _interrupt_at_step(monkeypatch, batches + 3)
    assert _train(cifar_root, tmp_path, "--epochs", "2") == 130
    assert capsys.readouterr().err == ("error: stopped by SIGINT in epoch 2; epoch 1 is saved: continue with the same "
                                       "command and --resume\n")
    monkeypatch.undo()
    assert _train(cifar_root, tmp_path, "--epochs", "2") == 2  # it holds a run now
    assert _train(cifar_root, tmp_path, "--epochs", "2", "--resume") == 0


def test_an_interrupt_before_training_says_nothing_was_saved(cifar_root, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dml.engine, "load_data", interrupted)
    assert _train(cifar_root, tmp_path, "--epochs", "1") == 130
    assert capsys.readouterr().err == ("error: interrupted before training started; nothing was saved; run the same "
                                       "command again\n")
    assert not (tmp_path / RUN).exists()


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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_what_a_run_writes_honours_the_umask(cifar_root, tmp_path, capsys, umask):
    """Colleagues on a shared filesystem read runs where the umask lets them (022), and nobody else where it
    does not (077): checkpoints and rewritten files too, not only TensorBoard's."""
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        assert _train(cifar_root, out, "--epochs", "2", "--stop-after", "1") == 0
        assert _train(cifar_root, out, "--epochs", "2", "--resume") == 0  # metrics.jsonl rewritten on resume
        assert main(["report", str(out / RUN), "--out", str(out / "report.md"), "--plots", str(out / "plots")]) == 0
        assert main(["evaluate", str(out / RUN / "0_resnet20" / "best.pt"), "--test-samples", "50",
                     "--json", str(out / "evaluate.json")]) == 0
    finally:
        os.umask(previous)
    files = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert {RUN + "/config.json", RUN + "/metrics.jsonl", RUN + "/0_resnet20/last.pt", RUN + "/1_resnet20/best.pt",
            "report.md", "evaluate.json"} <= {str(p) for p in files}
    assert any(p.name.startswith("events.out.tfevents") for p in files) and any(p.suffix == ".png" for p in files)
    modes = {str(p): oct((out / p).stat().st_mode & 0o777) for p in files}
    assert modes == {p: oct(0o666 & ~umask) for p in modes}
    folders = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_dir()}
    assert folders == {p: oct(0o777 & ~umask) for p in folders}


@pytest.mark.processes  # dml train processes (this one and straight_run's)
def test_same_command_same_metrics(cifar_root, tmp_path, straight_run):
    again = subprocess.run(_cmd(cifar_root, tmp_path, "--epochs", "3"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    _assert_same_run(tmp_path / RUN, straight_run)
    # Every line but the wall-clock "seconds" is byte-identical.
    strip = lambda path: [json.dumps({k: v for k, v in json.loads(line).items() if k != "seconds"})  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(tmp_path / RUN / "metrics.jsonl") == strip(straight_run / "metrics.jsonl")


def test_a_batch_fingerprint_changes_with_any_image_label_or_their_order():
    from dml.engine import batch_fingerprint

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 4, 4, generator=g), torch.randint(0, 10, (6,), generator=g)
    y[1] = (y[0] + 1) % 10  # two different labels to swap
    base = batch_fingerprint(x, y)
    assert batch_fingerprint(x.clone(), y.clone()) == base
    swapped = torch.tensor([1, 0, 2, 3, 4, 5])
    assert batch_fingerprint(x[swapped], y[swapped]) != base  # the same images and labels in another order
    assert batch_fingerprint(x[swapped], y) != base
    assert batch_fingerprint(x, y[swapped]) != base
    changed = x.clone()
    changed[3, 0, 0, 0] += 0.5
    assert batch_fingerprint(changed, y) != base


def test_a_stop_signal_says_what_was_saved_and_a_second_signal_stops_at_once():
    from dml.engine import RunStopped, StopSignal

    with StopSignal(saved=3) as stop:
        stop.check()  # nothing received: goes on
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(RunStopped) as first:
            stop.check()
        assert first.value.exit_code == 143
        assert str(first.value) == ("stopped by SIGTERM in epoch 4; epoch 3 is saved: continue with the same command "
                                    "and --resume")
        stop.saving = 4
        assert "epoch 4 was being saved: continue with the same command and --resume" in str(stop.stopped())
        with pytest.raises(KeyboardInterrupt):  # the second signal: at once, wherever the run is
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle  # the handlers are given back
    fresh = StopSignal()
    fresh.received = signal.SIGINT
    stopped = fresh.stopped()
    assert stopped.exit_code == 130 and "before any epoch was complete: nothing was saved" in str(stopped)


def test_a_peer_whose_checkpoint_was_deleted_is_named_not_silently_restarted(cifar_root, tmp_path, capsys):
    """Deleting a damaged last.pt, as the error line advises, leaves a peer with no checkpoint: past the first
    epoch that is one error line naming it; with one epoch logged, resuming says it starts over."""
    assert _train(cifar_root, tmp_path, "--epochs", "3", "--stop-after", "2") == 0
    (tmp_path / RUN / "1_resnet20" / "last.pt").unlink()
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--epochs", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "1_resnet20 has no checkpoint while the run logged 2 complete epochs; resuming would start over" in err
    assert {r["epoch"] for r in _metrics(tmp_path / RUN)} == {1, 2}  # nothing lost

    one = tmp_path / "one"
    assert _train(cifar_root, one, "--epochs", "2", "--stop-after", "1") == 0
    (one / RUN / "1_resnet20" / "last.pt").unlink()
    capsys.readouterr()
    assert _train(cifar_root, one, "--epochs", "2", "--resume") == 0
    assert "holds no epoch that every peer saved; starting over from epoch 1" in capsys.readouterr().out
