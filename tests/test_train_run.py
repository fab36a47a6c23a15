"""End-to-end `dml train` runs on a small subset: outputs, resume equivalence, user errors."""

import io
import json
import subprocess
import sys
from functools import partial

import pytest
import torch

from dml.cli import main
from test_custom_models import NETS  # pytest puts the tests folder on sys.path
from tiny_run import metrics as _metrics
from tiny_run import tiny_flags, train

TINY = tiny_flags("--precision", "fp32")
_train = partial(train, tiny=TINY)


def _state(run_dir, peer):
    return torch.load(run_dir / peer / "last.pt", weights_only=True)


def test_run_directory_is_self_describing(cifar_root, tmp_path):
    assert _train(cifar_root, tmp_path, "--models", "resnet20", "wrn28_2", "--num-nodes", "2", "--epochs", "2") == 0
    run = tmp_path / "dml_n2_resnet20-wrn28_2_s42"
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["models"] == ["resnet20", "wrn28_2"]
    assert config["config"]["lr"] == 0.1 and config["config"]["epochs"] == 2
    assert config["torch_version"] == torch.__version__ and config["device_type"] == "cpu"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["node"]) for r in lines] == [(1, 0), (1, 1), (1, "ensemble"), (2, 0), (2, 1), (2, "ensemble")]
    peer = lines[0]
    assert set(peer) == {"epoch", "node", "model", "lr", "train_loss", "train_ce", "train_kd", "train_acc", "test_acc",
                         "seconds"}
    for r in lines[:2] + lines[3:5]:  # the objective is its cross-entropy and its KL term (DML: both live)
        assert r["train_loss"] == pytest.approx(r["train_ce"] + r["train_kd"]) and r["train_kd"] > 0
    assert peer["model"] == "resnet20" and peer["lr"] == 0.1 and lines[3]["lr"] == pytest.approx(0.05)
    assert 0 <= peer["train_acc"] <= 100 and 0 <= peer["test_acc"] <= 100 and peer["train_loss"] > 0
    for folder in ("0_resnet20", "1_wrn28_2"):
        last = torch.load(run / folder / "last.pt", weights_only=True)
        best = torch.load(run / folder / "best.pt", weights_only=True)
        assert last["run"]["epoch"] == 2
        assert best["model_name"] == folder.split("_", 1)[1]
        assert not (run / folder / "last.next.pt").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "1_wrn28_2"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"lr", "train_loss", "train_ce", "train_kd", "train_acc", "test_acc"}
    acc = [e.value for e in events.Scalars("test_acc")]
    assert acc == pytest.approx([r["test_acc"] for r in lines if r["node"] == 1])
    ensemble = EventAccumulator(str(run / "ensemble"))
    ensemble.Reload()
    assert [e.step for e in ensemble.Scalars("test_acc")] == [1, 2]


@pytest.mark.parametrize("update, ramp", [("simultaneous", []), ("sequential", []),
                                          ("simultaneous", ["--kd-ramp", "sigmoid", "--kd-ramp-epochs", "1.5"])])
def test_resume_ends_exactly_where_an_uninterrupted_run_ends(cifar_root, tmp_path, update, ramp):
    args = ["--models", "resnet20", "--num-nodes", "2", "--epochs", "2", "--update", update, "--precision", "bf16",
            *ramp]
    assert _train(cifar_root, tmp_path / "straight", *args) == 0
    assert _train(cifar_root, tmp_path / "resumed", *args, "--stop-after", "1") == 0
    name = "dml_n2_sigmoid_ramp_resnet20_s42" if ramp else "dml_n2_resnet20_s42"  # the method names the run
    resumed = tmp_path / "resumed" / name
    assert _metrics(resumed)[-1]["epoch"] == 1
    assert _train(cifar_root, tmp_path / "resumed", *args, "--resume") == 0
    straight = tmp_path / "straight" / name
    assert _metrics(resumed) == _metrics(straight)
    for peer in ("0_resnet20", "1_resnet20"):
        a, b = _state(straight, peer), _state(resumed, peer)
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for k, v in a["optimizer"]["state"].items():
            assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])


