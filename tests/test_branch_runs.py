"""Branches on a shared trunk through `dml train`: graph files with [[trunk]], exact resume, each branch's
best.pt a standalone network, one schedule per trunk, and one error line per mistake."""

import json
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

from dml.cli import main
from dml.evaluate import load_model
from dml.graph import read_graph
from dml.models import create_model
from tiny_run import metrics as _metrics
from tiny_run import tiny_flags, train

GRAPHS = Path(__file__).resolve().parents[1] / "examples" / "graphs"
_train = partial(train, tiny=tiny_flags(train=64, test=50))
RUN = "graph-one_resnet20_s42"


def _graph(tmp_path, text, name="one.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def one(tmp_path):
    """ONE's example graph with ResNet-20 branches (the gate is peer 3)."""
    return _graph(tmp_path, (GRAPHS / "one.toml").read_text().replace("resnet32", "resnet20"))


def test_the_method_graphs_read_as_trunks_of_branches():
    one, cl = read_graph(GRAPHS / "one.toml"), read_graph(GRAPHS / "cl_ilr.toml")
    assert one["trunks"] == [{"model": "resnet32", "first": 0, "branches": 3, "shared": 2, "trunk_gradient": "sum",
                              "teacher": "one"}]
    assert [(p["name"], p["model"]) for p in one["peers"]] == [
        ("b1", "resnet32"), ("b2", "resnet32"), ("b3", "resnet32"), ("gate", "one")]
    assert {(lk["source"], lk["target"], lk["temperature"], lk["gate"]) for lk in one["links"] if lk["source"] == 3} \
        == {(3, k, 3.0, "sigmoid_ramp") for k in range(3)} | {(3, 3, 1.0, "through")}  # the gate's own CE
    assert cl["trunks"][0]["trunk_gradient"] == "mean" and cl["trunks"][0]["teacher"] is None
    okddip, ffl = read_graph(GRAPHS / "okddip.toml"), read_graph(GRAPHS / "ffl.toml")
    assert [p["name"] for p in okddip["peers"]] == ["p1", "p2", "p3", "leader", "target1", "target2", "target3"]
    assert {(lk["source"] if isinstance(lk["source"], int) else tuple(lk["source"]), lk["target"], lk["weight"],
             lk.get("detach", True)) for lk in okddip["links"]} == {
        *((k, k, 1.0, True) for k in range(4)), *((k, k, 0.0, True) for k in range(4, 7)),
        *((4 + k, k, 1.0, False) for k in range(3)), ((0, 1, 2), 3, 1.0, False)}
    assert [p["name"] for p in ffl["peers"]] == ["b1", "b2", "fusion"]
    assert {(tuple(lk["source"]) if isinstance(lk["source"], list) else lk["source"], lk["target"])
            for lk in ffl["links"]} == {(0, 0), (1, 1), (2, 2), (2, 0), (2, 1), ((0, 1), 2)}
    assert {(lk["source"], lk["target"], lk["weight"]) for lk in cl["links"]} == \
        {*((k, k, 0.5) for k in range(3)), *(("others", k, 0.5) for k in range(3))}


@pytest.mark.parametrize("method, teachers", [("one", ["3_one"]), ("okddip", ["4_okddip", "5_okddip", "6_okddip"]),
                                               ("ffl", ["2_ffl"]), ("cl_ilr", []), ("pcl", ["3_pcl"])])
def test_every_trunk_graph_resumes_exactly_with_one_schedule_step_per_epoch(cifar_root, tmp_path, method, teachers):
    graph = _graph(tmp_path, (GRAPHS / f"{method}.toml").read_text().replace("resnet32", "resnet20"), f"{method}.toml")
    args = ["--graph", str(graph), "--epochs", "3"]
    assert _train(cifar_root, tmp_path / "straight", *args) == 0
    assert _train(cifar_root, tmp_path / "split", *args, "--stop-after", "1") == 0
    assert _train(cifar_root, tmp_path / "split", *args, "--resume") == 0
    run = f"graph-{method}_resnet20_s42"
    straight, split = tmp_path / "straight" / run, tmp_path / "split" / run
    records = _metrics(straight)
    assert records == _metrics(split)
    # one cosine step per epoch (one per peer would reach 0 after the first epoch)
    assert [r["lr"] for r in records if r["node"] == 0] == pytest.approx([0.1, 0.075, 0.025])
    folders = sorted(p.name for p in straight.iterdir() if (p / "last.pt").exists())
    assert [f for f in folders if not f.endswith("resnet20")] == teachers
    for folder in folders:
        a = torch.load(straight / folder / "last.pt", weights_only=True)["model"]
        b = torch.load(split / folder / "last.pt", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_branches_share_the_trunk_and_only_the_trunk(cifar_root, tmp_path, one):
    assert _train(cifar_root, tmp_path, "--graph", str(one), "--epochs", "1") == 0
    straight = tmp_path / RUN
    # the branches share the trunk and only the trunk
    b0 = torch.load(straight / "0_resnet20" / "last.pt", weights_only=True)["model"]
    b1 = torch.load(straight / "1_resnet20" / "last.pt", weights_only=True)["model"]
    assert torch.equal(b0["conv1.weight"], b1["conv1.weight"]) and torch.equal(b0["blocks.5.conv2.weight"],
                                                                               b1["blocks.5.conv2.weight"])
    assert not torch.equal(b0["blocks.6.conv1.weight"], b1["blocks.6.conv1.weight"])


def test_a_branchs_best_pt_is_a_standalone_network_at_its_logged_accuracy(cifar_root, tmp_path, one, capsys):
    assert _train(cifar_root, tmp_path, "--graph", str(one), "--epochs", "2") == 0
    run = tmp_path / RUN
    best = torch.load(run / "1_resnet20" / "best.pt", weights_only=True)
    assert best["model"].keys() == create_model("resnet20", 10).state_dict().keys()
    logged = next(r for r in _metrics(run) if r["node"] == 1 and r["epoch"] == best["epoch"])["test_acc"]
    assert type(load_model(run / "1_resnet20" / "best.pt", torch.device("cpu")).model).__name__ == "CifarResNet"
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run / "1_resnet20" / "best.pt"), "--data-dir", str(cifar_root), "--skip-checksum",
                 "--no-download", "--test-samples", "50", "--json", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["checkpoints"][0]["top1"] == pytest.approx(logged)
    # the run's ensemble is the branches' mean softmax (the gate, an ensemble itself, is left out)
    lasts = [str(run / f"{k}_resnet20" / "last.pt") for k in range(3)]
    assert main(["evaluate", *lasts, "--data-dir", str(cifar_root), "--skip-checksum", "--no-download",
                 "--test-samples", "50", "--json", str(out)]) == 0
    ensemble = next(r for r in _metrics(run) if r["node"] == "ensemble" and r["epoch"] == 2)["test_acc"]
    assert json.loads(out.read_text())["ensemble"]["top1"] == pytest.approx(ensemble)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "3_one (learned teacher)" in capsys.readouterr().out
    # the gate computes from the branches: it is no network of its own
    assert main(["evaluate", str(run / "3_one" / "best.pt"), "--data-dir", str(cifar_root), "--skip-checksum"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "learned teacher (one)" in err, err


def test_a_branch_teaches_a_student_as_any_resnet_does(cifar_root, tmp_path, one):
    assert _train(cifar_root, tmp_path / "one", "--graph", str(one), "--epochs", "1") == 0
    branch = tmp_path / "one" / RUN / "2_resnet20" / "best.pt"
    assert _train(cifar_root, tmp_path / "kd", "--models", "resnet20", "--teacher", str(branch), "--epochs", "1") == 0
    assert (tmp_path / "kd" / "kd_resnet20_from_resnet20_s42" / "0_resnet20" / "last.pt").exists()


TRUNK = """
[[trunk]]
model = "resnet20"
branches = ["b1", "b2"]
"""


@pytest.mark.parametrize("text, args, message", [
    ('[[trunk]]\nmodel = "resnet20"\nbranches = ["b1"]\n', [], "branches lists the branches' peer names, at least 2"),
    ('[[trunk]]\nbranches = ["b1", "b2"]\n', [], "trunk 1 needs a model"),
    (TRUNK + "shared = 3\n", [], "shared is the number of stages the trunk holds, 1 to 2"),
    (TRUNK + 'teacher = "okd"\n', [], "teacher 'okd' is not one of: one, okddip, ffl"),
    (TRUNK + 'teacher = "okddip"\n', [], "OKDDip needs at least 3 branches"),
    (TRUNK + 'views = "yes"\n', [], "views must be true or false"),
    (TRUNK + 'views = true\n' + TRUNK.replace('"b1", "b2"', '"c1", "c2", "c3"') + 'views = true\n', [],
     "trunks with views see one augmentation of the batch per branch: give them the same number of branches"),
    (TRUNK + '[[peer]]\nname = "c"\nmodel = "resnet20"\n[[link]]\nsource = "c"\ntarget = "b1"\ndetach = false\n', [],
     "a link into 'b1' has detach = false: its source must be peers of the target's own [[trunk]]"),
    (TRUNK + '[[link]]\nsource = ["b1", "x"]\ntarget = "b2"\n', [], "unknown source peer(s) 'x'"),
    (TRUNK + '[[link]]\nsource = "b1"\ntarget = "b2"\ndetach = "no"\n', [], "detach must be true or false"),
    (TRUNK + 'trunk_gradient = "max"\n', [], "trunk_gradient 'max' is not one of: sum, mean"),
    (TRUNK + 'teacher_name = "t"\n', [], "teacher_name names a learned teacher"),
    (TRUNK + 'width = 2\n', [], "trunk 1 has unknown key(s) width"),
    (TRUNK.replace("resnet20", "mlp_for_tests:build"), [], "cannot be split into a trunk and branches"),
    (TRUNK + '[[peer]]\nname = "b1"\nmodel = "resnet20"\n', [], "peer name 'b1' is used twice"),
    (TRUNK + 'teacher = "one"\n[[peer]]\nname = "m"\nema_of = "teacher"\n', [],
     "peer 'm' is the mean of 'teacher', a learned teacher of a [[trunk]]"),
    (TRUNK + '[[link]]\nsource = "teacher"\ntarget = "b1"\n', [], "unknown source 'teacher'"),
    (TRUNK, ["--update", "sequential"], "branches on a shared trunk train with --update simultaneous"),
    (TRUNK, ["--data-parallel", "2"], "--data-parallel 2 needs 2 or more processes"),
    (TRUNK, ["--procs", "2"], "--procs must be between 1 and the 1 peers that are not a trunk's later branches"),
])
def test_each_mistake_with_a_trunk_is_one_error_line(cifar_root, tmp_path, capsys, monkeypatch, text, args, message):
    (tmp_path / "mlp_for_tests.py").write_text(
        "import torch\ndef build(num_classes):\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(3072, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _graph(tmp_path, text, "bad.toml")
    assert _train(cifar_root, tmp_path / "runs", "--graph", str(path), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()
