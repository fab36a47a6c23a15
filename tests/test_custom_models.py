"""Networks of the user's own from the command line: --models package.module:factory."""

import json
import textwrap

import pytest

from dml.cli import main
from dml.models import create_model, folder_name

TINY = ["--train-samples", "64", "--test-samples", "50", "--batch-size", "32", "--skip-checksum", "--no-download",
        "--no-progress"]

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
    assert main(["evaluate", str(checkpoint), "--data-dir", str(cifar_root), "--skip-checksum", "--no-download",
                 "--test-samples", "50"]) == 0
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


def test_registered_names_and_import_paths_build_alike(user_package):
    assert type(create_model(f"{user_package}:tiny", 7)).__name__ == "Tiny"
    assert create_model("resnet20", 7).fc.out_features == 7
    assert folder_name(f"{user_package}:tiny") == f"{user_package}-tiny"
