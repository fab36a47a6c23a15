"""The seed's example scripts accept the seed's flags and produce the documented run directories."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dml.tomlfile import read_toml
from tiny_run import tiny_flags  # pytest puts the tests folder on sys.path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "CIFAR100"
TINY = tiny_flags("--epochs", "1", train=128)


@pytest.mark.processes  # runs an example script in its own process
@pytest.mark.parametrize(
    "script, flags, run_name, peers",
    [
        ("independent_train.py", ["--model", "resnet20", "--lr", "0.05", "--wd", "1e-4", "--seed", "7"],
         "independent_resnet20_s7", 1),
        ("dml_train.py", ["--models", "resnet20", "--num-nodes", "2", "--lr", "0.05", "--wd", "1e-4", "--seed", "7"],
         "dml_n2_resnet20_s7", 2),
    ],
)
def test_example_script_runs_with_the_seed_flags(cifar_root, tmp_path, script, flags, run_name, peers):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *flags, *TINY, "--data-dir", str(cifar_root)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / run_name
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["lr"], config["wd"], config["seed"], config["num_nodes"]) == (0.05, 1e-4, 7, peers)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["node"] for r in records if r["node"] != "ensemble") == list(range(peers))


CUSTOM = Path(__file__).resolve().parents[1] / "examples" / "custom"


@pytest.mark.processes  # runs an example script in its own process
def test_custom_library_example_trains_two_peers_of_a_users_network(tmp_path):
    proc = subprocess.run([sys.executable, str(CUSTOM / "train_two_peers.py")], cwd=tmp_path, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(CUSTOM)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("epoch 1: train loss ")
    last = float(lines[-1].rsplit("ensemble ", 1)[1].rstrip("%"))
    assert last > 60.0  # 3 classes: chance is 33 %; the example reaches 90 % or more


@pytest.mark.processes  # runs an example script in its own process
def test_custom_cli_example_trains_a_users_network_on_a_folder(tmp_path):
    env = {**__import__("os").environ, "PYTHONPATH": str(CUSTOM)}
    subprocess.run([sys.executable, str(CUSTOM / "make_images.py"), "demo_images"], cwd=tmp_path, check=True, env=env)
    proc = subprocess.run([sys.executable, "-m", "dml", "train", "--dataset", "folder", "--data-dir", "demo_images",
                           "--models", "mynets:small_cnn", "--num-nodes", "2", "--epochs", "2", "--batch-size", "16",
                           "--lr", "0.05", "--out-dir", "runs", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "dml_n2_folder_mynets-small_cnn_s42"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records if r["node"] != "ensemble"] == ["mynets:small_cnn"] * 4
    # the README's evaluation: the run's image folder, the network imported because --models names it
    proc = subprocess.run([sys.executable, "-m", "dml", "evaluate", *sorted(map(str, run.glob("*/best.pt"))),
                           "--models", "mynets:small_cnn"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"data: folder test split from {tmp_path / 'demo_images'} (the run's --data-dir)"


@pytest.mark.processes  # runs an example script in its own process
def test_custom_branches_example_splits_a_users_network(tmp_path):
    """ONE on mynets.py's SplitCNN as the custom README runs it; a branch's best.pt is a SplitCNN of its own."""
    env = {**__import__("os").environ, "PYTHONPATH": str(CUSTOM)}
    subprocess.run([sys.executable, str(CUSTOM / "make_images.py"), "demo_images"], cwd=tmp_path, check=True, env=env)
    proc = subprocess.run([sys.executable, "-m", "dml", "train", "--dataset", "folder", "--data-dir", "demo_images",
                           "--graph", str(CUSTOM / "one_branches.toml"), "--epochs", "2", "--batch-size", "16",
                           "--lr", "0.05", "--out-dir", "runs", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "graph-one_branches_mynets-split_cnn_s42"
    assert sorted(p.parent.name for p in run.glob("*/best.pt")) == [
        "0_mynets-split_cnn", "1_mynets-split_cnn", "2_mynets-split_cnn", "3_one"]
    best = run / "1_mynets-split_cnn" / "best.pt"
    proc = subprocess.run([sys.executable, "-m", "dml", "evaluate", str(best), "--models", "mynets:split_cnn"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert any(line.startswith(str(best)) and "mynets:split_cnn" in line for line in proc.stdout.splitlines())


@pytest.mark.processes  # runs an example script in its own process
def test_kd_script_refuses_a_missing_teacher(cifar_root, tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "kd_train.py"), "--teacher-model", "resnet20",
                           "--student-model", "resnet20", *TINY, "--data-dir", str(cifar_root)],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: teacher checkpoint runs/independent_resnet20_s42/0_resnet20/best.pt "
                                  "does not exist") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.processes  # runs an example script in its own process
def test_kd_script_distils_the_independent_run_of_the_teacher(cifar_root, tmp_path):
    data = ["--data-dir", str(cifar_root), *TINY]
    subprocess.run([sys.executable, str(EXAMPLES / "independent_train.py"), "--model", "resnet20", *data],
                   cwd=tmp_path, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, str(EXAMPLES / "kd_train.py"), "--teacher-model", "resnet20",
                           "--student-model", "resnet32", "--temperature", "3", "--lr", "0.05", "--wd", "1e-4", *data],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "kd_resnet32_from_resnet20_s42"
    config = json.loads((run / "config.json").read_text())["config"]
    assert (config["lr"], config["wd"], config["temperature"]) == (0.05, 1e-4, 3.0)
    teacher = config["graph_spec"]["peers"][1]
    assert teacher["checkpoint"] == str(tmp_path / "runs" / "independent_resnet20_s42" / "0_resnet20" / "best.pt")
    assert [link for link in config["graph_spec"]["links"] if link["source"] == 1][0]["temperature"] == 3.0


@pytest.mark.processes  # a dml train process per run
def test_seed_table_plan_runs_every_row_on_a_small_scale(cifar_root, tmp_path):
    """examples/CIFAR100/seed-table.toml as it stands, shrunk to 1 epoch, 1 seed and one batch of training images
    (the plan's batch of 64: one step per run; 256 images, 4 steps per run, took 113 s against 97 s on a busy
    2-core machine, where each run's time is mostly its start and its first step)."""
    from dml.plan import read_plan

    source = (EXAMPLES / "seed-table.toml").read_text()
    full = read_plan(EXAMPLES / "seed-table.toml", tmp_path / "full")
    assert len(full.runs) == 21 and {r.settings["epochs"] for r in full.runs} == {200}
    assert [r.name for r in full.runs if r.after] == [f"kd_resnet32_from_wrn28_2_s{s}" for s in range(3)]
    small = source.replace("epochs = 200", "epochs = 1").replace("seed = [0, 1, 2]", "seed = [0]").replace(
        'data_dir = "data"', f'data_dir = "{cifar_root}"\nskip_checksum = true\ndownload = false\n'
                              'train_samples = 64\ntest_samples = 100\nprecision = "fp32"')
    assert small.count("epochs = 1\n") == 1 and "seed = [0]" in small
    plan = tmp_path / "seed-table.toml"
    plan.write_text(small)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "dml", "experiment", str(plan), "--out-dir", str(out),
                             "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = ["independent_resnet32", "dml_n2_resnet32", "dml_n3_resnet32", "dml_n4_resnet32",
             "dml_n2_resnet32-wrn28_2", "independent_wrn28_2", "kd_resnet32_from_wrn28_2"]
    for name in names:
        assert (out / name / "metrics.jsonl").read_text().count('"node": "ensemble"') == 1
    report = (out / "report.md").read_text()
    assert "## Baseline: independent_resnet32" in report and "## DML with 4 nodes: dml_n4_resnet32" in report
    assert "## Knowledge distillation into 1 peer from 1 teacher: kd_resnet32_from_wrn28_2" in report


