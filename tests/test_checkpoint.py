"""best.pt and last.pt: the schema checkpoint.py states, its format version, files of before the stamp,
files of another format, and files that would run code (every load path refuses them unread)."""

import re
import shutil
import sys
from functools import partial

import pytest
import torch

import dml.checkpoint
from dml.checkpoint import (
    EVALUATE,
    FORMAT_KEY,
    FORMAT_VERSION,
    PURPOSES,
    RESUME,
    TEACHER,
    read_checkpoint,
    write_checkpoint,
)
from dml.cli import main
from dml.errors import UserError
from dml.models import create_model
from tiny_run import tiny_flags, train  # pytest puts the tests folder on sys.path

TINY = tiny_flags("--models", "resnet20")
RUN = "independent_resnet20_s42"


_train = partial(train, tiny=TINY)


@pytest.fixture(scope="module")
def stopped_run(cifar_root, tmp_path_factory):
    """A one-peer run stopped after its first of two epochs: it holds best.pt and last.pt."""
    out = tmp_path_factory.mktemp("stopped")
    assert _train(cifar_root, out, "--epochs", "2", "--stop-after", "1") == 0
    return out / RUN


def _copy_run(stopped_run, tmp_path):
    shutil.copytree(stopped_run, tmp_path / RUN)
    return tmp_path / RUN / "0_resnet20"


def _best(path, **extra):
    """A best.pt as dml train writes it, with ``extra`` entries added or replaced; unstamped where
    extra sets the format to None."""
    state = {FORMAT_KEY: FORMAT_VERSION, "model": create_model("resnet20", 10).state_dict(), "model_name": "resnet20",
             "index": 0, "epoch": 3, "selected_on": "test_acc", "test_acc": 10.0, "num_classes": 10,
             "dataset": "cifar10", "config": {"seed": 42, "dataset": "cifar10", "plain": True}, "working_dir": "/"}
    state.update(extra)
    if state[FORMAT_KEY] is None:
        del state[FORMAT_KEY]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _documented_keys() -> dict[str, set[str]]:
    """The keys checkpoint.py's docstring lists: under "Both files hold", under best.pt, under last.pt and
    for a temporal mean ("mean")."""
    doc = dml.checkpoint.__doc__
    sections = re.split(r"\n(?=Both files hold|``best.pt``|``last.pt``|A temporal mean)", doc)
    keys = {}
    for section in sections[1:]:
        name = "both" if section.startswith("Both") else "mean" if section.startswith("A temporal") else section[2:6]
        keys[name] = set(re.findall(r"^    (\w+)  ", section, re.MULTILINE))
    return keys


def test_the_docstring_states_every_key_of_best_and_last_and_the_files_carry_the_version(stopped_run):
    documented = _documented_keys()
    best = torch.load(stopped_run / "0_resnet20" / "best.pt", weights_only=True)
    last = torch.load(stopped_run / "0_resnet20" / "last.pt", weights_only=True)
    assert best[FORMAT_KEY] == FORMAT_VERSION == last[FORMAT_KEY] == 1
    assert set(best) == documented["both"] | documented["best"] - {"val_acc"}  # no validation split in this run
    assert set(last) == documented["both"] | documented["last"]
    assert set(last["run"]) == {"epoch", "threads", "data_generator", "torch_rng"}  # cuda_rng on CUDA only


def test_read_checkpoint_gives_what_each_purpose_needs(stopped_run):
    best = read_checkpoint(stopped_run / "0_resnet20" / "best.pt", EVALUATE)
    assert (best.model_name, best.num_classes, best.epoch, best.dataset, best.format) == ("resnet20", 100, 1,
                                                                                        "cifar100", 1)
    assert best.config["seed"] == 42 and "fc.bias" in best.weights
    last = read_checkpoint(stopped_run / "0_resnet20" / "last.pt", RESUME)
    assert last.epoch == 1 and last.run["epoch"] == 1 and "optimizer" in last.state
    assert read_checkpoint(stopped_run / "0_resnet20" / "best.pt", TEACHER).model_name == "resnet20"
    with pytest.raises(UserError, match="records no epoch: it is not a resumable dml checkpoint"):
        read_checkpoint(stopped_run / "0_resnet20" / "best.pt", RESUME)  # best.pt holds no run state


def test_a_file_written_before_the_format_stamp_reads_as_format_1(tmp_path, capsys):
    path = _best(tmp_path / "best.pt", format=None)
    assert FORMAT_KEY not in torch.load(path, weights_only=True)
    for purpose in (EVALUATE, TEACHER):
        assert read_checkpoint(path, purpose).format == 1
    # dml evaluate goes past reading it: it fails only for the data, which this test does not give
    assert main(["evaluate", str(path), "--device", "cpu", "--data-dir", str(tmp_path / "no-data"),
                 "--no-download"]) == 2
    err = _one_error_line(capsys)
    assert "format" not in err and str(path) not in err, err


@pytest.mark.parametrize("version", [99, 0, "1", True, 2.5])
def test_read_checkpoint_refuses_another_format_for_every_purpose(tmp_path, version):
    path = _best(tmp_path / "best.pt", format=version)
    for purpose in PURPOSES:
        with pytest.raises(UserError, match=rf"is in checkpoint format {re.escape(repr(version))}, which dml .* does "
                                            rf"not read \(it reads format {FORMAT_VERSION}\)"):
            read_checkpoint(path, purpose)


