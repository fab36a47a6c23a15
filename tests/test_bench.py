"""`dml bench`: records of the documented shape, both loops run, user errors."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dml
import dml.bench
from dml.bench import PerImageAugmentDataset, matmul_peak_gflops, step_flops
from dml.cli import main
from dml.models import create_model

GRAPHS = Path(__file__).resolve().parents[1] / "examples" / "graphs"
KEYS = {"device", "precision", "threads", "processes", "model", "nodes", "engine_img_s", "reference_img_s",
        "speedup", "mfu", "peak_gflops"}


def test_bench_writes_a_record_per_cohort_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "resnet20", "--num-nodes", "1,2", "--steps", "2", "--warmup", "1",
                 "--workers", "0", "--precision", "fp32", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["nodes"] for r in records] == [1, 2]
    for r in records:
        assert set(r) == KEYS
        assert r["processes"] == 1 and r["precision"] == "fp32" and r["model"] == "resnet20"
        # mfu > 0 only: its ratio to the peak depends on what else the machine does while it is measured
        assert r["engine_img_s"] > 0 and r["reference_img_s"] > 0 and r["mfu"] > 0
        assert r["speedup"] == pytest.approx(r["engine_img_s"] / r["reference_img_s"], rel=0.01)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("device | precision") and len(table) == 3


def test_bench_measures_a_graph_files_cohort_beside_dml(tmp_path, capsys):
    """ONE's graph (3 ResNet-20 branches and the gate) in one more row, counted as 3 trained networks."""
    graph = tmp_path / "one.toml"
    graph.write_text((GRAPHS / "one.toml").read_text().replace("resnet32", "resnet20"))
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "resnet20", "--num-nodes", "3", "--steps", "2", "--warmup", "1", "--repeats", "1",
                 "--no-reference", "--precision", "fp32", "--graph", str(graph), "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["model"], r["nodes"], r["reference_img_s"]) for r in records] == [
        ("resnet20", 3, None), ("graph one.toml", 3, None)]
    assert all(r["engine_img_s"] > 0 and r["mfu"] > 0 for r in records)
    assert records[1]["mfu"] != records[0]["mfu"]  # its FLOPs count the trunk once


