"""`dml evaluate` on tiny checkpoints and a synthetic CIFAR-10, against accuracies computed here."""

import json
import urllib.request
from pathlib import Path

import pytest
import torch

from cifar_fixtures import write_cifar_folder
from dml.checkpoint import write_checkpoint
from dml.cli import main
from dml.data.cifar import load_cifar
from dml.data.dataset import balanced_subset
from dml.evaluate import evaluate_checkpoints, format_table
from dml.models import create_model
from dml.peer import derive_seed
from test_folder import write_folder

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
SAMPLES = 200  # test images evaluated: 20 per class
SEED = 7  # the seed of the runs the checkpoints claim to come from


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    """A CIFAR-10 folder of official size (random pixels, cycling labels; use --skip-checksum)."""
    root = tmp_path_factory.mktemp("cifar10")
    write_cifar_folder(root, "cifar10", n_train=50_000, n_test=10_000)
    return root


@pytest.fixture(scope="module")
def test_split(cifar10_root):
    """The images and labels `--test-samples 200` evaluates: the subset training's --test-samples took."""
    data = load_cifar(cifar10_root, "cifar10", download=False, skip_checksum=True)
    return balanced_subset(data.test, SAMPLES, derive_seed(SEED, "test-subset"), 10)


def random_model(seed, num_classes=10):
    """A resnet20 with random weights whose logits are centred per class, so it predicts varied
    classes (uncentred, a random network gives every image the same class)."""
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes).eval()
    with torch.no_grad():
        model.fc.bias -= model(torch.randn(64, 3, 32, 32)).mean(0)
    return model


def constant_model(bias):
    """A resnet20 whose scores ignore the image: the classifier's weights are zero, its bias fixed."""
    model = create_model("resnet20", len(bias)).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return model


# The checkpoints below say they come from --plain runs (fp32, BatchNorm kept), so that `dml evaluate`
# computes exactly what the fp32 models computed here by hand.
def save_best(path, model, num_classes=10, dataset="cifar10", epoch=3):
    """A checkpoint in the best.pt format of `dml train`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, {"model": model.state_dict(), "model_name": "resnet20", "index": 0, "epoch": epoch,
                            "test_acc": 10.0, "config": {"seed": SEED, "dataset": dataset, "plain": True},
                            "num_classes": num_classes, "dataset": dataset})
    return path


def save_last(path, model, epoch=5):
    """A checkpoint in the last.pt format: the epoch lives in the run state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path, {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "model_name": "resnet20",
                            "index": 1, "best_acc": 10.0, "best_epoch": 1, "run": {"epoch": epoch},
                            "config": {"seed": SEED, "plain": True}, "num_classes": 10, "dataset": "cifar10"})
    return path


def evaluate(root, *paths, **options):
    return evaluate_checkpoints(paths, root, device="cpu", skip_checksum=True, download=False,
                                test_samples=SAMPLES, **options)


def test_accuracy_of_image_independent_scores_is_known_exactly(cifar10_root, tmp_path):
    # Ranking 3 > 4 > 5 > 6 > 7 > the rest for every image: top-1 hits class 3 only, top-5 classes 3..7,
    # and the balanced subset holds 20 images of each class.
    path = save_best(tmp_path / "best.pt", constant_model([0, 0, 0, 9, 8, 7, 6, 5, 0, 0]))
    summary = evaluate(cifar10_root, path)
    (result,) = summary["checkpoints"]
    assert (result["top1"], result["top5"]) == (10.0, 50.0)
    assert summary["test_images"] == SAMPLES and summary["dataset"] == "cifar10"