def test_resume_rolls_forward_a_commit_interrupted_between_peers(cifar_root, tmp_path):
    """A crash after peer 0 published epoch 2 but before peer 1 did still resumes at epoch 2."""
    args = ["--models", "resnet20", "--num-nodes", "2", "--epochs", "3"]
    assert _train(cifar_root, tmp_path / "a", *args, "--stop-after", "2") == 0
    run = tmp_path / "a" / "dml_n2_resnet20_s42"
    # Rebuild the state "peer 1 staged epoch 2 but did not rename it": its last.pt goes back to epoch 1.
    assert _train(cifar_root, tmp_path / "b", *args, "--stop-after", "1") == 0
    older = tmp_path / "b" / "dml_n2_resnet20_s42" / "1_resnet20" / "last.pt"
    (run / "1_resnet20" / "last.pt").rename(run / "1_resnet20" / "last.next.pt")
    older.replace(run / "1_resnet20" / "last.pt")
    assert _train(cifar_root, tmp_path / "a", *args, "--resume") == 0
    assert _train(cifar_root, tmp_path / "c", *args) == 0
    assert _metrics(run) == _metrics(tmp_path / "c" / "dml_n2_resnet20_s42")


def test_resume_restarts_a_first_epoch_whose_commit_was_cut_short(cifar_root, tmp_path):
    """A crash after peer 0 staged epoch 1 but before peer 1 saved anything: --resume starts over."""
    args = ["--models", "resnet20", "--num-nodes", "2", "--epochs", "2"]
    assert _train(cifar_root, tmp_path / "a", *args, "--stop-after", "1") == 0
    run = tmp_path / "a" / "dml_n2_resnet20_s42"
    (run / "0_resnet20" / "last.pt").rename(run / "0_resnet20" / "last.next.pt")
    (run / "1_resnet20" / "last.pt").unlink()
    assert _train(cifar_root, tmp_path / "a", *args, "--resume") == 0
    assert _train(cifar_root, tmp_path / "b", *args) == 0
    assert _metrics(run) == _metrics(tmp_path / "b" / "dml_n2_resnet20_s42")
    assert not (run / "0_resnet20" / "last.next.pt").exists()


def test_finished_run_is_not_overwritten(cifar_root, tmp_path, capsys):
    assert _train(cifar_root, tmp_path, "--models", "resnet20", "--epochs", "1") == 0
    run = tmp_path / "independent_resnet20_s42"
    before = (run / "metrics.jsonl").read_bytes(), (run / "0_resnet20" / "last.pt").read_bytes()
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--models", "resnet20", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--resume" in err and err.count("\n") == 1
    assert ((run / "metrics.jsonl").read_bytes(), (run / "0_resnet20" / "last.pt").read_bytes()) == before


