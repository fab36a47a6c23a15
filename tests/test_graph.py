"""Graphs from the command line: --teacher, --graph files, their errors, and everything else with them
(resume, config.json, report, evaluate, peers over processes)."""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

from dml.cli import main
from dml.graph import links_of, read_graph
from dml.links import ENSEMBLE, Link, Links
from dml.models import create_model
from test_checkpoint import _documented_keys  # pytest puts the tests folder on sys.path
from tiny_run import metrics as _metrics
from tiny_run import tiny_flags, train

TINY = tiny_flags(train=64, test=50)
KD_RUN = "kd_resnet20_from_resnet20_s42"
GRAPHS = Path(__file__).resolve().parents[1] / "examples" / "graphs"


_train = partial(train, tiny=TINY)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def teacher(cifar_root, tmp_path_factory):
    """best.pt of a resnet20 trained for one epoch on the tiny subset."""
    out = tmp_path_factory.mktemp("teacher")
    assert _train(cifar_root, out, "--models", "resnet20", "--epochs", "1") == 0
    return out / "independent_resnet20_s42" / "0_resnet20" / "best.pt"


def _graph(tmp_path, text, name="graph.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_kd_resumes_exactly_never_writes_the_teacher_and_evaluates_it_like_any_peer(cifar_root, tmp_path, teacher,
                                                                                     capsys):
    before = _digest(teacher)
    kd = ["--models", "resnet20", "--teacher", str(teacher), "--temperature", "2", "--epochs", "2"]
    assert _train(cifar_root, tmp_path / "straight", *kd) == 0
    assert _train(cifar_root, tmp_path / "split", *kd, "--stop-after", "1") == 0
    assert _train(cifar_root, tmp_path / "split", *kd, "--resume") == 0
    straight, split = tmp_path / "straight" / KD_RUN, tmp_path / "split" / KD_RUN
    assert _metrics(straight) == _metrics(split)
    a = torch.load(straight / "0_resnet20" / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "0_resnet20" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert _digest(teacher) == before
    assert not list((straight / "1_resnet20").glob("*.pt"))  # no checkpoint of the teacher
    records = _metrics(straight)
    teacher_rows = [r for r in records if r.get("role") == "teacher"]
    assert [r["node"] for r in teacher_rows] == [1, 1]
    assert teacher_rows[0]["test_acc"] == teacher_rows[1]["test_acc"]  # it did not change
    config = json.loads((straight / "config.json").read_text())["config"]
    spec = config["graph_spec"]
    assert spec["peers"][1]["sha256"] == before and spec["peers"][1]["model"] == "resnet20"
    assert {(link["source"], link["target"], link["temperature"]) for link in spec["links"]} == {(0, 0, 1.0), (1, 0, 2.0)}

    # the teacher's logged accuracy is what dml evaluate says of its checkpoint on the same images
    capsys.readouterr()
    assert main(["evaluate", str(teacher), "--data-dir", str(cifar_root), "--skip-checksum", "--no-download",
                 "--test-samples", "50", "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["checkpoints"][0]["top1"] == teacher_rows[0]["test_acc"]

    # the report shows the teacher apart and compares the student with a baseline
    capsys.readouterr()
    assert main(["report", str(straight), "--baseline", str(teacher.parent.parent), "--out",
                 str(tmp_path / "report.md")]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "1_resnet20 (teacher)" in text and "Knowledge distillation into 1 peer from 1 teacher" in text


def test_resume_notices_a_changed_teacher(cifar_root, tmp_path, teacher, capsys):
    own = tmp_path / "teacher.pt"
    own.write_bytes(teacher.read_bytes())
    kd = ["--models", "resnet20", "--teacher", str(own), "--epochs", "2"]
    assert _train(cifar_root, tmp_path, *kd, "--stop-after", "1") == 0
    state = torch.load(own, weights_only=True)
    state["model"]["fc.bias"] += 1.0
    torch.save(state, own)
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, *kd, "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume with a configuration that differs") and "graph_spec" in err


def test_a_graph_file_computes_what_the_shortcuts_compute(cifar_root, tmp_path, teacher):
    dml_file = _graph(tmp_path, (GRAPHS / "dml.toml").read_text().replace("resnet32", "resnet20"), "dml.toml")
    kd_file = _graph(tmp_path, f"""
        [[peer]]
        name = "student"
        model = "resnet20"
        [[peer]]
        name = "teacher"
        checkpoint = "{teacher}"
        [[link]]
        source = "teacher"
        target = "student"
        temperature = 2.0
        """, "kd.toml")
    assert _train(cifar_root, tmp_path / "a", "--graph", str(dml_file), "--epochs", "1") == 0
    assert _train(cifar_root, tmp_path / "a", "--models", "resnet20", "--num-nodes", "2", "--epochs", "1") == 0
    assert _metrics(tmp_path / "a" / "graph-dml_resnet20_s42") == _metrics(tmp_path / "a" / "dml_n2_resnet20_s42")
    assert _train(cifar_root, tmp_path / "b", "--graph", str(kd_file), "--epochs", "1") == 0
    assert _train(cifar_root, tmp_path / "b", "--models", "resnet20", "--teacher", str(teacher), "--temperature", "2",
                  "--epochs", "1") == 0
    assert _metrics(tmp_path / "b" / "graph-kd_resnet20_s42") == _metrics(tmp_path / "b" / KD_RUN)


def test_gated_links_train_and_are_stored(cifar_root, tmp_path):
    path = _graph(tmp_path, """
        combine = "sum"
        [[peer]]
        name = "a"
        model = "resnet20"
        [[peer]]
        name = "b"
        model = "resnet20"
        [[peer]]
        name = "c"
        model = "resnet20"
        [[link]]
        source = "labels"
        target = "a"
        weight = 0.5
        gate = "correct"
        [[link]]
        source = "b"
        target = "a"
        gate = "linear"
        temperature = 3.0
        [[link]]
        source = "c"
        target = "a"
        gate = "correct"
        [[link]]
        source = "a"
        target = "b"
        gate = "cutoff"
        """)
    assert _train(cifar_root, tmp_path, "--graph", str(path), "--epochs", "2", "--update", "sequential") == 0
    run = tmp_path / "graph-graph_resnet20_s42"
    spec = json.loads((run / "config.json").read_text())["config"]["graph_spec"]
    assert spec["combine"] == "sum"
    assert {(lk["source"], lk["target"], lk["gate"], lk["weight"]) for lk in spec["links"]} == {
        (0, 0, "correct", 0.5), (1, 0, "linear", 1.0), (2, 0, "correct", 1.0), (0, 1, "cutoff", 1.0),
        (1, 1, "through", 1.0), (2, 2, "through", 1.0)}
    records = [r for r in _metrics(run) if r["node"] != "ensemble"]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    kd = {(r["epoch"], r["node"]): r["train_kd"] for r in records}
    assert kd[1, 1] == kd[2, 1] == 0.0  # b's only link from another peer is cut off
    assert kd[1, 2] == kd[2, 2] == 0.0  # c learns from the labels alone
    # a learns from c where c is right, and from b (linear gate) only in the last epoch: 0 in the first
    assert kd[2, 0] > kd[1, 0] >= 0.0


def _bad_checkpoint(tmp_path):
    path = tmp_path / "ten_classes.pt"
    torch.save({"model": create_model("resnet20", 10).state_dict(), "model_name": "resnet20", "num_classes": 10},
               path)
    return path


@pytest.mark.parametrize("text, message", [
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "z"\ntarget = "a"\n', "unknown source 'z'"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "t"\ncheckpoint = "{teacher}"\n'
     '[[link]]\nsource = "a"\ntarget = "t"\n', "leads into a frozen peer"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "t"\ncheckpoint = "{teacher}"\n'
     '[[peer]]\nname = "u"\ncheckpoint = "{teacher}"\n[[link]]\nsource = "t"\ntarget = "u"\n'
     '[[link]]\nsource = "u"\ntarget = "t"\n', "a cycle of frozen peers"),
    ('[[peer]]\nname = "t"\ncheckpoint = "nowhere/best.pt"\n', "does not exist"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "t"\ncheckpoint = "{bad}"\n'
     '[[link]]\nsource = "t"\ntarget = "a"\n', "has 10 classes, this run's data 100"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "a"\ntarget = "a"\ngate = "maybe"\n', "gate"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\ncolour = "red"\n', "unknown key(s) colour"),
    ('[[peer]]\nname = "a"\nmodel = "resnet32"\ncheckpoint = "{teacher}"\n',
     "holds a 'resnet20', not the 'resnet32' named for it; use model = \"resnet20\" in peer 'a'"),
    ('[[peer]]\nname = "a"\n', "needs a model (trainable), a checkpoint (frozen) or ema_of"),
    ('[[peer]]\nname = "a"\nmodel = "resnet99"\n', "resnet99"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "a"\ntarget = "a"\ntemperature = -1\n',
     "temperature"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "a"\ntarget = "a"\ngate = "sigmoid_ramp"\n'
     'ramp_epochs = 0\n', "ramp_epochs must be a positive number of epochs, got 0.0"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "a"\ntarget = "a"\ngate = "cosine_ramp"\n',
     "gate 'cosine_ramp' is not one of"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "a"\ntarget = "a"\nramp_epochs = 3\n',
     "ramp_epochs is the length of a ramp gate"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "labels"\ntarget = "a"\nstandardize = true\n',
     "not to the self link"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "ensemble"\ntarget = "a"\nstandardize = "yes"\n',
     "standardize must be true or false"),
    ('[[peer]]\nname = "ensemble"\nmodel = "resnet20"\n', "peer name 'ensemble' is used twice or is reserved"),
    ('[[peer]]\nname = "others"\nmodel = "resnet20"\n', "peer name 'others' is used twice or is reserved"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "others"\ntarget = "a"\n',
     "link others -> 0: the others are the trainable peers but the target, and there is none"),
    ('[[peer]]\nname = "t"\ncheckpoint = "{teacher}"\n[[link]]\nsource = "ensemble"\ntarget = "t"\n',
     "leads into a frozen peer"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = "z"\n', "ema_of 'z' is not a peer"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = "m"\n', "which is itself"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "t"\ncheckpoint = "{teacher}"\n'
     '[[peer]]\nname = "m"\nema_of = "t"\n', "the mean of 't', which is frozen"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = "a"\n[[peer]]\nname = "mm"\n'
     'ema_of = "m"\n', "the mean of 'm', which is a temporal mean"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = "a"\ndecay = 1.0\n',
     "decay must be a number between 0 and 1"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = "a"\nmodel = "resnet20"\n',
     "no model or checkpoint of its own"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\ndecay = 0.9\n', "decay belongs to a temporal mean"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = ["a"]\n', "ema_of ['a'] is not a peer"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = 3\ntarget = "a"\n', "unknown source 3"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[link]]\nsource = "a"\ntarget = "a"\ngate = "linear_ramp"\n'
     'ramp_epochs = true\n', "ramp_epochs must be a number, not True"),
    # one rule for every number: a TOML number, never a string
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "b"\nmodel = "resnet20"\n[[link]]\nsource = "a"\n'
     'target = "b"\ngate = "linear_ramp"\nramp_epochs = "80"\n', "link a -> b: ramp_epochs must be a number, not '80'"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "b"\nmodel = "resnet20"\n[[link]]\nsource = "a"\n'
     'target = "b"\ntemperature = "2"\n', "link a -> b: temperature must be a number, not '2'"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = "a"\ndecay = "0.99"\n',
     "peer 'm': decay must be a number, not '0.99'"),
    ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "m"\nema_of = "a"\n[[link]]\nsource = "a"\n'
     'target = "m"\n', "leads into a frozen peer (a teacher or a temporal mean)"),
    ("[[peer]\n", "not valid TOML"),
    ("", "defines no [[peer]]"),
])
def test_each_mistake_in_a_graph_file_is_one_error_line(cifar_root, tmp_path, teacher, capsys, text, message):
    path = _graph(tmp_path, text.format(teacher=teacher, bad=_bad_checkpoint(tmp_path)))
    code = _train(cifar_root, tmp_path / "runs", "--graph", str(path))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pt"))