def test_accuracies_match_the_models_run_by_hand(cifar10_root, test_split, tmp_path):
    models = [random_model(1), random_model(2)]
    paths = [save_best(tmp_path / "0_resnet20" / "best.pt", models[0], epoch=3),
             save_last(tmp_path / "1_resnet20" / "last.pt", models[1], epoch=5)]
    summary = evaluate(cifar10_root, *paths)

    x = (test_split.images.float() / 255 - CIFAR10_MEAN) / CIFAR10_STD
    y = test_split.labels
    with torch.no_grad():
        probs = [m(x).softmax(1) for m in models]

    def top_k(p, k):
        return 100.0 * sum(int(y[i]) in p[i].argsort(descending=True)[:k].tolist() for i in range(len(y))) / len(y)

    for result, p, epoch in zip(summary["checkpoints"], probs, (3, 5)):
        assert result["epoch"] == epoch
        assert result["top1"] == pytest.approx(top_k(p, 1))
        assert result["top5"] == pytest.approx(top_k(p, 5))
    mean = (probs[0] + probs[1]) / 2
    assert summary["ensemble"]["top1"] == pytest.approx(top_k(mean, 1))
    assert summary["ensemble"]["top5"] == pytest.approx(top_k(mean, 5))
    # The two models disagree, so the ensemble is not just one of them.
    assert (probs[0].argmax(1) != probs[1].argmax(1)).any()
    assert top_k(probs[0], 1) != top_k(probs[1], 1) or top_k(probs[0], 5) != top_k(probs[1], 5)

    table = format_table(summary)
    assert f"{summary['ensemble']['top1']:.2f}" in table.splitlines()[-2]
    assert table.splitlines()[-1] == f"{SAMPLES} test images of cifar10 on cpu"


def test_command_prints_table_and_writes_json(cifar10_root, tmp_path, capsys):
    path = save_best(tmp_path / "best.pt", constant_model([0, 0, 0, 9, 8, 7, 6, 5, 0, 0]))
    code = main(["evaluate", str(path), "--data-dir", str(cifar10_root), "--skip-checksum", "--no-download",
                 "--device", "cpu", "--test-samples", str(SAMPLES), "--json", str(tmp_path / "out.json")])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"data: cifar10 test split from {cifar10_root} (--data-dir; checksum skipped (--skip-checksum))"
    assert out[1].split() == ["checkpoint", "model", "epoch", "top-1", "(%)", "top-5", "(%)"]
    assert out[2].split() == [str(path), "resnet20", "3", "10.00", "50.00"]
    assert out[3].split()[0] == "ensemble" and out[3].split()[-2:] == ["10.00", "50.00"]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["ensemble"]["top1"] == 10.0 and saved["checkpoints"][0]["name"] == str(path)


def test_errors_are_one_line_with_status_2(cifar10_root, tmp_path, capsys):
    ten = save_best(tmp_path / "ten.pt", constant_model([0.0] * 10))
    hundred = save_best(tmp_path / "hundred.pt", constant_model([0.0] * 100), num_classes=100, dataset="cifar100")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ten.read_bytes()[:1000])
    common = ["--data-dir", str(cifar10_root), "--skip-checksum", "--no-download", "--device", "cpu"]
    for args, expected in (
        ([str(ten), str(hundred)], "different datasets"),
        ([str(ten), "--dataset", "cifar100"], "10 classes but cifar100 has 100"),
        ([str(truncated)], "truncated"),
        ([str(tmp_path / "absent.pt")], "does not exist"),
    ):
        assert main(["evaluate", *args, *common]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_evaluating_a_runs_checkpoint_gives_back_its_logged_accuracy(cifar10_root, tmp_path, capsys):
    """One evaluation path: `dml evaluate` computes on the run's own runtime (bf16 autocast, folded
    BatchNorm by default), so it reproduces the test accuracy that training logged, exactly."""
    args = ["--dataset", "cifar10", "--data-dir", str(cifar10_root), "--skip-checksum", "--no-download",
            "--test-samples", "100"]
    assert main(["train", "--models", "resnet20", "--num-nodes", "2", "--train-samples", "256", "--batch-size", "32",
                 "--epochs", "1", "--out-dir", str(tmp_path), "--no-progress", *args]) == 0
    run = tmp_path / "dml_n2_cifar10_resnet20_s42"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run / "0_resnet20" / "last.pt"), str(run / "1_resnet20" / "last.pt"),
                 "--json", str(out), *args[2:]]) == 0
    summary = json.loads(out.read_text())
    assert [c["top1"] for c in summary["checkpoints"]] == [r["test_acc"] for r in logged[:2]]
    assert summary["ensemble"]["top1"] == logged[2]["test_acc"]


