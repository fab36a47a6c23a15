"""`dml experiment`: plans read into named runs, run to completion, resumed after kill -9, reported."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dml.cli import main
from dml.config import TrainConfig, train_flags
from dml.errors import UserError
from dml.plan import read_plan


def write_plan(folder: Path, cifar_root: Path, body: str, epochs: int = 2, name: str = "plan.toml",
               head: str = "") -> Path:
    """A plan on a few hundred synthetic CIFAR images, with ``body`` after its [defaults]."""
    path = folder / name
    path.write_text(f"""{head}
[defaults]
data_dir = "{cifar_root}"
skip_checksum = true
download = false
train_samples = 256
test_samples = 100
batch_size = 32
epochs = {epochs}
precision = "fp32"
models = "resnet20"
{body}
""")
    return path


def commands(log: Path) -> list[str]:
    """The dml train commands a run's log records, one per start."""
    return [line for line in log.read_text().splitlines() if re.match(r"# \d{4}-\d\d-\d\d ", line)]


def processes_running(text: str) -> list[str]:
    """The command lines of the live processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode() if entry.name.isdigit() else ""
        except OSError:  # it ended while being read
            continue
        if text in line:
            found.append(line)
    return found


def _most_at_once(out: str, finished: threading.Event) -> int:
    """The most runs (dml train commands writing under ``out``, told apart by --name) alive at one time, until
    ``finished``. By name, not by process: a process that forks shows its command line twice until the child
    runs another program."""
    most = 0
    while not finished.is_set():
        names = {line.split(" --name ", 1)[1].split()[0] for line in processes_running(f"--out-dir {out} --name ")}
        most = max(most, len(names))
        time.sleep(0.05)
    return most


def metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    return records


# --- reading plans ------------------------------------------------------------------------------------
def test_grid_and_rows_make_one_named_run_per_combination(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("""
[defaults]
epochs = 3
[grid]
seed = [0, 1]
lr = [0.1, 0.05]
[[run]]
label = "alone"
[[run]]
label = "dml"
num_nodes = 2
""")
    plan = read_plan(path, tmp_path / "out")
    assert [r.name for r in plan.runs] == ["alone_s0_lr0.1", "alone_s0_lr0.05", "alone_s1_lr0.1", "alone_s1_lr0.05",
                                           "dml_s0_lr0.1", "dml_s0_lr0.05", "dml_s1_lr0.1", "dml_s1_lr0.05"]
    assert plan.runs[5].settings == {"epochs": 3, "num_nodes": 2, "seed": 0, "lr": 0.05}


def test_unlabelled_rows_are_named_by_the_settings_that_differ(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("""
[[run]]
models = "resnet32"
[[run]]
models = ["resnet32", "wrn28_2"]
num_nodes = 2
""")
    assert [r.name for r in read_plan(path, tmp_path).runs] == ["resnet32_n1", "resnet32-wrn28_2_n2"]


def test_teacher_placeholders_and_order(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("""
[grid]
seed = [3, 4]
[[run]]
label = "kd"
teacher = "{run:teacher}/0_wrn28_2/best.pt"
data_dir = "{out_dir}/data{seed}"
[[run]]
label = "teacher"
models = "wrn28_2"
""")
    kd3, kd4, teacher3, teacher4 = read_plan(path, tmp_path / "out").runs
    assert kd4.settings["teacher"] == [f"{tmp_path / 'out'}/teacher_s4/0_wrn28_2/best.pt"]
    assert kd4.settings["data_dir"] == f"{tmp_path / 'out'}/data4"
    assert kd3.after == ["teacher_s3"] and kd4.after == ["teacher_s4"] and teacher4.after == []
    assert kd3.peers == 1 and teacher3.peers == 1  # the teacher is not trained by the kd run


def test_the_eta_counts_each_trained_peer(tmp_path):
    """After a 1-peer run's 2 epochs took 100 s, a 3-peer run's 2 epochs are 6 peer-epochs: 300 s."""
    from dml.experiment import Runner

    plan = read_plan(write_plan(tmp_path, tmp_path / "data", """
