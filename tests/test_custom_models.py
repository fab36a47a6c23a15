"""Networks of the user's own from the command line: --models package.module:factory."""

import json
import sys
import textwrap

import pytest

from dml.cli import main
from dml.models import create_model, folder_name
from tiny_run import tiny_flags, train  # pytest puts the tests folder on sys.path

TINY = tiny_flags(train=64, test=50)

NETS = textwrap.dedent('''
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def tiny(num_classes):
        return Tiny(num_classes)

    def not_a_module(num_classes):
        return [num_classes]

    def ten(num_classes):  # ignores the data's classes
        return Tiny(10)

    def thousand(num_classes):
        return Tiny(1000)

    def no_args():
        return Tiny(100)

    def two_args(num_classes, width):
        return Tiny(num_classes)

    from pathlib import Path
    Path(__file__).with_suffix(".imported").write_text("imported")  # a side effect: proof of an import
''')


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A module `usernets_<test>` in the current directory, as a user's project would hold it."""
    name = f"usernets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    return name


def test_train_resume_and_evaluate_a_mixed_cohort_of_a_users_network(user_package, cifar_root, tmp_path, capsys):
    models = ["--models", f"{user_package}:tiny", "resnet20", "--num-nodes", "2"]
    common = ["--data-dir", str(cifar_root), "--out-dir", str(tmp_path / "runs"), *TINY, *models, "--epochs", "2"]
    assert main(["train", *common, "--stop-after", "1"]) == 0
    assert main(["train", *common, "--resume"]) == 0
    run = tmp_path / "runs" / f"dml_n2_{user_package}-tiny-resnet20_s42"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["node"], r.get("model")) for r in records if r["node"] != "ensemble"] == [
        (1, 0, f"{user_package}:tiny"), (1, 1, "resnet20"), (2, 0, f"{user_package}:tiny"), (2, 1, "resnet20")]
    checkpoint = run / f"0_{user_package}-tiny" / "last.pt"
    capsys.readouterr()
    assert main(["evaluate", str(checkpoint), "--models", f"{user_package}:tiny", "--test-samples", "50"]) == 0
    assert f"{user_package}:tiny" in capsys.readouterr().out