def test_write_checkpoint_stamps_the_version(tmp_path):
    write_checkpoint(tmp_path / "x.pt", {"model": {}, "model_name": "resnet20"})
    assert torch.load(tmp_path / "x.pt", weights_only=True)[FORMAT_KEY] == FORMAT_VERSION


def test_dml_evaluate_refuses_another_format(tmp_path, capsys):
    path = _best(tmp_path / "best.pt", format=99)
    assert main(["evaluate", str(path), "--device", "cpu"]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: checkpoint {path} is in checkpoint format 99, which dml ") and \
        "(it reads format 1); use the version of dml that wrote it" in err, err


def test_teacher_refuses_another_format(tmp_path, capsys):
    path = _best(tmp_path / "best.pt", format=99)
    assert main(["train", "--models", "resnet20", "--teacher", str(path), "--out-dir", str(tmp_path / "runs"),
                 "--data-dir", str(tmp_path / "no-data"), "--no-download", "--epochs", "1"]) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: checkpoint {path} is in checkpoint format 99") and "reads format 1" in err, err
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_another_format(cifar_root, stopped_run, tmp_path, capsys):
    last = _copy_run(stopped_run, tmp_path) / "last.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, FORMAT_KEY: 99}, last)
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--epochs", "2", "--resume") == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: checkpoint {last} is in checkpoint format 99") and "reads format 1" in err \
        and "start a new run with another --name" in err, err


# --- a checkpoint cannot run code -----------------------------------------------------------


class _OpensAFile:
    """Unpickling it calls open(path, "w"): a file appears where a load ran it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _with_pickled_object(path, marker, state=None):
    state = dict(state if state is not None else torch.load(_best(path), weights_only=True))
    state["extra"] = _OpensAFile(marker)
    torch.save(state, path)
    return path


def test_the_pickled_object_would_run_where_loaded_without_weights_only(tmp_path):
    """The file the tests below refuse does run code when loaded as a plain pickle."""
    marker = tmp_path / "ran"
    path = _with_pickled_object(tmp_path / "best.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def _refused_unread(err, path, marker):
    assert f"checkpoint {path} is not a readable dml checkpoint" in err and "UnpicklingError" in err, err
    assert not marker.exists()


def test_dml_evaluate_never_unpickles_an_object(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = _with_pickled_object(tmp_path / "best.pt", marker)
    assert main(["evaluate", str(path), "--device", "cpu"]) == 2
    _refused_unread(_one_error_line(capsys), path, marker)


def test_teacher_and_graph_files_never_unpickle_an_object(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = _with_pickled_object(tmp_path / "best.pt", marker)
    common = ["--out-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "no-data"), "--no-download"]
    assert main(["train", "--models", "resnet20", "--teacher", str(path), *common]) == 2
    _refused_unread(_one_error_line(capsys), path, marker)
    graph = tmp_path / "kd.toml"
    graph.write_text(f'[[peer]]\nname = "student"\nmodel = "resnet20"\n\n'
                     f'[[peer]]\nname = "teacher"\ncheckpoint = "{path}"\n\n'
                     '[[link]]\nsource = "teacher"\ntarget = "student"\n')
    assert main(["train", "--graph", str(graph), *common]) == 2
    _refused_unread(_one_error_line(capsys), path, marker)


def test_resume_never_unpickles_an_object(cifar_root, stopped_run, tmp_path, capsys):
    marker = tmp_path / "ran"
    last = _copy_run(stopped_run, tmp_path) / "last.pt"
    _with_pickled_object(last, marker, torch.load(last, weights_only=True))
    capsys.readouterr()
    assert _train(cifar_root, tmp_path, "--epochs", "2", "--resume") == 2
    _refused_unread(_one_error_line(capsys), last, marker)


def test_a_module_a_checkpoint_names_is_never_imported_unless_the_user_names_it(tmp_path, capsys, monkeypatch):
    """A checkpoint holding ``package.module:factory`` is refused by every load path that is not told
    that network: the module (which would leave a file when imported) is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "ckpt_payload_net.py").write_text(f"open({str(marker)!r}, 'w')\n"
                                                  "def net(num_classes):\n    raise AssertionError\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    path = _best(tmp_path / "best.pt", model_name="ckpt_payload_net:net")
    common = ["--out-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "no-data"), "--no-download"]
    graph = tmp_path / "kd.toml"
    graph.write_text(f'[[peer]]\nname = "student"\nmodel = "resnet20"\n\n'
                     f'[[peer]]\nname = "teacher"\ncheckpoint = "{path}"\n\n'
                     '[[link]]\nsource = "teacher"\ntarget = "student"\n')
    for args in (["evaluate", str(path), "--device", "cpu"],
                 ["train", "--models", "resnet20", "--teacher", str(path), *common],
                 ["train", "--graph", str(graph), *common]):
        assert main(args) == 2
        err = _one_error_line(capsys)
        assert "holds a network of your own, 'ckpt_payload_net:net', and a checkpoint does not import code" in err, err
        assert not marker.exists() and "ckpt_payload_net" not in sys.modules


def test_checkpoint_py_is_the_only_code_that_loads_a_file_with_torch_and_always_weights_only():
    import ast
    from pathlib import Path

    calls = {}
    for path in sorted(Path(dml.checkpoint.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                calls.setdefault(path.name, []).append(
                    len(weights_only) == 1 and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True)
    assert calls == {"checkpoint.py": [True]}