def test_bench_of_the_plain_path_leaves_the_thread_settings_as_they_were(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    assert main(["bench", "--models", "resnet20", "--nodes", "2", "--steps", "2", "--warmup", "1", "--no-reference",
                 "--plain", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["precision"] == "fp32" and record["reference_img_s"] is None and record["engine_img_s"] > 0
    assert main(["bench", "--models", "resnet20", "--nodes", "2", "--steps", "2", "--warmup", "1", "--no-reference",
                 "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["precision"] == "bf16"
    assert torch.get_num_threads() == threads  # peer threads give the caller's threads back


@pytest.mark.processes  # --procs 2: two benchmark processes
def test_bench_over_two_processes(tmp_path):
    out = tmp_path / "bench.json"
    environment = dict(os.environ)
    assert main(["bench", "--models", "resnet20", "--nodes", "2", "--steps", "2", "--warmup", "1",
                 "--procs", "2", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["processes"] == 2 and record["threads"] == 1 and record["reference_img_s"] is None
    assert record["engine_img_s"] > 0
    # The launcher's settings (OMP_NUM_THREADS=1, ...) must not leak into later runs of this process.
    assert dict(os.environ) == environment


def test_reference_dataset_augments_like_the_seed():
    torch.manual_seed(0)
    images = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    data = PerImageAugmentDataset(images, torch.zeros(1, dtype=torch.long))
    padded_columns = []
    for _ in range(200):
        img, _ = data[0]
        assert img.shape == (3, 32, 32)
        bright = img[0] > 0  # padding normalises to -mean/std < 0, the white image to > 0
        padded_columns.append(32 - int(bright.any(0).sum()))
    # crop offsets 0..8 in x expose 0..4 padded columns
    assert set(padded_columns) == {0, 1, 2, 3, 4}


def test_matmul_peak_is_the_flops_of_one_product_over_its_best_time(monkeypatch):
    # A clock that makes the timed products take 4, 2 and 3 s: the best is 2 s for 2 * 2048^3 FLOPs.
    ticks = iter([0.0, 4.0, 10.0, 12.0, 20.0, 23.0])
    monkeypatch.setattr(dml.bench.time, "perf_counter", lambda: next(ticks))
    assert matmul_peak_gflops(torch.device("cpu"), "fp32", repeats=3) == pytest.approx(2 * 2048**3 / 2 / 1e9)


def test_step_flops_count_forward_and_backward_of_every_local_peer():
    """A linear classifier on a flattened 3x32x32 batch of B: forward 2*B*3072*C FLOPs; backward as many
    again (the weight gradient; the input needs none), for each of the 2 peers."""
    batch, classes = 8, 10

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, classes, bias=False)

        def forward(self, x):
            return self.fc(x.flatten(1))

    models = [Linear(), Linear()]
    with dml.Cohort(models, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models], device="cpu") as cohort:
        assert step_flops(cohort, batch, torch.device("cpu")) == 2 * 2 * (2 * batch * 3072 * classes)


def test_step_flops_count_a_shared_trunk_once():
    """Three ResNet-20 branches on a trunk of the stem and stages 1-2 cost the trunk once and stage 3 and the
    classifier three times: the FLOPs of one whole network plus two more of its stage 3 and classifier."""
    def flops(models):
        with dml.Cohort(models, [torch.optim.SGD(m.parameters(), lr=0.1) for m in models], device="cpu",
                        plain=True) as cohort:
            return step_flops(cohort, 4, torch.device("cpu"))

    def tail_flops():  # stage 3 and the classifier of one network, forward and backward, on a trunk's output
        net = create_model("resnet20", 100)
        h = net.trunk(torch.randn(4, 3, 32, 32), 2).detach().requires_grad_()  # its gradient flows to the trunk
        counter = FlopCounterMode(display=False)
        with counter:
            torch.nn.functional.cross_entropy(net.fc(net.tail(h, 2).mean((2, 3))), torch.zeros(4, dtype=torch.long)
                                              ).backward()
        return counter.get_total_flops()

    one = flops([create_model("resnet20", 100)])
    assert flops([dml.Branches([create_model("resnet20", 100) for _ in range(3)])]) == one + 2 * tail_flops()


@pytest.mark.parametrize("args, expected", [
    (["--num-nodes", "1,x"], "--num-nodes must be comma-separated integers"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--models", "resnet20", "wrn28_2", "--nodes", "1,2"], "--num-nodes must be 2"),  # the old spelling works
    (["--models", "nope"], "unknown model 'nope'"),
    (["--num-nodes", "1,2", "--procs", "2"], "--procs 2 exceeds the smallest cohort"),
    (["--graph", "missing.toml"], "graph file missing.toml does not exist"),
    (["--num-nodes", "2", "--procs", "2", "--graph", str(GRAPHS / "one.toml")], "--graph is measured in one process"),
])
def test_bench_user_errors(args, expected, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


def test_the_input_pipeline_alone_is_timed_with_and_without_workers(tmp_path, capsys):
    from test_folder import write_folder

    write_folder(tmp_path / "images", size=40, per_class=(12, 2))
    assert main(["bench", "--input-pipeline", str(tmp_path / "images"), "--image-size", "24", "--batch-size", "4",
                 "--steps", "3", "--warmup", "1", "--workers", "2", "--json", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["workers"] for r in rows] == [0, 2] and all(r["img_s"] > 0 for r in rows)
    assert rows[1]["img_s_per_process"] == pytest.approx(rows[1]["img_s"] / 2, abs=0.1)
    assert capsys.readouterr().out.splitlines()[0].startswith("decoding processes | images/s")
    assert main(["bench", "--input-pipeline", str(tmp_path / "images"), "--batch-size", "32"]) == 2
    assert "fewer than --batch-size x (--steps + --warmup)" in capsys.readouterr().err
    assert main(["bench", "--input-pipeline", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: ")