[[run]]
label = "alone"
[[run]]
label = "dml"
num_nodes = 3
"""), tmp_path / "out")
    assert [r.peers for r in plan.runs] == [1, 3]
    runner = Runner(plan, tmp_path / "out", jobs=1, lock_fd=-1, progress=False)
    assert runner.eta(runner.trained({})[1]) == "ETA after the first epoch"
    runner.done.add("alone")
    runner.started -= 100
    assert runner.trained({}) == (2, 2)
    assert runner.eta(runner.trained({})[1]) == "ETA 5m"


@pytest.mark.parametrize("body, message", [
    ("[defaults]\nlearning_rate = 0.1", "'learning_rate' is not a dml train setting"),
    ("[defaults]\nname = 'x'", "the plan names its runs"),
    ("[defaults]\nlr = 'fast'", "lr must be a number, got 'fast'"),
    ("[defaults]\nepochs = 2.5", "epochs must be an integer"),
    ("[defaults]\nlr = -1.0", "--lr must be a positive finite number"),
    ("[grid]\nseed = 1", "seed must be a non-empty list"),
    ("[grid]\nseed = []", "seed must be a non-empty list"),
    ("[defaults]\nseed = 1\n[grid]\nseed = [1, 2]", "seed is both in [grid] and"),
    ("[[run]]\nlabel = 'a'\n[[run]]\nlabel = 'a'", "two runs are both named 'a'"),
    ("[[run]]\nlabel = 3", "label must be a name of letters"),
    ("[[run]]\nlabel = 'a/b'", "label must be a name of letters"),
    ("[search]\nlr = { low = 0.1, high = 0.2, log = 'yes' }", "lr.log must be true or false"),
    ("[search]\nlr = { low = 'a', high = 0.2 }", "lr must be a number, got 'a'"),
    ("[[run]]\nlabel = 'a'\nteacher = '{nothing}/best.pt'", "unknown placeholder {nothing}"),
    ("[[run]]\nlabel = 'a'\nteacher = '{out_dir}/b/0_resnet32/best.pt'\n"
     "[[run]]\nlabel = 'b'\nteacher = '{out_dir}/a/0_resnet32/best.pt'", "wait for each other's teachers"),
    ("baseline = 'nobody'", "baseline 'nobody' is not the label of a [[run]]"),
    ("[search]\nlr = { low = 0.2, high = 0.1 }", "lr needs low < high"),
    ("[search]\nlr = [0.1, 0.2]", "lr must be { low"),
    ("seeds = [1]", "unknown key(s) seeds"),
    ("[defaults\n", "is not valid TOML"),
])
def test_plan_mistakes_are_one_error_line(tmp_path, capsys, body, message):
    path = tmp_path / "p.toml"
    path.write_text(body + "\n")
    assert main(["experiment", str(path), "--out-dir", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_set_gives_a_setting_to_every_run_in_place_of_the_plans(tmp_path):
    from dml.plan import parse_overrides

    path = tmp_path / "p.toml"
    path.write_text("""
