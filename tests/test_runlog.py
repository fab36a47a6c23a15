"""RunDir as the one reader of metrics.jsonl: records, a torn last line, complete epochs, restarts."""

import json
import time

import pytest

from dml.errors import UserError
from dml.orchestrate import epochs_logged
from dml.runlog import METRICS_FILE, RunDir


def peer(epoch, node, acc=50.0):
    return {"epoch": epoch, "node": node, "model": "resnet20", "lr": 0.1, "train_loss": 1.0, "train_acc": acc,
            "val_acc": acc, "test_acc": acc, "seconds": 1.0}


def ensemble(epoch):
    return {"epoch": epoch, "node": "ensemble", "val_acc": 60.0, "test_acc": 60.0, "seconds": 1.0}


def epochs(*numbers):
    return [r for e in numbers for r in (peer(e, 0), peer(e, 1), ensemble(e))]


def write(path, records, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return RunDir(path, {0: "resnet20", 1: "resnet20"})


def test_log_epoch_ends_each_epoch_with_the_ensemble_record(tmp_path):
    run = RunDir(tmp_path, {0: "resnet20", 1: "resnet20"})
    run.log_epoch(epochs(1))
    run.log_epoch(epochs(2)[:2])  # the peers of epoch 2 without the ensemble: not complete
    try:
        assert [r.node for r in run.records()] == [0, 1, "ensemble", 0, 1]
        assert list(run.completed_epochs()) == [1] and run.last_completed_epoch() == 1
    finally:
        run.close()


@pytest.mark.parametrize("torn", [
    json.dumps(peer(3, 1))[:25],  # in a peer's record
    json.dumps(ensemble(3))[:-1],  # in the ensemble record, one character short
])
def test_a_torn_last_line_is_left_out_and_completes_no_epoch(tmp_path, torn):
    run = write(tmp_path, epochs(1, 2) + [peer(3, 0), peer(3, 1)][:1 + ("ensemble" in torn)], torn)
    assert [r.line for r in run.records()] == list(range(1, 7 + ("ensemble" in torn) + 1))
    assert list(run.completed_epochs()) == [1, 2]
    assert epochs_logged(tmp_path) == 2


def test_an_epoch_is_complete_when_its_ensemble_record_is_written(tmp_path):
    run = write(tmp_path, epochs(1) + [peer(2, 0), peer(2, 1)])  # every peer of epoch 2, no ensemble
    assert list(run.completed_epochs()) == [1]
    run = write(tmp_path, epochs(1) + [peer(2, 0), peer(2, 1), ensemble(2)])
    assert list(run.completed_epochs()) == [1, 2]
    assert sorted(run.completed_epochs()[2], key=str) == [0, 1, "ensemble"]


def test_a_record_written_again_replaces_the_earlier_one(tmp_path):
    run = write(tmp_path, epochs(1) + [peer(2, 0, acc=1.0)] + epochs(2))
    assert run.completed_epochs()[2][0].data["test_acc"] == 50.0


def test_a_damaged_line_in_the_middle_is_one_error(tmp_path):
    run = write(tmp_path, epochs(1)[:1])
    (tmp_path / METRICS_FILE).write_text('{"epoch": 1, "no\n' + (tmp_path / METRICS_FILE).read_text())
    with pytest.raises(UserError, match=r"metrics.jsonl line 1 is not valid JSON; the file is damaged"):
        run.records()
    write(tmp_path, [{"epoch": "one", "node": 0}], "")
    with pytest.raises(UserError, match=r"line 1 is not a dml metrics record"):
        run.records()


def test_missing_metrics(tmp_path):
    run = RunDir(tmp_path, {})
    assert run.records(missing_ok=True) == [] and run.completed_epochs() == {} and run.last_completed_epoch() == 0
    with pytest.raises(UserError, match="is missing"):
        run.records()


def test_truncate_keeps_the_checkpointed_epochs_and_drops_a_torn_line(tmp_path):
    run = write(tmp_path, epochs(1, 2), json.dumps(peer(3, 0))[:30])
    run.truncate_metrics(1)
    assert (tmp_path / METRICS_FILE).read_text() == "".join(json.dumps(r) + "\n" for r in epochs(1))


def test_the_trained_peers_are_neither_teachers_nor_temporal_means():
    from dml.config import TrainConfig
    from dml.runlog import saved_peers, trained_peers

    spec = {"peers": [{"name": "a", "model": "resnet20", "checkpoint": None, "sha256": None},
                      {"name": "t", "model": "resnet20", "checkpoint": "/t/best.pt", "sha256": "0" * 64},
                      {"name": "m", "model": "resnet20", "checkpoint": None, "sha256": None, "ema_of": 0, "decay": 0.9},
                      {"name": "b", "model": "resnet20", "checkpoint": None, "sha256": None}],
            "links": [], "combine": "mean"}
    cfg = TrainConfig(graph="g.toml", graph_spec=spec, name="g")
    assert trained_peers(cfg) == [0, 3]  # what dml tune averages
    assert sorted(saved_peers(cfg)) == [0, 2, 3]  # what has checkpoints: the mean too


def test_a_restart_record_completes_no_epoch_and_survives_a_later_resume(tmp_path):
    run = write(tmp_path, epochs(1))
    run.log_restart(1, restart=1, max_restarts=3)
    run.log_epoch(epochs(2)[:2])  # lost again in epoch 2, after its peers' records
    assert [r.node for r in run.records()] == [0, 1, "ensemble", "restart", 0, 1]
    assert list(run.completed_epochs()) == [1] and sorted(run.completed_epochs()[1], key=str) == [0, 1, "ensemble"]
    run.truncate_metrics(1)  # the next start resumes after epoch 1: the restart it followed stays on record
    assert [r.data for r in run.records()][-1] == {"epoch": 1, "node": "restart", "restart": 1, "max_restarts": 3,
                                                    "repeats_epoch": 2}
    run.close()


def test_a_resumed_run_shows_each_epoch_once_in_tensorboard(tmp_path):
    """Epoch 2 logged by a process lost before its checkpoint, then logged again after the resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunDir(tmp_path, {0: "resnet20", 1: "resnet20"})
    first.log_epoch(epochs(1) + [peer(2, 0, acc=10.0), peer(2, 1, acc=10.0), ensemble(2)])
    first.close()
    time.sleep(1.1)  # event files are named by the second they start in: the resumed writer's sorts after
    resumed = RunDir(tmp_path, {0: "resnet20", 1: "resnet20"})
    resumed.first_epoch = 2
    resumed.log_epoch([peer(2, 0, acc=20.0), peer(2, 1, acc=20.0), ensemble(2)] + epochs(3))
    resumed.close()
    events = EventAccumulator(str(tmp_path / "0_resnet20"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("test_acc")] == [(1, 50.0), (2, 20.0), (3, 50.0)]