def test_resume_with_other_configuration_is_refused(cifar_root, tmp_path, capsys):
    assert _train(cifar_root, tmp_path, "--models", "resnet20", "--epochs", "2", "--stop-after", "1") == 0
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--models", "resnet20", "--epochs", "2", "--lr", "0.05", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lr: 0.1 -> 0.05" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--models", "resnet33"], "unknown model 'resnet33'"),
        (["--models", "resnet20", "wrn28_2", "--num-nodes", "3"], "--models lists 2 names for --num-nodes 3"),
        (["--lr", "0"], "--lr must be a positive"),
        (["--lr", "nan"], "--lr must be a positive"),
        (["--lr", "abc"], "invalid float value"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--epochs", "-1"], "--epochs must be a positive integer"),
        (["--temperature", "0"], "--temperature must be a positive"),
        (["--num-nodes", "0"], "--num-nodes must be at least 1"),
        (["--update", "random"], "invalid choice"),
        (["--resume"], "nothing to resume"),
        (["--resume", "later"], "argument --resume: --resume takes no value or 'auto', got 'later'"),
        (["--max-restarts", "1"], "--max-restarts restarts the processes that --procs starts; under torchrun"),
        (["--procs", "2", "--max-restarts", "-1"], "--max-restarts must be 0 or more, got -1"),
        (["--stop-after", "0"], "--stop-after must be a positive integer"),
    ],
)
def test_user_errors_are_one_line_with_status_2(cifar_root, tmp_path, capsys, args, expected):
    assert _train(cifar_root, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing written for a refused run


@pytest.mark.processes  # a dml train process
def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dml", "train", "--data-dir", str(tmp_path / "nodata"), "--no-download",
         "--out-dir", str(tmp_path / "runs")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "cifar-100-python" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def tiny_net(tmp_path, monkeypatch):
    """package.module:factory of a small network of the user's own, importable from the current directory."""
    name = f"consolenets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(NETS)  # the user networks of test_custom_models
    monkeypatch.chdir(tmp_path)
    return f"{name}:tiny"


def test_the_console_spells_a_peer_as_its_folder(cifar_root, tmp_path, capsys, tiny_net):
    assert _train(cifar_root, tmp_path / "runs", "--models", tiny_net, "--epochs", "1") == 0
    folder = tiny_net.replace(":", "-")
    assert (tmp_path / "runs" / f"independent_{folder}_s42" / f"0_{folder}").is_dir()
    out = capsys.readouterr().out
    assert f"epoch 1/1 0_{folder} " in out and f"0_{tiny_net}" not in out


def test_the_console_shows_a_graph_files_names_for_its_peers(cifar_root, tmp_path, capsys, tiny_net):
    graph = tmp_path / "pair.toml"
    graph.write_text(f"""
[[peer]]
name = "left"
model = "{tiny_net}"

[[peer]]
name = "right"
model = "{tiny_net}"

[[link]]
source = "right"
target = "left"
""")
    assert _train(cifar_root, tmp_path / "runs", "--graph", str(graph), "--epochs", "1") == 0
    folder = tiny_net.replace(":", "-")
    out = capsys.readouterr().out
    assert f"epoch 1/1 0_{folder} (left) " in out and f"epoch 1/1 1_{folder} (right) " in out
    run = tmp_path / "runs" / f"graph-pair_{folder}_s42"
    assert sorted(p.name for p in run.glob("*_*") if p.is_dir()) == [f"0_{folder}", f"1_{folder}"]  # folders as ever


class _Terminal(io.StringIO):
    """stderr as a terminal, where progress bars are drawn."""

    def isatty(self):
        return True


def test_a_short_epochs_progress_bar_shows_its_loss_and_speed(cifar_root, tmp_path, monkeypatch, tiny_net):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = [a for a in TINY if a != "--no-progress"]  # 256 images in batches of 32: 8 steps an epoch
    assert main(["train", "--data-dir", str(cifar_root), "--out-dir", str(tmp_path / "runs"), *args,
                 "--models", tiny_net, "--epochs", "1"]) == 0
    shown = terminal.getvalue()
    assert "epoch 1/1" in shown and "loss=" in shown and "img_s=" in shown


def test_a_step_schedule_drops_the_rate_after_its_milestones_and_resumes_exactly(cifar_root, tmp_path, capsys):
    args = ["--models", "resnet20", "--epochs", "3", "--lr-milestones", "1", "2", "--lr-gamma", "0.5"]
    run_straight = partial(train, tiny=tiny_flags(train=64, test=50))
    assert run_straight(cifar_root, tmp_path / "straight", *args) == 0
    assert run_straight(cifar_root, tmp_path / "split", *args, "--stop-after", "1") == 0
    assert run_straight(cifar_root, tmp_path / "split", *args, "--resume") == 0
    straight = _metrics(tmp_path / "straight" / "independent_resnet20_s42")
    assert straight == _metrics(tmp_path / "split" / "independent_resnet20_s42")
    assert [r["lr"] for r in straight if r["node"] == 0] == pytest.approx([0.1, 0.05, 0.025])
    for bad, message in ((["--lr-milestones", "3"], "--lr-milestones must be increasing epochs between 1 and --epochs"),
                         (["--lr-milestones", "2", "1"], "--lr-milestones must be increasing"),
                         (["--lr-gamma", "0.5"], "--lr-gamma is the factor of a step schedule")):
        capsys.readouterr()
        assert run_straight(cifar_root, tmp_path / "bad", "--models", "resnet20", "--epochs", "3", *bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_logged_train_numbers_are_the_plain_means_of_what_the_steps_computed(cifar_root, tmp_path, monkeypatch,
                                                                            tiny_net):
    """An epoch's train_loss, train_ce, train_kd and train_acc in metrics.jsonl, recomputed from every step's
    outputs (the loss terms each step returned, argmax of its logits against its labels) by plain averages."""
    import dml.cohort

    seen = []
    step = dml.cohort.Cohort.step

    def recorded(self, x, y):
        out = step(self, x, y)
        seen.append(([t.item() for t in out.losses], [t.item() for t in out.ce], [t.item() for t in out.kd],
                     [(z.argmax(1) == y).sum().item() for z in out.logits], len(y)))
        return out

    monkeypatch.setattr(dml.cohort.Cohort, "step", recorded)
    assert _train(cifar_root, tmp_path / "runs", "--models", tiny_net, "--num-nodes", "2", "--epochs", "2") == 0
    records = _metrics(next((tmp_path / "runs").glob("dml_n2_*")))
    steps_per_epoch = len(seen) // 2
    assert steps_per_epoch == 256 // 32  # every step of both epochs was seen
    for epoch in (1, 2):
        steps = seen[(epoch - 1) * steps_per_epoch:epoch * steps_per_epoch]
        for peer in (0, 1):
            logged = next(r for r in records if r["epoch"] == epoch and r["node"] == peer)
            for key, column in (("train_loss", 0), ("train_ce", 1), ("train_kd", 2)):
                assert logged[key] == pytest.approx(sum(s[column][peer] for s in steps) / len(steps), rel=1e-12)
            assert logged["train_acc"] == pytest.approx(100 * sum(s[3][peer] for s in steps) / sum(s[4] for s in steps))