def test_online_distillation_plan_holds_the_five_methods(monkeypatch, tmp_path):
    """examples/CIFAR100/online-distillation.toml as it stands (read from its folder, as its header says),
    and its graph files the method examples of examples/graphs with ResNet-20 peers."""
    from dml.plan import read_plan

    monkeypatch.chdir(EXAMPLES)
    plan = read_plan(EXAMPLES / "online-distillation.toml", EXAMPLES / "runs" / "never-written")
    assert [(r.name, r.peers) for r in plan.runs] == [
        ("independent_resnet20", 1), ("dml_resnet20", 2), ("dml_sigmoid_ramp_resnet20", 2), ("kdcl_resnet20", 2),
        ("pcl_resnet20", 2)]
    assert {r.settings["epochs"] for r in plan.runs} == {15} and {r.settings["seed"] for r in plan.runs} == {42}
    graphs = EXAMPLES.parent / "graphs"
    assert (EXAMPLES / "online" / "kdcl_resnet20.toml").read_text() == \
        (graphs / "kdcl.toml").read_text().replace("resnet32", "resnet20")
    pcl = tmp_path / "pcl.toml"  # the same graph, its ramp scaled to the plan's 15 epochs
    pcl.write_text((graphs / "pcl_style.toml").read_text().replace("resnet32", "resnet20").replace("= 80.0", "= 6.0"))
    assert read_toml(EXAMPLES / "online" / "pcl_resnet20.toml", "graph file") == read_toml(pcl, "graph file")
    assert not (EXAMPLES / "runs" / "never-written").exists()