[defaults]
data_dir = "data"
[grid]
seed = [0, 1]
lr = [0.1, 0.05]
[[run]]
label = "alone"
[[run]]
label = "dml"
num_nodes = 2
nesterov = false
""")
    overrides = parse_overrides(["data_dir=/data/my cifar", "lr=0.02", "nesterov=true", 'models=["resnet20"]'])
    assert overrides == {"data_dir": "/data/my cifar", "lr": 0.02, "nesterov": True, "models": ["resnet20"]}
    plan = read_plan(path, tmp_path / "out", overrides)
    assert [r.name for r in plan.runs] == ["alone_s0", "alone_s1", "dml_s0", "dml_s1"]  # lr no longer varies
    assert all(r.settings["data_dir"] == "/data/my cifar" and r.settings["lr"] == 0.02 and r.settings["nesterov"]
               and r.settings["models"] == ["resnet20"] for r in plan.runs)
    assert plan.overrides == overrides
    # text settings stay text even where TOML would read a number; a bare name becomes a list where one is due
    assert parse_overrides(["data_dir=2024", "models=resnet20"]) == {"data_dir": "2024", "models": "resnet20"}
    assert read_plan(path, tmp_path / "out", {"models": "resnet20"}).runs[0].settings["models"] == ["resnet20"]


@pytest.mark.parametrize("given, message", [
    (["lr"], "--set takes KEY=VALUE"),
    (["=3"], "--set takes KEY=VALUE"),
    (["learning_rate=0.1"], "--set: 'learning_rate' is not a dml train setting"),
    (["name=x"], "the plan names its runs"),
    (["lr=fast"], "--set: lr must be a number, got 'fast'"),
    (["epochs=2.5"], "--set: epochs must be an integer"),
    (["lr=0.1", "lr=0.2"], "--set lr is given twice"),
    (["lr=-1"], "--lr must be a positive finite number"),
])
def test_set_mistakes_are_one_error_line(tmp_path, capsys, given, message):
    path = tmp_path / "p.toml"
    path.write_text("[defaults]\nepochs = 1\n")
    argv = ["experiment", str(path), "--out-dir", str(tmp_path / "out"), "--dry-run"]
    for item in given:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_train_flags_give_back_the_settings():
    from dml.cli import build_parser, config_from_args

    settings = {"models": ["resnet20", "wrn28_2"], "num_nodes": 2, "nesterov": False, "plain": True, "lr": 0.05,
                "val_samples": 300, "progress": False, "download": False, "temperature": 4.0}
    config = config_from_args(build_parser().parse_args(["train", *train_flags(settings)]))
    assert config == TrainConfig(**settings)


# --- running plans ------------------------------------------------------------------------------------
@pytest.mark.processes  # a dml train process per run
def test_a_plan_runs_every_run_once_and_reports_them(cifar_root, tmp_path, capsys):
    plan = write_plan(tmp_path, cifar_root, """