@pytest.fixture
def no_downloads(monkeypatch):
    """Evaluating a run's checkpoints reads the run's own data: any download attempt fails the test
    (before a socket opens)."""
    def refuse(request, *args, **kwargs):
        pytest.fail(f"dml evaluate tried to download {getattr(request, 'full_url', request)}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _logged(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_evaluate_reads_the_data_where_the_run_read_it_from_any_directory(cifar_root, tmp_path, monkeypatch, capsys,
                                                                          no_downloads):
    """A relative --data-dir is the run's, from where it ran; a resume from elsewhere, with the data
    elsewhere, moves it; --skip-checksum is the run's choice; the command line overrides."""
    for folder, link in (("a", "cifar"), ("b", "moved"), ("c", None)):
        (tmp_path / folder).mkdir()
        if link:
            (tmp_path / folder / link).symlink_to(cifar_root)
    train = ["train", "--models", "resnet20", "--train-samples", "64", "--test-samples", "100", "--batch-size", "32",
             "--epochs", "2", "--skip-checksum", "--no-download", "--no-progress", "--out-dir", str(tmp_path / "runs")]
    monkeypatch.chdir(tmp_path / "a")
    assert main([*train, "--data-dir", "cifar", "--stop-after", "1"]) == 0
    monkeypatch.chdir(tmp_path / "b")
    assert main([*train, "--data-dir", "moved", "--resume"]) == 0
    (tmp_path / "a" / "cifar").unlink()  # the first location is gone: only the resumed one is the run's
    run = tmp_path / "runs" / "independent_resnet20_s42"

    monkeypatch.chdir(tmp_path / "c")
    capsys.readouterr()
    assert main(["evaluate", str(run / "0_resnet20" / "last.pt"), "--test-samples", "100", "--device", "cpu",
                 "--json", "e.json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"data: cifar100 test split from {tmp_path / 'b' / 'moved'} (the run's --data-dir; "
                      "checksum skipped, as the run did)")
    assert json.loads(Path("e.json").read_text())["checkpoints"][0]["top1"] == _logged(run)[-2]["test_acc"]

    assert main(["evaluate", str(run / "0_resnet20" / "last.pt"), "--test-samples", "100", "--device", "cpu",
                 "--data-dir", str(cifar_root)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (f"data: cifar100 test split from {cifar_root} (--data-dir; "
                                                       "checksum skipped, as the run did)")


def test_evaluate_reads_the_runs_image_folder_at_the_runs_image_size(tmp_path, monkeypatch, capsys, no_downloads):
    (tmp_path / "project").mkdir()
    write_folder(tmp_path / "project" / "images", size=16)
    monkeypatch.chdir(tmp_path / "project")
    assert main(["train", "--dataset", "folder", "--data-dir", "images", "--image-size", "12", "--models", "resnet20",
                 "--epochs", "1", "--batch-size", "6", "--out-dir", "runs", "--no-progress"]) == 0
    run = tmp_path / "project" / "runs" / "independent_folder_resnet20_s42"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(run / "0_resnet20" / "best.pt"), "--json", "e.json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"data: folder test split from {tmp_path / 'project' / 'images'} (the run's --data-dir; "
                      "images resized to 12x12, as the run did)")
    assert json.loads(Path("e.json").read_text())["checkpoints"][0]["top1"] == _logged(run)[0]["test_acc"]


def test_runs_that_read_different_data_need_a_data_dir(cifar10_root, tmp_path, capsys):
    model = constant_model([0, 0, 0, 9, 8, 7, 6, 5, 0, 0])
    paths = []
    for k, data_dir in enumerate((str(cifar10_root), "elsewhere")):
        paths.append(save_best(tmp_path / f"{k}.pt", model))
        state = torch.load(paths[-1], weights_only=True)
        state["config"]["data_dir"], state["working_dir"] = data_dir, str(tmp_path)
        write_checkpoint(paths[-1], state)
    common = ["--skip-checksum", "--no-download", "--device", "cpu", "--test-samples", str(SAMPLES)]
    assert main(["evaluate", *map(str, paths), *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the checkpoints' runs differ in --data-dir") and err.count("\n") == 1, err
    assert f"{paths[1]}: {tmp_path / 'elsewhere'}" in err and "pass --data-dir" in err
    assert main(["evaluate", *map(str, paths), *common, "--data-dir", str(cifar10_root)]) == 0


def test_a_damaged_file_is_called_unreadable_not_advised_to_be_deleted(tmp_path, capsys):
    path = save_best(tmp_path / "best.pt", constant_model([0.0] * 10))
    path.write_bytes(path.read_bytes()[:1000])
    assert main(["evaluate", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {path} is not a readable dml checkpoint: it is truncated, damaged or "
                          "another kind of file") and err.count("\n") == 1, err
    assert err.rstrip().endswith("pass another best.pt or last.pt of a dml run") and "delete" not in err


@pytest.mark.parametrize("given, suggested", [
    ("run", ["run/0_resnet20/best.pt", "run/1_resnet20/best.pt"]),  # a run directory: its peers' best.pt
    ("run/1_resnet20", ["run/1_resnet20/best.pt"]),
    ("run/2_resnet20", ["run/2_resnet20/last.pt"]),  # no best.pt (written where a peer improves): its last.pt
    ("run/ensemble", None),
])
def test_a_directory_is_called_a_directory_with_the_checkpoints_in_it(tmp_path, capsys, given, suggested):
    model = constant_model([0.0] * 10)
    save_best(tmp_path / "run" / "0_resnet20" / "best.pt", model)
    save_best(tmp_path / "run" / "1_resnet20" / "best.pt", model)
    save_last(tmp_path / "run" / "1_resnet20" / "last.pt", model)
    save_last(tmp_path / "run" / "2_resnet20" / "last.pt", model)
    (tmp_path / "run" / "ensemble").mkdir()
    assert main(["evaluate", str(tmp_path / given), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {tmp_path / given} is a directory, not a checkpoint file; ") \
        and err.count("\n") == 1, err
    if suggested is None:
        assert err.rstrip().endswith("it holds no best.pt or last.pt; pass another best.pt or last.pt of a dml run")
    else:
        assert err.rstrip().endswith("pass a checkpoint file in it: " + " ".join(str(tmp_path / s) for s in suggested))


def test_a_runs_temporal_mean_is_marked_and_left_out_of_the_ensemble_as_in_training(cifar10_root, tmp_path, capsys):
    """`dml evaluate RUN/*/last.pt` of a run with a temporal mean: the mean's row says whose mean it is, and the
    ensemble is training's (the two peers that train), with training's logged accuracy."""
    graph = tmp_path / "pcl_like.toml"
    graph.write_text('[[peer]]\nname = "a"\nmodel = "resnet20"\n[[peer]]\nname = "b"\nmodel = "resnet20"\n'
                     '[[peer]]\nname = "m"\nema_of = "a"\n')
    args = ["--dataset", "cifar10", "--data-dir", str(cifar10_root), "--skip-checksum", "--no-download",
            "--test-samples", "100"]
    assert main(["train", "--graph", str(graph), "--train-samples", "256", "--batch-size", "32", "--epochs", "1",
                 "--out-dir", str(tmp_path), "--no-progress", *args]) == 0
    run = next(tmp_path.glob("graph-*"))
    logged = {r["node"]: r["test_acc"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    # the console and the report show a mean's test accuracy, not its numbers on the training batches
    console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1 ")]
    mean_line = next(line for line in console if "mean of 0" in line)
    assert "test_acc" in mean_line and "train_loss" not in mean_line and "train_acc" not in mean_line
    assert all("train_loss" in line for line in console if "mean of" not in line and "ensemble" not in line)
    from dml.report import report

    mean_row = next(line for line in report([tmp_path]).splitlines() if line.startswith("| 2_resnet20 (mean of 0)"))
    cells = [c.strip() for c in mean_row.strip("|").split("|")]
    assert cells[1] == "–" and cells[-1] == "–" and cells[2] == f"{logged[2]:.2f}", cells
    out = tmp_path / "eval.json"
    paths = [str(run / folder / "last.pt") for folder in ("0_resnet20", "1_resnet20", "2_resnet20")]
    assert main(["evaluate", *paths, "--json", str(out), *args[2:]]) == 0
    summary = json.loads(out.read_text())
    assert [c["model"] for c in summary["checkpoints"]] == ["resnet20", "resnet20", "resnet20 (mean of 0)"]
    assert [c["top1"] for c in summary["checkpoints"]] == [logged[0], logged[1], logged[2]]
    assert summary["ensemble"]["model"] == "mean softmax of 2, without the means"
    assert summary["ensemble"]["top1"] == logged["ensemble"]
    assert "resnet20 (mean of 0)" in capsys.readouterr().out
