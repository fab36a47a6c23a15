"""The seed's example scripts accept the seed's flags and produce the documented run directories."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "CIFAR100"
TINY = ["--train-samples", "128", "--test-samples", "100", "--batch-size", "32", "--epochs", "1",
        "--skip-checksum", "--no-download", "--no-progress"]


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