[grid]
seed = [2, 1]
[[run]]
label = "alone"
[[run]]
label = "dml"
num_nodes = 2
""", epochs=2, head='baseline = "alone"')  # seeds not in sorted order: the report sorts the runs
    out = tmp_path / "out"
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    names = ["alone_s1", "alone_s2", "dml_s1", "dml_s2"]
    for name in names:
        records = metrics(out / name)
        assert [r["epoch"] for r in records if r["node"] == "ensemble"] == [1, 2]
        assert json.loads((out / name / "config.json").read_text())["config"]["name"] == name
    # the same run by hand gives the same numbers
    assert main(["train", *train_flags(read_plan(plan, out).runs[3].settings), "--out-dir", str(tmp_path / "hand"),
                 "--no-progress"]) == 0
    assert metrics(tmp_path / "hand" / "dml_n2_resnet20_s1") == metrics(out / "dml_s1")
    report = (out / "report.md").read_text()
    assert "## Baseline: alone (2 seeds)" in report and "## DML with 2 nodes: dml (2 seeds)" in report
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        ["comparison.png", "gains.png"] + [f"{n}.png" for n in names])
    # dml report over the output folder, the baseline named by its row, writes the same summary table
    from dml.report import report as report_of

    def summary(markdown):
        return [line for line in markdown.split("## Summary")[1].split("\n## ")[0].splitlines() if line.startswith("|")]
    assert summary(report_of([out], baseline="alone")) == summary(report)
    capsys.readouterr()
    # again: nothing to train, nothing trained
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    assert "4 done, 0 to run" in capsys.readouterr().out
    assert all(len(commands(out / "logs" / f"{n}.log")) == 1 for n in names)
    assert main(["experiment", str(plan), "--out-dir", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" done\n") == 4


@pytest.mark.processes  # a dml train process per run
def test_a_changed_plan_is_refused_with_its_differences(cifar_root, tmp_path, capsys):
    plan = write_plan(tmp_path, cifar_root, "[grid]\nseed = [1, 2]", epochs=1)
    out = tmp_path / "out"
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    before = (out / "s1" / "metrics.jsonl").read_bytes()
    plan.write_text(plan.read_text().replace("seed = [1, 2]", "seed = [1, 2, 3]").replace("epochs = 1", "epochs = 2"))
    capsys.readouterr()
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the plan differs from the one that started") and err.count("\n") == 1
    assert "run s1: epochs 1 -> 2" in err and "s3" not in err  # a new run changes nothing that ran
    assert (out / "s1" / "metrics.jsonl").read_bytes() == before and not (out / "s3").exists()
    # settings that do not change what a run computes may change
    plan.write_text(plan.read_text().replace("seed = [1, 2, 3]", "seed = [1, 2]").replace("epochs = 2", "epochs = 1")
                    .replace("[defaults]", "[defaults]\nprogress = false"))
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    # a plan that gains a run runs it beside the finished ones, and is recorded as it now is
    plan.write_text(plan.read_text().replace("seed = [1, 2]", "seed = [1, 2, 3]"))
    capsys.readouterr()
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    assert "3 runs" in capsys.readouterr().out and (out / "s3" / "metrics.jsonl").exists()
    assert (out / "s1" / "metrics.jsonl").read_bytes() == before
    assert set(json.loads((out / "plan.json").read_text())["runs"]) == {"s1", "s2", "s3"}
    assert (out / "plan.toml").read_text() == plan.read_text()
    # and a run it then loses is refused
    plan.write_text(plan.read_text().replace("seed = [1, 2, 3]", "seed = [1, 2]"))
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 2
    assert "run s3 is not in the new plan" in capsys.readouterr().err


@pytest.mark.processes  # a dml train process per run
def test_set_is_recorded_so_that_only_the_same_set_continues_the_output_directory(cifar_root, tmp_path, capsys):
    plan = write_plan(tmp_path, cifar_root, "", epochs=1)
    plan.write_text(plan.read_text().replace(f'data_dir = "{cifar_root}"', 'data_dir = "data"'))  # as shipped
    out = tmp_path / "out"
    given = ["--set", f"data_dir={cifar_root}", "--set", "lr=0.05"]
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress", *given]) == 0
    config = json.loads((out / "plan" / "config.json").read_text())["config"]
    assert config["data_dir"] == str(cifar_root) and config["lr"] == 0.05
    assert json.loads((out / "plan.json").read_text())["set"] == {"data_dir": str(cifar_root), "lr": 0.05}
    capsys.readouterr()
    for other in ([], ["--set", f"data_dir={cifar_root}"], ["--set", "data_dir=/elsewhere", "--set", "lr=0.05"]):
        assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress", *other]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out} was started with --set data_dir={cifar_root} --set lr=0.05, not ")
        assert err.endswith("continue it with the same --set, or use another --out-dir\n") and err.count("\n") == 1
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress", *given]) == 0
    assert "1 done, 0 to run" in capsys.readouterr().out
    assert len(commands(out / "logs" / "plan.log")) == 1  # trained once


@pytest.mark.processes  # a dml train process per run
def test_a_run_stopped_before_its_first_epoch_was_saved_is_said_to_start_again(cifar_root, tmp_path, capsys):
    plan = write_plan(tmp_path, cifar_root, "", epochs=1)
    out = tmp_path / "out"
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    for path in [*(out / "plan").glob("*/*.pt"), out / "plan" / "metrics.jsonl"]:
        path.unlink()  # what a kill in its first epoch leaves: config.json, no checkpoint
    capsys.readouterr()
    assert main(["experiment", str(plan), "--out-dir", str(out), "--dry-run"]) == 0
    assert "interrupted in epoch 1 of 1" in capsys.readouterr().out
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "plan starts again (no epoch was saved)" in text and "after epoch 0" not in text


@pytest.mark.processes  # a dml train process per run
def test_a_kd_run_waits_for_its_teacher_from_the_same_plan(cifar_root, tmp_path):
    plan = write_plan(tmp_path, cifar_root, """
