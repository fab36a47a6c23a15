"""`dml tune`: a real optuna study in SQLite, trials as dml train runs judged on the validation split."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dml.cli import main
from test_experiment import commands, write_plan

optuna = pytest.importorskip("optuna", reason="dml tune needs the [tune] extra (optuna)")

SEARCH = """
[search]
lr = { low = 0.01, high = 0.2, log = true }
temperature = { choices = [1.0, 2.0, 4.0] }
"""


def tune_plan(tmp_path, cifar_root, epochs=2):
    plan = write_plan(tmp_path, cifar_root, SEARCH, epochs=epochs)
    plan.write_text(plan.read_text().replace("[defaults]", "[defaults]\nval_samples = 100\nnum_nodes = 2"))
    return plan


def study(out):
    return optuna.load_study(study_name="dml-tune", storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.processes  # a dml train process per run
def test_three_trials_are_judged_on_validation_and_end_with_a_command(cifar_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tune", str(tune_plan(tmp_path, cifar_root)), "--trials", "3", "--out-dir", str(out),
                 "--no-progress"]) == 0
    trials = study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        records = [json.loads(line) for line in (out / f"trial{t.number:03d}" / "metrics.jsonl").read_text().splitlines()]
        peers = [r for r in records if r["node"] in (0, 1)]
        curve = {e: sum(r["val_acc"] for r in peers if r["epoch"] == e) / 2 for e in (1, 2)}
        assert t.intermediate_values == curve and t.value == max(curve.values())  # validation, not test accuracy
        config = json.loads((out / f"trial{t.number:03d}" / "config.json").read_text())["config"]
        assert 0.01 <= config["lr"] <= 0.2 and config["lr"] == t.params["lr"]
        assert config["temperature"] == t.params["temperature"]
    summary = (out / "tune.md").read_text()
    assert summary in capsys.readouterr().out
    best = study(out).best_trial
    command = summary.split("```bash\n")[1].split("\n```")[0].split()
    assert command[:2] == ["dml", "train"] and command[command.index("--lr") + 1] == repr(best.params["lr"])
    # the command reproduces the best trial
    command[command.index("--out-dir") + 1] = str(tmp_path / "again")
    assert main(command[1:]) == 0
    again = [json.loads(line) for line in (tmp_path / "again" / "tuned" / "metrics.jsonl").read_text().splitlines()]
    original = (out / f"trial{best.number:03d}" / "metrics.jsonl").read_text().splitlines()
    assert [r["val_acc"] for r in again] == [json.loads(line)["val_acc"] for line in original]
    # again: the study holds its 3 trials; nothing runs
    assert main(["tune", str(tune_plan(tmp_path, cifar_root)), "--trials", "3", "--out-dir", str(out),
                 "--no-progress"]) == 0
    assert len(study(out).trials) == 3


@pytest.mark.processes  # a dml train process per run
def test_a_trial_far_below_the_others_is_pruned(cifar_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = optuna.create_study(study_name="dml-tune", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    distributions = {"lr": optuna.distributions.FloatDistribution(0.01, 0.2, log=True),
                     "temperature": optuna.distributions.CategoricalDistribution([1.0, 2.0, 4.0])}
    for lr in (0.05, 0.1):  # two strong trials: 99 % at every epoch
        earlier.add_trial(optuna.trial.create_trial(params={"lr": lr, "temperature": 2.0}, distributions=distributions,
                                                    value=99.0, intermediate_values={e: 99.0 for e in range(1, 21)}))
    # 20 epochs: pruning (from epoch 2, seen within a second) stops the trial long before its end
    assert main(["tune", str(tune_plan(tmp_path, cifar_root, epochs=20)), "--trials", "3", "--out-dir", str(out),
                 "--no-progress"]) == 0
    third = study(out).trials[2]
    assert third.state.name == "PRUNED"
    epochs = [json.loads(line)["epoch"] for line in (out / "trial002" / "metrics.jsonl").read_text().splitlines()]
    assert max(epochs) < 20 and max(third.intermediate_values) < 20
    assert max(third.intermediate_values) >= 2  # a first epoch alone never prunes


def _strong_trials(out, epochs):
    """A study in ``out`` that already holds two finished trials at 99 % in every epoch."""
    out.mkdir()
    earlier = optuna.create_study(study_name="dml-tune", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    distributions = {"lr": optuna.distributions.FloatDistribution(0.01, 0.2, log=True),
                     "temperature": optuna.distributions.CategoricalDistribution([1.0, 2.0, 4.0])}
    curve = {e: 99.0 for e in range(1, epochs + 1)}
    for lr in (0.05, 0.1):
        earlier.add_trial(optuna.trial.create_trial(params={"lr": lr, "temperature": 2.0}, distributions=distributions,
                                                    value=99.0, intermediate_values=curve))


@pytest.mark.processes  # a dml train process per run
def test_a_trial_that_trained_all_its_epochs_completes_however_far_below_it_is(cifar_root, tmp_path, capsys):
    out = tmp_path / "out"
    _strong_trials(out, 2)  # the pruner would stop the third at epoch 2: its last
    assert main(["tune", str(tune_plan(tmp_path, cifar_root, epochs=2)), "--trials", "3", "--out-dir", str(out),
                 "--no-progress"]) == 0
    third = study(out).trials[2]
    assert third.state.name == "COMPLETE" and sorted(third.intermediate_values) == [1, 2]
    assert third.value == max(third.intermediate_values.values())
    assert "pruned" not in capsys.readouterr().out


def _best_command(out):
    return (out / "tune.md").read_text().split("```bash\n")[1].split("\n```")[0].split()


def test_the_best_command_keeps_its_progress_bars(cifar_root, tmp_path):
    out = tmp_path / "out"
    _strong_trials(out, 2)  # --trials 2: nothing left to run, only tune.md to write
    assert main(["tune", str(tune_plan(tmp_path, cifar_root)), "--trials", "2", "--out-dir", str(out),
                 "--no-progress"]) == 0
    command = _best_command(out)
    assert command[:2] == ["dml", "train"] and "--no-progress" not in command  # for a person at a terminal


def test_set_settings_reach_the_trials_and_the_best_command(cifar_root, tmp_path):
    out = tmp_path / "out"
    _strong_trials(out, 2)
    plan = tune_plan(tmp_path, cifar_root)
    plan.write_text(plan.read_text().replace(f'data_dir = "{cifar_root}"', 'data_dir = "elsewhere"'))
    assert main(["tune", str(plan), "--trials", "2", "--out-dir", str(out), "--no-progress",
                 "--set", f"data_dir={cifar_root}"]) == 0
    command = _best_command(out)
    assert command[command.index("--data-dir") + 1] == str(cifar_root)


def test_a_set_setting_that_the_search_varies_is_refused(cifar_root, tmp_path, capsys):
    assert main(["tune", str(tune_plan(tmp_path, cifar_root)), "--trials", "2", "--out-dir", str(tmp_path / "out"),
                 "--set", "lr=0.05"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --set lr: the plan's [search] varies lr; drop it from --set or from [search]\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.processes
def test_a_search_killed_with_sigkill_continues_its_trial(cifar_root, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dml", "tune", str(tune_plan(tmp_path, cifar_root, epochs=4)), "--trials", "2",
               "--out-dir", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "trial000" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not metrics.exists() or '"epoch": 1' not in metrics.read_text():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert [t.state.name for t in study(out).trials] == ["RUNNING"]
    assert subprocess.run(command, capture_output=True).returncode == 0
    trials = study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the killed trial finished, none added
    assert sorted(trials[0].intermediate_values) == [1, 2, 3, 4]
    started = commands(out / "logs" / "trial000.log")
    assert len(started) == 2 and started[1].endswith("--resume")


@pytest.mark.parametrize("change, message", [
    (lambda text: text.replace("val_samples = 100\n", ""), "set val_samples in [defaults]"),
    (lambda text: text + "[grid]\nseed = [1, 2]\n", "the plan has 2 runs"),
    (lambda text: text.split("[search]")[0], "has no [search] table"),
])
def test_search_mistakes_are_one_error_line(cifar_root, tmp_path, capsys, change, message):
    plan = tune_plan(tmp_path, cifar_root)
    plan.write_text(change(plan.read_text()))
    assert main(["tune", str(plan), "--trials", "2", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_without_optuna_the_error_says_how_to_install_it(cifar_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` meets where it is not installed
    assert main(["tune", str(tune_plan(tmp_path, cifar_root)), "--trials", "2", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("error: dml tune needs optuna: pip install optuna "
                                       "(or, in the project's checkout, pip install -e '.[tune]')\n")