@pytest.mark.parametrize(("model", "message"), [
    ("no_such_module_xyz:net", "cannot import 'no_such_module_xyz' (No module named 'no_such_module_xyz')"),
    ("{pkg}:missing", "has no callable 'missing'"),
    ("{pkg}:not_a_module", "the factory returned a list, not a torch.nn.Module"),
    ("os:system", "os is a standard-library module, not a network"),
    (":net", "an import path reads package.module:factory"),
])
def test_a_bad_import_path_is_one_error_line(user_package, cifar_root, tmp_path, capsys, model, message):
    code = main(["train", "--models", model.format(pkg=user_package), "--data-dir", str(cifar_root),
                 "--out-dir", str(tmp_path / "runs"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("factory, classes", [("ten", 10), ("thousand", 1000)])
def test_a_network_whose_logits_do_not_fit_the_data_is_one_error_line(user_package, cifar_root, tmp_path, capsys,
                                                                       factory, classes):
    out = tmp_path / "runs"
    common = ["--data-dir", str(cifar_root), "--out-dir", str(out), *TINY, "--epochs", "1", "--num-nodes", "2"]
    assert main(["train", "--models", "resnet20", f"{user_package}:{factory}", *common]) == 2
    assert capsys.readouterr().err == (
        f"error: peer 1 (--models {user_package}:{factory}) returns logits of shape (2, {classes}) for a batch of 2 "
        "images; expected (2, 100): one logit for each of the 100 classes of cifar100; its factory must build the "
        "network for the num_classes it is called with (nothing was written)\n")
    assert not out.exists()
    # the same with a network that fits trains in the same place
    assert main(["train", "--models", "resnet20", f"{user_package}:tiny", *common,
                 "--name", f"dml_n2_resnet20-{user_package}-{factory}_s42"]) == 0


@pytest.mark.parametrize("factory, signature", [("no_args", "()"), ("two_args", "(num_classes, width)")])
def test_a_factory_that_cannot_take_num_classes_is_one_error_line(user_package, cifar_root, tmp_path, capsys,
                                                                  factory, signature):
    assert main(["train", "--models", f"{user_package}:{factory}", "--data-dir", str(cifar_root),
                 "--out-dir", str(tmp_path / "runs"), *TINY]) == 2
    assert capsys.readouterr().err == (
        f"error: model '{user_package}:{factory}': {user_package}.{factory}{signature} cannot be called as "
        "factory(num_classes) -> nn.Module: a factory takes one argument, the number of classes, and returns the "
        "network\n")
    assert not (tmp_path / "runs").exists()


def test_registered_names_and_import_paths_build_alike(user_package):
    assert type(create_model(f"{user_package}:tiny", 7)).__name__ == "Tiny"
    assert create_model("resnet20", 7).fc.out_features == 7
    assert folder_name(f"{user_package}:tiny") == f"{user_package}-tiny"


def _train_tiny(user_package, cifar_root, out_dir, *extra):
    return train(cifar_root, out_dir, "--models", f"{user_package}:tiny", "--epochs", "1", *extra, tiny=TINY)


def _forget(user_package, tmp_path, monkeypatch):
    """As in a new process: the module not imported yet, its side effect undone."""
    monkeypatch.delitem(sys.modules, user_package, raising=False)
    (tmp_path / f"{user_package}.imported").unlink(missing_ok=True)


def test_evaluate_imports_a_users_network_only_when_named(user_package, cifar_root, tmp_path, monkeypatch, capsys):
    assert _train_tiny(user_package, cifar_root, tmp_path / "runs") == 0
    run = tmp_path / "runs" / f"independent_{user_package}-tiny_s42"
    checkpoint = run / f"0_{user_package}-tiny" / "best.pt"
    marker = tmp_path / f"{user_package}.imported"
    _forget(user_package, tmp_path, monkeypatch)
    for named, message in (([], f"add --models {user_package}:tiny to import it"),
                           (["--models", "resnet20"], f"not the 'resnet20' named for it; use --models {user_package}:tiny")):
        assert main(["evaluate", str(checkpoint), "--test-samples", "50", *named]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: checkpoint {checkpoint} holds ") and err.count("\n") == 1, err
        assert message in err
        assert not marker.exists()  # nothing of the module ran
    assert main(["evaluate", str(checkpoint), "--test-samples", "50", "--models", f"{user_package}:tiny"]) == 0
    assert marker.exists()


def test_evaluate_elsewhere_says_where_training_ran(user_package, cifar_root, tmp_path, monkeypatch, capsys):
    assert _train_tiny(user_package, cifar_root, tmp_path / "runs") == 0
    checkpoint = tmp_path / "runs" / f"independent_{user_package}-tiny_s42" / f"0_{user_package}-tiny" / "best.pt"
    _forget(user_package, tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])  # as a process started elsewhere
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    evaluate = ["evaluate", str(checkpoint), "--test-samples", "50", "--models", f"{user_package}:tiny"]
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {checkpoint}: model '{user_package}:tiny': cannot import") \
        and err.count("\n") == 1, err
    assert err.rstrip().endswith(f"; run from {tmp_path}, where training ran, or add {tmp_path} to PYTHONPATH")
    monkeypatch.chdir(tmp_path)
    assert main(evaluate) == 0


@pytest.mark.parametrize("how", ["--teacher", "graph file"])
def test_a_teachers_network_is_imported_only_when_named(user_package, cifar_root, tmp_path, monkeypatch, capsys, how):
    assert _train_tiny(user_package, cifar_root, tmp_path / "teacher") == 0
    teacher = tmp_path / "teacher" / f"independent_{user_package}-tiny_s42" / f"0_{user_package}-tiny" / "best.pt"
    marker = tmp_path / f"{user_package}.imported"
    _forget(user_package, tmp_path, monkeypatch)
    graph = tmp_path / "kd.toml"
    peers = f'[[peer]]\nname = "student"\nmodel = "resnet20"\n[[peer]]\nname = "t"\ncheckpoint = "{teacher}"\n'
    link = '[[link]]\nsource = "t"\ntarget = "student"\n'
    if how == "--teacher":
        unnamed, named = ["--teacher", str(teacher)], ["--teacher", str(teacher), "--teacher-model", f"{user_package}:tiny"]
        message = f"error: teacher checkpoint {teacher} holds a network of your own, '{user_package}:tiny', and a " \
                  f"checkpoint does not import code by itself: add --teacher-model {user_package}:tiny to import it"
    else:
        graph.write_text(peers + link)
        unnamed, named = ["--graph", str(graph)], ["--graph", str(graph)]
        message = f"error: graph file {graph}: peer 't': checkpoint {teacher} holds a network of your own, " \
                  f"'{user_package}:tiny', and a checkpoint does not import code by itself: add " \
                  f"model = \"{user_package}:tiny\" in peer 't' to import it"
    common = ["--data-dir", str(cifar_root), "--out-dir", str(tmp_path / "runs"), *TINY, "--epochs", "1"]
    assert main(["train", "--models", "resnet20", *common, *unnamed] if how == "--teacher"
                else ["train", *common, *unnamed]) == 2
    err = capsys.readouterr().err
    assert err == message + "\n"
    assert not marker.exists() and not (tmp_path / "runs").exists()
    if how == "graph file":
        graph.write_text(peers + f'model = "{user_package}:tiny"\n' + link)
    assert main(["train", "--models", "resnet20", *common, *named] if how == "--teacher"
                else ["train", *common, *named]) == 0
    assert marker.exists()
