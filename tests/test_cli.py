"""The command line: `dml train` is generated from TrainConfig (every setting has its flag); help and usage
mistakes say what is true."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from dml.cli import build_parser, config_from_args, main
from dml.config import TrainConfig
from dml.errors import UserError

# A value other than the default for every setting, as flags.
ARGV = ["train", "--models", "resnet20", "wrn28_2", "--num-nodes", "2", "--dataset", "folder", "--image-size", "24",
        "--epochs", "7", "--batch-size", "16", "--lr", "0.05", "--lr-milestones", "3", "5", "--lr-gamma", "0.2",
        "--wd", "0.001", "--momentum", "0.8", "--no-nesterov",
        "--temperature", "3", "--kl-weight", "0.5", "--kd-ramp", "linear", "--kd-ramp-epochs", "2.5",
        "--update", "sequential", "--seed", "9", "--device", "cpu",
        "--precision", "fp32", "--plain", "--threads", "3", "--train-samples", "640", "--test-samples", "100", "--val-samples", "300",
        "--data-dir", "d",
        "--out-dir", "o", "--name", "n", "--skip-checksum", "--no-download", "--download-url", "http://127.0.0.1/x",
        "--no-progress", "--check-batches", "--data-parallel", "2", "--local-batchnorm", "--data-loader", "stream",
        "--workers", "2", "--no-augment"]


def test_every_setting_has_a_flag_and_reaches_the_config():
    config = config_from_args(build_parser().parse_args(ARGV))
    expected = TrainConfig(
        models=["resnet20", "wrn28_2"], num_nodes=2, dataset="folder", image_size=24, epochs=7, batch_size=16,
        lr=0.05, lr_milestones=[3, 5], lr_gamma=0.2, wd=0.001, momentum=0.8, nesterov=False, temperature=3.0, kl_weight=0.5, kd_ramp="linear",
        kd_ramp_epochs=2.5, update="sequential",
        seed=9, device="cpu", precision="fp32", plain=True, threads=3, train_samples=640, test_samples=100, val_samples=300, data_dir="d",
        out_dir="o", name="n", skip_checksum=True, download=False, download_url="http://127.0.0.1/x",
        progress=False, check_batches=True, data_parallel=2, local_batchnorm=True, data_loader="stream", workers=2,
        augment=False)
    assert config == expected
    defaults = TrainConfig()
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}
    # ARGV sets every one of them but the graph's: --teacher (with --teacher-model) and --graph replace
    # --models (tests/test_graph.py passes them), and graph_spec, which they resolve to, has no flag.
    graph_settings = {"teacher", "teacher_model", "graph", "graph_spec"}
    assert changed == {f.name for f in dataclasses.fields(TrainConfig)} - graph_settings


def test_defaults_of_the_command_line_are_the_configs():
    assert config_from_args(build_parser().parse_args(["train"])) == TrainConfig()


def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, flag: str) -> str:
    """The help entry of ``flag`` (its option line and the indented lines below it), on one line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(",")[0].split()[:1] == [flag])
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("   "):  # continuation lines are indented further than the next option
            break
        entry.append(line)
    return " ".join(" ".join(entry).split())


@pytest.mark.parametrize("command, flag", [
    ("train", "--no-download"), ("train", "--no-progress"), ("train", "--no-nesterov"), ("train", "--plain"),
    ("train", "--skip-checksum"), ("train", "--resume"), ("bench", "--no-reference"), ("bench", "--plain"),
])
def test_switches_show_no_default(capsys, command, flag):
    # "--no-download ... (default: True)" read as if downloads were off by default
    entry = option_help(help_text(capsys, command), flag)
    assert "default:" not in entry, entry