[grid]
seed = [5]
[[run]]
label = "kd"
teacher = "{run:teacher}/0_resnet20/best.pt"
[[run]]
label = "teacher"
""", epochs=1)
    out = tmp_path / "out"
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 0
    spec = json.loads((out / "kd" / "config.json").read_text())["config"]["graph_spec"]  # one seed: no _s5
    assert spec["peers"][1]["checkpoint"] == str(out / "teacher" / "0_resnet20" / "best.pt")
    assert (out / "teacher" / "metrics.jsonl").stat().st_mtime < (out / "kd" / "metrics.jsonl").stat().st_mtime


@pytest.mark.processes  # a dml train process per run
def test_a_failed_run_is_named_and_the_others_still_run(cifar_root, tmp_path, capsys):
    plan = write_plan(tmp_path, cifar_root, """
[[run]]
label = "broken"
val_samples = 50000  # only the data, read when the run starts, shows it is too many
[[run]]
label = "fine"
""", epochs=1)
    out = tmp_path / "out"
    assert main(["experiment", str(plan), "--out-dir", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: run broken exit status 2: error: --val-samples 50000 leaves 0 of the 50000 training images" in err
    assert "1 of 2 runs did not finish" in err
    assert [r["epoch"] for r in metrics(out / "fine") if r["node"] == "ensemble"] == [1]


@pytest.mark.processes
def test_a_plan_killed_with_sigkill_finishes_with_every_run_trained_once(cifar_root, tmp_path):
    body = "[grid]\nseed = [1, 2, 3]\n"
    plan = write_plan(tmp_path, cifar_root, body, epochs=4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dml", "experiment", str(plan), "--out-dir", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "s2" / "metrics.jsonl").exists() or '"epoch": 1' not in (out / "s2" / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # in the middle of run s2
    process.wait()
    deadline = time.monotonic() + 60
    while processes_running(f"--out-dir {out} --name s2 "):  # its training process dies with it
        assert time.monotonic() < deadline, "run s2's dml train outlived the killed experiment"
        time.sleep(0.05)
    assert not (out / "s3").exists()

    assert subprocess.run(command, capture_output=True).returncode == 0
    for name in ("s1", "s2", "s3"):
        assert [r["epoch"] for r in metrics(out / name) if r["node"] == "ensemble"] == [1, 2, 3, 4]
    started = {name: commands(out / "logs" / f"{name}.log") for name in ("s1", "s2", "s3")}
    assert len(started["s1"]) == 1 and len(started["s3"]) == 1  # finished before the kill: not run again
    assert len(started["s2"]) == 2 and started["s2"][1].endswith("--resume")  # continued, not restarted
    # every run equals an uninterrupted one
    reference = tmp_path / "reference"
    plan2 = write_plan(tmp_path, cifar_root, "[grid]\nseed = [2]\n", epochs=4, name="one.toml")
    assert main(["experiment", str(plan2), "--out-dir", str(reference), "--no-progress"]) == 0
    assert metrics(reference / "one") == metrics(out / "s2")  # a one-run plan names its run after the file


@pytest.mark.processes
def test_two_jobs_run_side_by_side_sharing_the_cores(cifar_root, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the experiment sets it for its runs
    plan = write_plan(tmp_path, cifar_root, "[grid]\nseed = [1, 2]\n", epochs=6)
    out = tmp_path / "two"
    most = []  # the most dml train processes alive at once, watched beside the plan
    finished = threading.Event()
    watcher = threading.Thread(target=lambda: most.append(_most_at_once(str(out), finished)))
    watcher.start()
    try:
        assert main(["experiment", str(plan), "--out-dir", str(out), "--jobs", "2", "--no-progress"]) == 0
    finally:
        finished.set()
        watcher.join()
    assert most == [2]
    for name in ("s1", "s2"):
        assert [r["epoch"] for r in metrics(out / name) if r["node"] == "ensemble"] == [1, 2, 3, 4, 5, 6]
        threads = json.loads((out / name / "config.json").read_text())["threads"]
        assert threads == max(1, (os.cpu_count() or 1) // 2)


@pytest.mark.processes
def test_sigterm_stops_the_plan_at_an_epoch_boundary_and_the_same_command_finishes_it(cifar_root, tmp_path):
    plan = write_plan(tmp_path, cifar_root, "[grid]\nseed = [1, 2]\n", epochs=4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dml", "experiment", str(plan), "--out-dir", str(out), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "s1" / "metrics.jsonl").exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert process.stderr.read().strip().splitlines()[-1].startswith("error: stopped by SIGTERM; every run keeps")
    assert "stopped by SIGTERM" in (out / "logs" / "s1.log").read_text()  # the run itself stopped cleanly
    assert subprocess.run(command, capture_output=True).returncode == 0
    for name in ("s1", "s2"):
        assert [r["epoch"] for r in metrics(out / name) if r["node"] == "ensemble"] == [1, 2, 3, 4]


def test_list_settings_in_a_grid_and_search_become_lists(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("""
[defaults]
val_samples = 100
[grid]
models = ["resnet20", ["resnet20", "wrn28_2"]]
num_nodes = [2]
[search]
lr = { low = 0.01, high = 0.2 }
""")
    plan = read_plan(path, tmp_path / "out")
    assert [r.settings["models"] for r in plan.runs] == [["resnet20"], ["resnet20", "wrn28_2"]]
    assert [r.name for r in plan.runs] == ["resnet20", "resnet20-wrn28_2"]


@pytest.mark.parametrize("body, message", [
    ("baseline = 'a'\n[grid]\nlr = [0.1, 0.2]\n[[run]]\nlabel = 'a'", "the grid also varies lr"),
    ("[[run]]\nlabel = 'a'\nteacher = '{run:b.c}/0_resnet32/best.pt'", "{run:b.c}"),
    ("[[run]]\nlabel = 'plots'", "'plots' cannot name a run folder"),
    ("[defaults]\nteacher = []", "teacher must name at least one"),
    ("run = []", "run must be a non-empty array"),
    ("[search]\nupdate = { low = 'a', high = 'b' }", "update is not a number"),
])
def test_more_plan_mistakes(tmp_path, body, message):
    path = tmp_path / "p.toml"
    path.write_text(body + "\n")
    with pytest.raises(UserError, match=re.escape(message)):
        read_plan(path, tmp_path / "out")


def test_a_default_written_out_is_not_a_change_but_another_teacher_is(tmp_path):
    from dml.plan import differences

    assert differences({"r": {"seed": 1}}, {"r": {"seed": 1, "lr": 0.1, "progress": False}}) == []
    assert differences({"r": {"teacher": ["a/best.pt"]}}, {"r": {"teacher": ["b/best.pt"]}}) == [
        "run r: teacher ['a/best.pt'] -> ['b/best.pt']"]


def test_the_plans_in_the_docs_read_as_documented(tmp_path):
    root = Path(__file__).resolve().parents[1]
    blocks = {}
    for readme in (root / "docs" / "experiments.md", root / "examples" / "CIFAR100" / "README.md"):
        for block in readme.read_text().split("```toml\n")[1:]:
            block = block.split("```", 1)[0]
            if "[defaults]" in block:
                blocks[readme.parent.name] = block
    assert set(blocks) == {"docs", "CIFAR100"}
    (tmp_path / "main.toml").write_text(blocks["docs"])
    plan = read_plan(tmp_path / "main.toml", tmp_path / "out")
    assert [r.name for r in plan.runs] == [f"{label}_s{s}" for label in ("alone", "dml", "kd", "teacher")
                                           for s in (0, 1, 2)]
    assert plan.runs[6].after == ["teacher_s0"] and [r.name for r in plan.baseline_runs()] == ["alone_s0", "alone_s1",
                                                                                                "alone_s2"]
    assert plan.published["dml"] == 72.12
    (tmp_path / "small.toml").write_text(blocks["CIFAR100"])
    small = read_plan(tmp_path / "small.toml", tmp_path / "out")
    assert [(r.name, r.peers, r.epochs) for r in small.runs] == [("alone_s0", 1, 4), ("alone_s1", 1, 4),
                                                                  ("dml_s0", 2, 4), ("dml_s1", 2, 4)]


def test_a_ramps_length_and_a_temporal_means_graph_are_searchable(cifar_root, tmp_path):
    """dml tune's [search]: the ramp length is a number range; the decay of a temporal mean is in its
    graph file, so graph files are the choices."""
    from dml.plan import read_plan

    graphs = Path(__file__).resolve().parents[1] / "examples" / "graphs"
    choices = []
    for decay in ("0.99", "0.999"):
        choices.append(tmp_path / f"pcl_{decay}.toml")
        choices[-1].write_text((graphs / "pcl_style.toml").read_text().replace("decay = 0.999", f"decay = {decay}"))
    ramp = read_plan(write_plan(tmp_path, cifar_root, 'num_nodes = 2\nkd_ramp = "sigmoid"\n'
                                "[search]\nkd_ramp_epochs = { low = 0.5, high = 2.0 }\n", name="ramp.toml"),
                     tmp_path / "out")
    assert ramp.search == {"kd_ramp_epochs": {"low": 0.5, "high": 2.0}}
    listed = ", ".join(f'"{path}"' for path in choices)
    means = write_plan(tmp_path, cifar_root, f"[search]\ngraph = {{ choices = [{listed}] }}\n", name="means.toml")
    means.write_text(means.read_text().replace('models = "resnet20"\n', ""))  # the graph files give the peers
    means = read_plan(means, tmp_path / "out")
    assert means.search == {"graph": {"choices": [str(path) for path in choices]}}


@pytest.mark.parametrize("search, message", [
    ("kd_ramp_epochs = { low = 0.0, high = 2.0 }", "--kd-ramp-epochs must be a positive"),
    ("temperature = { choices = [2.0, -1.0] }", "--temperature must be a positive"),
])
def test_a_search_range_whose_end_makes_a_bad_run_is_refused_before_any_trial(cifar_root, tmp_path, search, message):
    from dml.plan import read_plan

    plan = write_plan(tmp_path, cifar_root, f'num_nodes = 2\nkd_ramp = "sigmoid"\n[search]\n{search}\n')
    with pytest.raises(UserError) as caught:
        read_plan(plan, tmp_path / "out")
    assert message in str(caught.value) and "[search]" in str(caught.value), caught.value


def test_the_online_kd_table_plan_reads_with_its_step_schedule_and_published_numbers(tmp_path):
    folder = Path(__file__).resolve().parents[1] / "examples" / "CIFAR100"
    cwd = os.getcwd()
    os.chdir(folder)  # its graph paths are relative to its folder, where it is run from
    try:
        plan = read_plan(folder / "online-kd-table.toml", tmp_path)
    finally:
        os.chdir(cwd)
    assert len(plan.runs) == 27 and all(run.settings["lr_milestones"] == [150, 225] for run in plan.runs)
    assert plan.published["okddip"] == 73.25 and plan.published["source"].startswith("PCL")


@pytest.mark.parametrize("body, message", [
    ('[[run]]\nlabel = "a"\n[published]\nb = 70.0\n', "[published]: 'b' is not the label of a [[run]]"),
    ('[[run]]\nlabel = "a"\n[published]\na = "high"\n', "a = 'high' is not an accuracy in percent"),
    ('[[run]]\nlabel = "a"\nlr_milestones = ["x"]\n', "lr_milestones must be a list of integers"),
    ('[[run]]\nlabel = "a"\nlr_milestones = [2]\n', "--lr-milestones must be increasing epochs between 1 and"),
])
def test_plan_mistakes_with_published_numbers_and_milestones_are_one_line(cifar_root, tmp_path, body, message):
    plan = write_plan(tmp_path, cifar_root, body)
    with pytest.raises(UserError, match=re.escape(message)):
        read_plan(plan, tmp_path / "out")
