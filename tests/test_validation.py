"""The validation split (--val-samples): a seeded, class-balanced hold-out of the training images,
val_acc in the metrics, and best.pt chosen on it."""

import json

import pytest
import torch

from cifar_fixtures import make_cohort
from dml.checkpoint import save_epoch
from dml.config import TrainConfig
from dml.data.dataset import ImageSplit, hold_out
from dml.engine import load_data
from dml.errors import UserError
from dml.runlog import RunDir
from tiny_run import tiny_flags, train  # pytest puts the tests folder on sys.path

TINY = tiny_flags("--precision", "fp32")


def _split(per_class: list[int]) -> ImageSplit:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.arange(len(labels), dtype=torch.int64).view(-1, 1, 1, 1)  # each image names its index
    return ImageSplit(images=images, labels=labels)


def test_hold_out_is_a_seeded_class_balanced_partition():
    split = _split([20, 20, 20, 3])
    rest, held = hold_out(split, 22, seed=7, num_classes=4)
    held_ids, rest_ids = held.images.flatten().tolist(), rest.images.flatten().tolist()
    assert sorted(held_ids + rest_ids) == list(range(len(split)))  # a partition of the split
    assert held_ids == sorted(held_ids) and rest_ids == sorted(rest_ids)  # original order kept
    assert torch.equal(held.labels, split.labels[held.images.flatten()])
    assert sorted(torch.bincount(held.labels, minlength=4).tolist()) == [3, 6, 6, 7]  # class 3 gives its 3, the others share 19
    again, other = hold_out(split, 22, seed=7, num_classes=4)[1], hold_out(split, 22, seed=8, num_classes=4)[1]
    assert torch.equal(again.images, held.images) and not torch.equal(other.images, held.images)


@pytest.mark.parametrize("n", [0, 63])
def test_hold_out_needs_something_on_each_side(n):
    with pytest.raises(UserError, match="cannot hold out"):
        hold_out(_split([20, 20, 20, 3]), n, seed=0, num_classes=4)


def test_training_never_sees_the_validation_images(cifar_root):
    cfg = TrainConfig(data_dir=str(cifar_root), skip_checksum=True, download=False, progress=False,
                      val_samples=500, train_samples=1000)
    data = load_data(cfg, torch.device("cpu"))
    assert len(data.val) == 500 and len(data.train) == 1000
    assert torch.bincount(data.val.labels, minlength=100).tolist() == [5] * 100
    val_images = {bytes(img.numpy()) for img in data.val.images}
    assert not any(bytes(img.numpy()) in val_images for img in data.train.images)


def _records(val: float, test: float) -> list[dict]:
    return [{"epoch": 0, "node": 0, "model": "resnet20", "val_acc": val, "test_acc": test},
            {"epoch": 0, "node": "ensemble", "val_acc": val, "test_acc": test}]


def test_best_checkpoint_follows_validation_accuracy_not_test_accuracy(tmp_path):
    cohort = make_cohort(1)
    cfg = TrainConfig(models=["resnet20"], val_samples=100)
    run = RunDir(tmp_path, {0: "resnet20"})
    run.create(cfg, {})
    generator = torch.Generator()
    # validation peaks at epoch 2, test at epoch 3
    for epoch, (val, test) in enumerate([(10.0, 10.0), (30.0, 20.0), (25.0, 40.0)], start=1):
        records = _records(val, test)
        for r in records:
            r["epoch"] = epoch
        save_epoch(run, epoch, cohort, records, generator, cfg, num_classes=10)
    best = torch.load(tmp_path / "0_resnet20" / "best.pt", weights_only=True)
    assert (best["epoch"], best["selected_on"], best["val_acc"], best["test_acc"]) == (2, "val_acc", 30.0, 20.0)
    cohort.close()


def test_a_run_with_validation_logs_and_selects_on_it(cifar_root, tmp_path, capsys):
    assert train(cifar_root, tmp_path, "--models", "resnet20", "--num-nodes", "2", "--epochs", "3", "--val-samples", "200",
                 tiny=TINY) == 0
    run = tmp_path / "dml_n2_resnet20_s42"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc" in r for r in records)  # peers and ensemble
    summary = json.loads((run / "config.json").read_text())["data"]
    assert (summary["train_images"], summary["val_images"], summary["test_images"]) == (256, 200, 100)
    for node in (0, 1):
        mine = [r for r in records if r["node"] == node]
        chosen = max(mine, key=lambda r: (r["val_acc"], -r["epoch"]))  # the first epoch of highest val_acc
        best = torch.load(run / f"{node}_resnet20" / "best.pt", weights_only=True)
        assert best["epoch"] == chosen["epoch"] and best["test_acc"] == chosen["test_acc"]
    assert "val_acc" in capsys.readouterr().out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "ensemble"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"val_acc", "test_acc"}


def test_validation_larger_than_the_training_set_is_one_error_line(cifar_root, tmp_path, capsys):
    code = train(cifar_root, tmp_path, "--epochs", "1", "--val-samples", "50000", tiny=TINY)
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: --val-samples 50000 leaves 0 of the 50000 training images, "
                                               "fewer than --batch-size 32 or --train-samples 256; hold out fewer")