@pytest.mark.parametrize("command", ["train", "bench"])
def test_defaults_print_as_a_user_types_them_and_only_where_there_is_one(capsys, command):
    text = help_text(capsys, command)
    assert option_help(text, "--models").endswith("(default: resnet32)")
    assert option_help(text, "--batch-size").endswith("(default: 64)")
    assert "None" not in text and "['" not in text and "True" not in text and "False" not in text
    if command == "train":
        assert "default:" not in option_help(text, "--image-size")
        assert option_help(text, "--wd").endswith("(default: 0.0005)")


def test_every_bench_flag_has_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [a.option_strings[0] for a in sub.choices["bench"]._actions if a.option_strings and not a.help]
    assert missing == []


def test_bench_takes_num_nodes_as_train_does_and_still_nodes(capsys):
    assert build_parser().parse_args(["bench", "--num-nodes", "2,4"]).nodes == "2,4"
    assert build_parser().parse_args(["bench", "--nodes", "1"]).nodes == "1"
    assert option_help(help_text(capsys, "bench"), "--num-nodes").endswith("(default: 1,2,4)")


def test_an_unknown_flag_points_to_the_commands_help(capsys):
    assert main(["train", "--frobnicate"]) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --frobnicate (see 'dml train --help')\n"


def test_dml_alone_lists_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dml")
    for command in ("train", "bench", "report", "evaluate", "experiment", "tune"):
        assert f"\n    {command} " in err, err


@pytest.mark.parametrize("argv, flag", [
    (["train", "--temp", "2"], "--temp"),
    (["train", "--epoch", "1"], "--epoch"),
    (["train", "--num-node", "2"], "--num-node"),
    (["bench", "--step", "2"], "--step"),
    (["evaluate", "x.pt", "--test-sample", "10"], "--test-sample"),
    (["report", "runs", "--base", "b"], "--base"),
    (["experiment", "plan.toml", "--dry"], "--dry"),
    (["tune", "plan.toml", "--trials", "2", "--out", "d"], "--out"),
])
def test_abbreviated_flags_are_refused(argv, flag):
    # --temp taken for --temperature today would change meaning when a --temp... flag is added
    with pytest.raises(UserError, match=f"unrecognized arguments: {flag}"):
        build_parser().parse_args(argv)


def test_an_abbreviated_flag_is_one_error_line(tmp_path, capsys):
    # --no-download and an empty --data-dir keep the old code, which took --temp, from training
    assert main(["train", "--temp", "2", "--no-download", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --temp 2 (see 'dml train --help')\n"


def test_tune_says_how_to_install_optuna_from_a_checkout(capsys):
    # the package is not on PyPI: pip install 'deep-mutual-learning[tune]' finds nothing
    text = help_text(capsys, "tune")
    assert "deep-mutual-learning[" not in text and "pip install optuna" in " ".join(text.split())


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["report", "--help"], ["evaluate", "--help"],
                                  ["bench", "--help"], ["experiment", "--help"], ["tune", "--help"],
                                  ["train", "--num-nodes", "0"], ["train", "--models", "nope"]])
def test_help_and_argument_errors_answer_before_torch_loads(argv):
    """Torch takes seconds to import: help and a mistyped setting must not wait for it."""
    probe = ("import sys\nfrom dml.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n"
             "    code = stop.code\nprint('torch imported' if 'torch' in sys.modules else 'no torch', code)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert last in ("no torch 0", "no torch 2"), (last, done.stderr[-500:])


def test_the_readmes_flag_table_lists_every_train_flag():
    """The table under Training names every `dml train` flag (argparse's own --help aside)."""
    import argparse
    import re
    from pathlib import Path

    from dml.cli import _train_parser

    sub = argparse.ArgumentParser().add_subparsers()
    _train_parser(sub)
    parser = sub.choices["train"]
    flags = {s for action in parser._actions for s in action.option_strings if s.startswith("--")} - {"--help"}
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    table = text[text.index("| flag | default | meaning |"):]
    table = table[:table.index("\n\n")]
    listed = set(re.findall(r"`(--[a-z-]+)", table))
    assert sorted(flags - listed) == []
