"""The command line of `dml train` is generated from TrainConfig: every setting has its flag."""

import dataclasses

from dml.cli import build_parser, config_from_args
from dml.config import TrainConfig

# A value other than the default for every setting, as flags.
ARGV = ["train", "--models", "resnet20", "wrn28_2", "--num-nodes", "2", "--dataset", "folder", "--image-size", "24",
        "--epochs", "7", "--batch-size", "16", "--lr", "0.05", "--wd", "0.001", "--momentum", "0.8", "--no-nesterov",
        "--temperature", "3", "--kl-weight", "0.5", "--update", "sequential", "--seed", "9", "--device", "cpu",
        "--precision", "fp32", "--plain", "--train-samples", "640", "--test-samples", "100", "--val-samples", "300",
        "--data-dir", "d",
        "--out-dir", "o", "--name", "n", "--skip-checksum", "--no-download", "--download-url", "http://127.0.0.1/x",
        "--no-progress", "--check-batches"]


def test_every_setting_has_a_flag_and_reaches_the_config():
    config = config_from_args(build_parser().parse_args(ARGV))
    expected = TrainConfig(
        models=["resnet20", "wrn28_2"], num_nodes=2, dataset="folder", image_size=24, epochs=7, batch_size=16,
        lr=0.05, wd=0.001, momentum=0.8, nesterov=False, temperature=3.0, kl_weight=0.5, update="sequential",
        seed=9, device="cpu", precision="fp32", plain=True, train_samples=640, test_samples=100, val_samples=300, data_dir="d",
        out_dir="o", name="n", skip_checksum=True, download=False, download_url="http://127.0.0.1/x",
        progress=False, check_batches=True)
    assert config == expected
    defaults = TrainConfig()
    changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != getattr(defaults, f.name)}
    # ARGV sets every one of them but the graph's: --teacher and --graph replace --models
    # (tests/test_graph.py passes them), and graph_spec, which they resolve to, has no flag.
    graph_settings = {"teacher", "graph", "graph_spec"}
    assert changed == {f.name for f in dataclasses.fields(TrainConfig)} - graph_settings


def test_defaults_of_the_command_line_are_the_configs():
    assert config_from_args(build_parser().parse_args(["train"])) == TrainConfig()