def test_small_data_plan_holds_every_method_at_one_recipe(monkeypatch, tmp_path):
    """examples/CIFAR100/small-data.toml as it stands: every method, 3 seeds, 30 epochs on 10,000 images, and its
    graph files the method examples of examples/graphs with ResNet-20 networks, the 80-epoch ramps scaled to 12
    and the temporal means' decay of 1,000 steps to 40."""
    from dml.plan import read_plan

    monkeypatch.chdir(EXAMPLES)
    plan = read_plan(EXAMPLES / "small-data.toml", EXAMPLES / "runs" / "never-written")
    methods = ["independent", "dml", "dml_sigmoid_ramp", "kdcl", "pcl_style", "one", "cl_ilr", "okddip", "ffl", "pcl"]
    assert [r.name for r in plan.runs] == [f"{m}_resnet20_s{s}" for m in methods for s in (42, 1, 2)]
    assert {(r.settings["epochs"], r.settings["train_samples"]) for r in plan.runs} == {(30, 10000)}
    graphs = EXAMPLES.parent / "graphs"
    for method in methods[3:]:
        scaled = tmp_path / f"{method}.toml"
        scaled.write_text((graphs / f"{method}.toml").read_text().replace("resnet32", "resnet20").replace("= 80.0", "= 12.0")
                          .replace("decay = 0.999", "decay = 0.975"))
        assert read_toml(EXAMPLES / "small-data" / f"{method}_resnet20.toml", "graph file") == read_toml(scaled, "graph file")
    assert not (EXAMPLES / "runs" / "never-written").exists()


def test_example_scripts_pass_an_abbreviated_flag_through_whole():
    # dml train refuses abbreviations (their meaning shifts as flags are added); the script must not take
    # --temp for its own --temperature either, but hand it on for dml train to refuse
    spec = importlib.util.spec_from_file_location("kd_train_example", EXAMPLES / "kd_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args, rest = module.parse(["--temp", "3"])
    assert (args.temperature, rest) == (2.0, ["--temp", "3"])


RECORDS = EXAMPLES / "measured" / "small-data"  # each finished run's config.json and metrics.jsonl, as trained


def _summary(markdown: str) -> dict[str, dict[str, str]]:
    """The first table whose header starts like dml report's summary, as {run: {column: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Run | Nodes | Epochs | Seeds |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return {row[0].removesuffix(" (baseline)"): dict(zip(header, row, strict=True)) for row in body}


def test_the_small_data_table_is_what_dml_report_makes_of_the_committed_records(monkeypatch):
    """examples/CIFAR100/README.md's evidence table, cell for cell, against dml report over the run records
    committed beside it: a row whose runs were re-trained must say what they measured."""
    from dml.plan import read_plan
    from dml.report.command import report

    monkeypatch.chdir(EXAMPLES)  # the plan names its graph files relative to it
    plan = read_plan(EXAMPLES / "small-data.toml", EXAMPLES / "runs" / "never-written")
    settings = {run.name: run.settings for run in plan.runs}
    committed = sorted(p.name for p in RECORDS.iterdir())
    assert committed and set(committed) <= set(settings), "every folder is a run of small-data.toml"
    for name in committed:
        config = json.loads((RECORDS / name / "config.json").read_text())["config"]
        assert {k: config[k] for k in ("epochs", "seed", "train_samples")} == \
            {k: settings[name][k] for k in ("epochs", "seed", "train_samples")}
    measured = _summary(report([RECORDS], baseline="independent_resnet20"))
    readme = (EXAMPLES / "README.md").read_text()
    published = _summary(readme[readme.index("### Evidence at convergence"):])
    assert measured.keys() == published.keys()
    for run, cells in measured.items():
        assert cells == {column: published[run][column] for column in cells}, run
    kept = re.search(r"Kept(?: so far)?: (\d+) of the (\d+) runs", readme)
    assert kept and (int(kept[1]), int(kept[2])) == (len(committed), len(plan.runs)), "the text counts the records"