@pytest.mark.parametrize("args, message", [
    (["--teacher", "missing/best.pt"], "teacher checkpoint missing/best.pt does not exist"),
    (["--graph", "missing.toml"], "graph file missing.toml does not exist"),
    (["--graph", "g.toml", "--models", "resnet20"], "--graph gives the peers and links"),
    (["--num-nodes", "2", "--kd-ramp", "sigmoid", "--kd-ramp-epochs", "0"], "--kd-ramp-epochs must be a positive"),
    (["--num-nodes", "2", "--kd-ramp-epochs", "5"], "pass --kd-ramp linear or sigmoid too"),
    (["--graph", "g.toml", "--kd-ramp", "linear"], "--kd-ramp applies to DML and --teacher"),
    (["--num-nodes", "2", "--kd-ramp", "cosine"], "invalid choice: 'cosine'"),
    (["--kd-ramp", "linear"], "a network trained alone has none"),
])
def test_missing_teachers_and_graphs_are_one_error_line(cifar_root, tmp_path, capsys, args, message):
    assert _train(cifar_root, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_run_directory_as_teacher_is_called_a_directory_with_its_checkpoints(cifar_root, tmp_path, teacher, capsys):
    run = teacher.parent.parent
    assert _train(cifar_root, tmp_path, "--teacher", str(run)) == 2
    err = capsys.readouterr().err
    assert err == (f"error: teacher checkpoint {run} is a directory, not a checkpoint file; pass a checkpoint file "
                   f"in it: {teacher}\n")
    assert not tmp_path.joinpath("kd_resnet20_from_resnet20_s42").exists()


def test_a_teacher_model_that_is_not_the_checkpoints_is_refused(cifar_root, tmp_path, teacher, capsys):
    assert _train(cifar_root, tmp_path, "--teacher", str(teacher), "--teacher-model", "resnet32") == 2
    assert capsys.readouterr().err == (f"error: teacher checkpoint {teacher} holds a 'resnet20', not the 'resnet32' "
                                       "named for it; use --teacher-model resnet20\n")
    assert _train(cifar_root, tmp_path, "--teacher", str(teacher), str(teacher), "--teacher-model", "resnet20",
                  "resnet20", "resnet20") == 2
    assert "--teacher-model lists 3 names for 2 --teacher checkpoints" in capsys.readouterr().err
    assert _train(cifar_root, tmp_path, "--teacher-model", "resnet20") == 2
    assert "pass --teacher too" in capsys.readouterr().err


def _one_process_and_two(cifar_root, tmp_path, *args: str) -> tuple[Path, Path]:
    """``dml train ARGS`` for one epoch in one process (one thread per peer) and over ``--procs 2``;
    the two output folders."""
    argv = [sys.executable, "-m", "dml", "train", "--data-dir", str(cifar_root), *TINY, *args, "--epochs", "1",
            "--precision", "fp32"]
    single = subprocess.run([*argv, "--out-dir", str(tmp_path / "single")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    spread = subprocess.run([*argv, "--out-dir", str(tmp_path / "spread"), "--procs", "2"], capture_output=True,
                            text=True)
    assert spread.returncode == 0, spread.stderr
    return tmp_path / "single", tmp_path / "spread"


@pytest.mark.processes
def test_a_teacher_in_another_process(cifar_root, tmp_path, teacher):
    """Two students and a teacher over two processes (the teacher alone in the second) compute
    what one process computes with the same threads per peer."""
    single, spread = _one_process_and_two(cifar_root, tmp_path, "--models", "resnet20", "--num-nodes", "2",
                                          "--teacher", str(teacher))
    name = "kd_resnet20_from_resnet20_s42"
    assert _metrics(single / name) == _metrics(spread / name)


def test_the_example_graph_files_and_the_readme_graph_are_valid(teacher, tmp_path):
    mutual = read_graph(GRAPHS / "dml.toml")
    assert links_of(mutual).links == Links.mutual(2).links
    assert links_of(read_graph(GRAPHS / "independent.toml")).links == Links([], 1).links
    gated = links_of(read_graph(GRAPHS / "dml_linear.toml"))
    assert gated.links == Links.mutual(2, gate="linear").links
    kd = (GRAPHS / "kd.toml").read_text()
    assert 'checkpoint = "../../runs/independent_wrn28_2_s42/0_wrn28_2/best.pt"' in kd
    spec = read_graph(_graph(tmp_path, kd.replace("../../runs/independent_wrn28_2_s42/0_wrn28_2/best.pt",
                                                  str(teacher)), "kd.toml"))
    assert [link["temperature"] for link in spec["links"] if link["source"] == 1] == [2.0]
    readme = (GRAPHS.parents[1] / "docs" / "graphs.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = read_graph(_graph(tmp_path, block.replace("runs/independent_wrn28_2_s42/0_wrn28_2/best.pt", str(teacher))))
    assert [p["name"] for p in spec["peers"]] == ["a", "b", "teacher"]
    assert {(lk["source"], lk["target"], lk["gate"]) for lk in spec["links"]} == {
        (0, 0, "through"), (2, 0, "correct"), (0, 1, "linear"), (1, 1, "through")}


def test_a_config_reads_no_file_until_resolved(tmp_path):
    """Constructing a TrainConfig with --teacher or --graph opens nothing; resolving reads the files
    and says in one line what is missing."""
    from dml.config import TrainConfig
    from dml.errors import UserError

    missing = tmp_path / "missing" / "best.pt"
    for cfg, message in ((TrainConfig(teacher=[str(missing)]), f"teacher checkpoint {missing} does not exist"),
                         (TrainConfig(graph=str(tmp_path / "g.toml")), f"graph file {tmp_path / 'g.toml'} does not exist")):
        assert cfg.unresolved and cfg.graph_spec is None and cfg.name is None
        with pytest.raises(ValueError, match="resolved"):
            _ = cfg.frozen
        with pytest.raises(UserError) as exc:
            cfg.resolved()
        assert message in str(exc.value) and "\n" not in str(exc.value)
    plain = TrainConfig(models=["resnet20"])
    assert plain.resolved() is plain and plain.name == "independent_resnet20_s42"


def test_counting_a_plans_trained_peers_opens_no_checkpoint(teacher, tmp_path, monkeypatch):
    from dml import graph
    from dml.config import TrainConfig

    path = _graph(tmp_path, f"""
        [[peer]]
        name = "a"
        model = "resnet20"
        [[peer]]
        name = "b"
        model = "resnet20"
        [[peer]]
        name = "t"
        checkpoint = "{teacher}"
    """)
    kd = TrainConfig(models=["resnet20"], num_nodes=2, teacher=[str(teacher)])
    by_graph = TrainConfig(graph=str(path))
    resolved = kd.resolved()
    assert resolved.name == "kd_resnet20_from_resnet20_s42" and resolved.frozen == [2]
    assert resolved.graph_spec["peers"][2]["sha256"] == _digest(teacher)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was opened")

    from dml import checkpoint

    monkeypatch.setattr(checkpoint, "_load", refuse)  # the one torch.load of a checkpoint
    monkeypatch.setattr(graph, "file_digest", refuse)
    assert kd.count_trained_peers() == 2 and by_graph.count_trained_peers() == 2
    assert resolved.count_trained_peers() == 2
    with pytest.raises(AssertionError):
        by_graph.resolved()


def test_the_method_graph_files_compute_their_methods():
    pcl = read_graph(GRAPHS / "pcl_style.toml")
    assert [(p["model"], p.get("ema_of"), p.get("decay")) for p in pcl["peers"]] == [
        ("resnet32", None, None), ("resnet32", None, None), ("resnet32", 0, 0.999), ("resnet32", 1, 0.999)]
    ramped = {"gate": "sigmoid_ramp", "ramp_epochs": 80.0}  # each peer from the ensemble and the other's mean
    pcl_links = links_of(pcl)
    assert pcl_links.combine == "sum" and pcl_links.links == Links(
        [Link(ENSEMBLE, 0, **ramped), Link(ENSEMBLE, 1, **ramped), Link(3, 0, **ramped), Link(2, 1, **ramped)], 4,
        frozen=[2, 3]).links
    ramp = links_of(read_graph(GRAPHS / "dml_sigmoid_ramp.toml"))
    assert ramp.links == Links.mutual(2, gate="sigmoid_ramp", ramp_epochs=80.0).links
    kdcl = links_of(read_graph(GRAPHS / "kdcl.toml"))
    assert kdcl.links == Links([Link(ENSEMBLE, 0), Link(ENSEMBLE, 1)], 2).links
    mixed = read_graph(GRAPHS / "dml_standardized.toml")
    assert [p["model"] for p in mixed["peers"]] == ["resnet32", "wrn28_2"]
    assert links_of(mixed).links == Links([Link(1, 0, standardize=True), Link(0, 1, standardize=True)], 2).links


@pytest.mark.parametrize("update", ["simultaneous", "sequential"])
def test_online_distillation_links_train_resume_and_are_stored(cifar_root, tmp_path, update):
    """The ensemble, a standardised link and a step-wise ramp in one graph: stored in config.json as
    written, and a resumed run ends exactly where the uninterrupted one does."""
    text = (GRAPHS / "kdcl.toml").read_text().replace("resnet32", "resnet20") + textwrap.dedent("""
        [[peer]]
        name = "a_mean"
        ema_of = "a"
        decay = 0.9
        [[link]]
        source = "b"
        target = "a"
        standardize = true
        gate = "sigmoid_ramp"
        ramp_epochs = 1.5
        [[link]]
        source = "a_mean"
        target = "b"
        """)
    path = _graph(tmp_path, text)
    args = ["--graph", str(path), "--epochs", "2", "--update", update]
    assert _train(cifar_root, tmp_path / "straight", *args) == 0
    assert _train(cifar_root, tmp_path / "resumed", *args, "--stop-after", "1") == 0
    assert _train(cifar_root, tmp_path / "resumed", *args, "--resume") == 0
    straight, resumed = (tmp_path / kind / "graph-graph_resnet20_s42" for kind in ("straight", "resumed"))
    assert _metrics(resumed) == _metrics(straight)
    spec = json.loads((straight / "config.json").read_text())["config"]["graph_spec"]
    assert {(lk["source"], lk["target"], lk["gate"], lk.get("ramp_epochs"), lk.get("standardize", False))
            for lk in spec["links"]} == {(0, 0, "through", None, False), (1, 1, "through", None, False),
                                         (ENSEMBLE, 0, "through", None, False), (ENSEMBLE, 1, "through", None, False),
                                         (1, 0, "sigmoid_ramp", 1.5, True), (2, 1, "through", None, False)}
    assert spec["peers"][2] == {"name": "a_mean", "model": "resnet20", "checkpoint": None, "sha256": None,
                                "ema_of": 0, "decay": 0.9}
    records = [r for r in _metrics(straight) if r["node"] in (0, 1)]
    for r in records:  # the objective is its two terms; every peer distils from the ensemble from the start
        assert r["train_loss"] == pytest.approx(r["train_ce"] + r["train_kd"]) and r["train_kd"] > 0
    means = [r for r in _metrics(straight) if r["node"] == 2]
    assert [(r["role"], r["mean_of"]) for r in means] == [("mean", 0)] * 2 and "train_kd" not in means[0]
    updates = torch.load(straight / "2_resnet20" / "last.pt", weights_only=True)["updates"]
    assert updates > 0
    for kind in (straight, resumed):  # the mean's checkpoints resume it and evaluate like any peer's
        saved = torch.load(kind / "2_resnet20" / "last.pt", weights_only=True)
        assert (saved["mean_of"], saved["decay"], saved["run"]["epoch"]) == (0, 0.9, 2)
        assert saved["updates"] == updates  # the warm-up's step count, resumed with the mean
    best = torch.load(straight / "2_resnet20" / "best.pt", weights_only=True)
    assert best["mean_of"] == 0
    documented = _documented_keys()  # checkpoint.py's schema, a mean's part included
    assert set(best) == documented["both"] | documented["best"] - {"val_acc"} | {"mean_of"}
    assert set(saved) == (documented["both"] | documented["last"] | documented["mean"]) - {"optimizer", "scheduler"}
    last = torch.load(resumed / "2_resnet20" / "last.pt", weights_only=True)["model"]
    for key, value in torch.load(straight / "2_resnet20" / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(value, last[key]), key
    assert main(["evaluate", str(straight / "2_resnet20" / "best.pt"), "--test-samples", "50",
                 "--json", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoints"][0]["top1"] == best["test_acc"]


def test_pcl_graph_by_hand():
    """pcl_style.toml, peer a (b alike): CE + w(t) (KL(p(mean of a, b) || p(a)) + KL(p(b's mean) || p(a))), the two
    terms summed, w the sigmoid ramp over 80 epochs; float64 logits, T = 1."""
    from dml.links import Progress
    from test_links import _ce, _kl, close

    links = links_of(read_graph(GRAPHS / "pcl_style.toml"))
    g = torch.Generator().manual_seed(3)
    z = [torch.randn(8, 5, generator=g, dtype=torch.float64) * 3.0 for _ in range(4)]  # a, b, a's mean, b's mean
    y = torch.randint(0, 5, (8,), generator=g)
    ensemble = (z[0] + z[1]) / 2
    for progress, t in ((Progress(21, 200, 0.0), 0.25), (Progress(100, 200, 0.5), 1.0)):
        w = torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2, dtype=torch.float64))
        for peer, other_mean in ((0, 3), (1, 2)):
            ce, kd = links.terms(peer, z[peer], links.sources(z), y, progress)
            close(ce, _ce(z[peer], y).mean())
            close(kd, w * (_kl(ensemble, z[peer]).mean() + _kl(z[other_mean], z[peer]).mean()))


@pytest.mark.processes
def test_temporal_means_live_with_their_sources_in_other_processes(cifar_root, tmp_path, capsys):
    """PCL's graph over two processes (peers 0 and 2 in one, 1 and 3 in the other: the cohort order is
    not the processes' order) computes what one process computes with the same threads per peer."""
    path = _graph(tmp_path, (GRAPHS / "pcl_style.toml").read_text().replace("resnet32", "resnet20"))
    single, spread = _one_process_and_two(cifar_root, tmp_path, "--graph", str(path))
    name = "graph-graph_resnet20_s42"
    assert _metrics(single / name) == _metrics(spread / name)
    capsys.readouterr()
    assert _train(cifar_root, tmp_path / "three", "--graph", str(path), "--procs", "3") == 2
    assert capsys.readouterr().err.startswith("error: --procs must be between 1 and the 2 peers that are not temporal")


def test_resume_after_editing_a_graph_file_says_which_entry_changed(cifar_root, tmp_path, capsys):
    text = ('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "b"\nmodel = "resnet20"\n[[link]]\n'
            'source = "b"\ntarget = "a"\ngate = "sigmoid_ramp"\nramp_epochs = 80\n')
    path = _graph(tmp_path, text)
    assert _train(cifar_root, tmp_path / "runs", "--graph", str(path), "--epochs", "2", "--stop-after", "1") == 0
    path.write_text(text.replace("ramp_epochs = 80", "ramp_epochs = 5"))
    capsys.readouterr()
    assert _train(cifar_root, tmp_path / "runs", "--graph", str(path), "--epochs", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume with a configuration that differs") and err.count("\n") == 1
    # the one link that changed (the self links come first), not the whole spec before and after
    assert "(graph_spec.links[1].ramp_epochs: 80.0 -> 5.0)" in err
    assert len(err.replace(str(tmp_path / "runs" / "graph-graph_resnet20_s42"), "RUN")) < 200, err
