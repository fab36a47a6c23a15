"""Streamed image folders (--data-loader stream): decoded batch by batch in DataLoader workers, each process
loading only the rows it computes, with the in-memory path's order and exact resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dml.cli import main
from dml.data.augment import Normalise
from dml.data.batches import TrainBatches
from dml.data.folder import load_image_folder
from dml.data.source import choose_loader, load_dataset
from dml.data.stream import (
    DecodedImages,
    FileSplit,
    StreamedTestBatches,
    StreamedTrainBatches,
    centre_crop_box,
    random_resized_crop,
)
from dml.errors import UserError
from test_folder import write_folder  # pytest puts the tests folder on sys.path


def _generator(seed=3):
    return torch.Generator().manual_seed(seed)


def test_the_random_resized_crop_stays_in_the_image_and_follows_its_seed():
    for seed in range(200):
        left, top, w, h = random_resized_crop(500, 375, np.random.default_rng(seed))
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375 and w > 0 and h > 0
        assert 0.08 * 500 * 375 * 0.9 <= w * h  # the area drawn in 0.08-1 (rounding aside), or the fallback
    draws = {random_resized_crop(500, 375, np.random.default_rng(7)) for _ in range(3)}
    assert len(draws) == 1
    assert random_resized_crop(1000, 10, np.random.default_rng(0)) == (493, 0, 13, 10)  # no fit: centre, ratio 4/3


def test_evaluation_resizes_the_short_side_to_8_7_of_the_size_and_takes_the_centre():
    assert centre_crop_box(500, 375, 224) == ((341, 256), (58, 16, 282, 240))
    assert centre_crop_box(375, 500, 224) == ((256, 341), (16, 58, 240, 282))


def _memory_and_streamed(root, size):
    memory = load_image_folder(root, size, progress=False)
    streamed = load_dataset("folder", str(root), image_size=size, loader="stream")
    return memory, streamed


@pytest.mark.parametrize("workers", [0, 2])
def test_without_augmentation_streamed_batches_equal_the_in_memory_ones(tmp_path, workers):
    write_folder(tmp_path / "images", size=20, per_class=(8, 3))
    memory, streamed = _memory_and_streamed(tmp_path / "images", 16)
    assert streamed.streamed and not memory.streamed and streamed.class_names == memory.class_names
    normalise = Normalise(memory.mean, memory.std, torch.device("cpu"))
    ours = TrainBatches(memory.train.images, memory.train.labels, 5, _generator(), normalise, augment=False)
    theirs = StreamedTrainBatches(streamed.train, 16, 5, _generator(), normalise, augment=False, workers=workers)
    for _epoch in range(2):  # the generator carries on between epochs in both
        pairs = list(zip(ours, theirs, strict=True))
        assert len(pairs) == 4
        for (x, y), (xs, ys) in pairs:
            assert torch.equal(x, xs) and torch.equal(y, ys)


def test_augmented_batches_depend_on_the_seed_only_not_on_the_workers(tmp_path):
    write_folder(tmp_path / "images", size=24, per_class=(6, 2))
    data = load_dataset("folder", str(tmp_path / "images"), image_size=16, loader="stream")
    normalise = Normalise(data.mean, data.std, torch.device("cpu"))
    runs = [list(StreamedTrainBatches(data.train, 16, 6, _generator(), normalise, workers=w)) for w in (0, 2)]
    for (x0, y0), (x2, y2) in zip(*runs, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    other = list(StreamedTrainBatches(data.train, 16, 6, _generator(4), normalise))
    assert not torch.equal(other[0][0], runs[0][0][0])
    flat = torch.cat([x for x, _ in runs[0]])
    assert flat.shape == (18, 3, 16, 16)


def _half(n, d):
    return d * n // 2, (d + 1) * n // 2


def test_each_replica_loads_its_rows_of_every_batch(tmp_path):
    """What --data-parallel 2 decodes: replica d loads rows d B/2 .. (d+1) B/2 - 1 of each global batch."""
    write_folder(tmp_path / "images", size=16, per_class=(8, 4))
    data = load_dataset("folder", str(tmp_path / "images"), image_size=16, loader="stream")
    normalise = Normalise(data.mean, data.std, torch.device("cpu"))
    whole = list(StreamedTrainBatches(data.train, 16, 6, _generator(), normalise))
    halves = [
        list(StreamedTrainBatches(data.train, 16, 6, _generator(), normalise, rows=lambda n, d=d: _half(n, d)))
        for d in (0, 1)
    ]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves, strict=True):
        assert x0.shape[0] == x1.shape[0] == 3
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # 12 test images in batches of 11: the last batch's one row is replica 1's; replica 0 still joins that batch
    test = [
        list(StreamedTestBatches(data.test, 16, 11, normalise, rows=lambda n, d=d: _half(n, d)))
        for d in (0, 1)
    ]
    assert [len(y) for _, y in test[0]] == [5, 0] and [len(y) for _, y in test[1]] == [6, 1]
    assert test[0][1][0].shape == (0, 3, 16, 16)
    assert torch.equal(torch.cat([y for part in test for _, y in part]).sort().values, data.test.labels.sort().values)


def test_grayscale_palette_and_cmyk_images_become_rgb_and_val_is_the_test_split(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert("L").save(folder / "gray.png")
            Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
            Image.fromarray(pixels).convert("P").save(folder / "palette.png")
    data = load_dataset("folder", str(root), image_size=16, loader="stream")
    assert len(data.train) == 6 and len(data.test) == 6 and data.class_names == ["a", "b"]
    x, y = DecodedImages(data.test, 16, "eval")[(0, 0)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8


def test_the_loader_is_chosen_from_the_decoded_size(tmp_path, monkeypatch):
    write_folder(tmp_path / "images", size=16, per_class=(4, 2))
    root = str(tmp_path / "images")
    assert choose_loader("folder", root, 16, "auto")[0] == "memory"
    monkeypatch.setattr("dml.data.source.MEMORY_SHARE", 1e-9)  # as if memory were scarce
    assert choose_loader("folder", root, 16, "auto")[0] == "stream"
    assert choose_loader("folder", root, None, "auto")[0] == "memory"  # without --image-size only memory reads it
    assert choose_loader("folder", root, 16, "memory")[0] == "memory"
    with pytest.raises(UserError, match="crops every image to --image-size"):
        choose_loader("folder", root, None, "stream")
    with pytest.raises(UserError, match="reads image folders"):
        choose_loader("cifar100", root, None, "stream")


def _train(root, out, *extra):
    return main(["train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "16", "--models", "resnet20",
                 "--num-nodes", "2", "--epochs", "2", "--batch-size", "6", "--out-dir", str(out), "--no-progress",
                 "--threads", "1", "--data-loader", "stream", "--workers", "1", *extra])


def _records(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_streamed_run_says_so_repeats_itself_and_resumes_exactly(tmp_path, capsys):
    write_folder(tmp_path / "images", size=20, per_class=(8, 3))
    assert _train(tmp_path / "images", tmp_path / "a") == 0
    out = capsys.readouterr().out
    assert "images streamed by 1 worker(s) per process (--data-loader stream)" in out.splitlines()[0]
    run = tmp_path / "a" / "dml_n2_folder_resnet20_s42"
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["loader"] == "stream" and data["image_size"] == [16, 16]
    assert _train(tmp_path / "images", tmp_path / "b") == 0  # the same seed: the same run
    assert _records(tmp_path / "b" / "dml_n2_folder_resnet20_s42") == _records(run)
    assert _train(tmp_path / "images", tmp_path / "c", "--stop-after", "1", "--workers", "2") == 0
    assert _train(tmp_path / "images", tmp_path / "c", "--resume") == 0  # another worker count may resume it
    assert _records(tmp_path / "c" / "dml_n2_folder_resnet20_s42") == _records(run)
    # dml evaluate reads the run's folder as the run did (streamed, centre crops) and gives its logged accuracy
    assert main(["evaluate", str(run / "0_resnet20" / "best.pt"), "--json", str(tmp_path / "e.json")]) == 0
    best = max(r["test_acc"] for r in _records(run) if r["node"] == 0)
    assert json.loads((tmp_path / "e.json").read_text())["checkpoints"][0]["top1"] == best


def test_subsets_and_a_validation_split_of_a_streamed_folder(tmp_path, capsys):
    write_folder(tmp_path / "images", size=20, per_class=(8, 3))
    assert _train(tmp_path / "images", tmp_path / "runs", "--train-samples", "12", "--test-samples", "6",
                  "--val-samples", "6", "--epochs", "1") == 0
    run = tmp_path / "runs" / "dml_n2_folder_resnet20_s42"
    data = json.loads((run / "config.json").read_text())["data"]
    assert (data["train_images"], data["test_images"], data["val_images"]) == (12, 6, 6)
    assert all("val_acc" in r for r in _records(run))


def test_a_plan_streams_its_runs_as_dml_train_would(tmp_path):
    from dml.orchestrate import train_command
    from dml.plan import read_plan

    plan = tmp_path / "plan.toml"
    plan.write_text('[defaults]\ndataset = "folder"\ndata_dir = "/data/imagenet"\nimage_size = 224\n'
                    'data_loader = "stream"\nworkers = 3\naugment = false\nval_samples = 100\nmodels = "resnet18"\n')
    command = train_command(read_plan(plan, tmp_path / "out").runs[0], tmp_path / "out", resume=False)
    flags = " ".join(command)
    assert "--data-loader stream" in flags and "--workers 3" in flags and "--no-augment" in flags
    assert "--models resnet18" in flags


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_that_is_not_an_image_stops_the_stream_with_its_name(tmp_path, workers):
    write_folder(tmp_path / "images", size=16, per_class=(4, 2))
    data = load_dataset("folder", str(tmp_path / "images"), image_size=16, loader="stream")
    bad = tmp_path / "images" / "train" / "cat" / "9.jpg"
    bad.write_bytes(b"not a jpeg at all")
    split = FileSplit([*data.train.files, bad], torch.cat([data.train.labels, torch.tensor([0])]))
    normalise = Normalise(data.mean, data.std, torch.device("cpu"))
    with pytest.raises(UserError, match=f"cannot read image {bad} \\(not an image, or damaged\\)"):
        for _ in StreamedTrainBatches(split, 16, 13, _generator(), normalise, workers=workers):
            pass


def test_a_streamed_run_on_a_damaged_image_is_one_error_line(tmp_path, capsys):
    write_folder(tmp_path / "images", size=20, per_class=(8, 3))
    (tmp_path / "images" / "train" / "dog" / "3.png").write_bytes(b"\x89PNG damaged")
    assert _train(tmp_path / "images", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image ") and "dog/3.png" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers must be 0 or more, got -1"),
    (["--dataset", "cifar100", "--data-loader", "stream"], "--data-loader stream reads image folders"),
])
def test_streaming_mistakes_are_one_error_line(tmp_path, capsys, flags, message):
    assert main(["train", "--out-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.processes  # dml train over two processes, gloo
def test_two_replicas_each_decode_half_of_every_batch_and_track_one_process(tmp_path):
    """Counted: a sitecustomize in every process of the run records which training image each one decodes. Without
    augmentation the streamed run computes what the in-memory one computes, and tracks one process."""
    write_folder(tmp_path / "images", size=16, per_class=(8, 4))
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(f"""
import os
if os.environ.get("RANK") is not None:
    import dml.data.stream as stream
    decode, estimate, counting = stream.DecodedImages.__getitem__, stream.estimate_stats, []
    def counted(self, item):
        if self.mode != "eval" and counting:
            with open({str(tmp_path / 'decoded')!r} + os.environ["RANK"], "a") as f:
                f.write(f"{{item[0]}}\\n")
        return decode(self, item)
    def uncounted(*args, **kwargs):  # the normalisation statistics' sample, before training
        statistics = estimate(*args, **kwargs)
        counting.append(True)
        return statistics
    stream.DecodedImages.__getitem__, stream.estimate_stats = counted, uncounted
""")
    env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = [sys.executable, "-m", "dml", "train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"),
              "--image-size", "16", "--models", "resnet20", "--epochs", "1", "--batch-size", "6", "--no-progress",
              "--threads", "1", "--workers", "1", "--precision", "fp32", "--no-augment", "--lr", "0.001"]
    two = ["--procs", "2", "--data-parallel", "2"]
    runs = {
        "stream2": [*common, "--data-loader", "stream", *two],
        "memory2": [*common, "--data-loader", "memory", *two],
        "stream1": [*common, "--data-loader", "stream"],
    }
    for name, command in runs.items():
        done = subprocess.run([*command, "--out-dir", str(tmp_path / name)], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        if name == "stream2":
            decoded = [[int(i) for i in (tmp_path / f"decoded{r}").read_text().split()] for r in (0, 1)]
    assert len(decoded[0]) == len(decoded[1]) == 12  # 24 images, 4 batches of 6: 3 rows of each per replica
    assert set(decoded[0]).isdisjoint(decoded[1]) and sorted(decoded[0] + decoded[1]) == list(range(24))
    got = {name: _records(tmp_path / name / "independent_folder_resnet20_s42") for name in runs}
    for r in got["memory2"]:  # the paths differ in their evaluation transform only
        r.pop("test_acc")
    assert [{k: v for k, v in r.items() if k != "test_acc"} for r in got["stream2"]] == got["memory2"]
    # one process sums each BatchNorm's statistics in another order: 2.6e-5 apart after 4 steps, as the in-memory
    # path is (stream2 equals memory2 above)
    assert got["stream2"][0]["train_loss"] == pytest.approx(got["stream1"][0]["train_loss"], rel=1e-4)
    assert got["stream2"][0]["test_acc"] == got["stream1"][0]["test_acc"]


@pytest.mark.processes  # kill -9 of a dml train process
def test_a_streamed_run_killed_with_sigkill_resumes_bit_exactly(tmp_path):
    import signal
    import time

    write_folder(tmp_path / "images", size=20, per_class=(8, 3))
    command = [sys.executable, "-m", "dml", "train", "--dataset", "folder", "--data-dir", str(tmp_path / "images"),
               "--image-size", "16", "--models", "resnet20", "--num-nodes", "2", "--epochs", "3", "--batch-size", "6",
               "--no-progress", "--threads", "1", "--data-loader", "stream", "--workers", "2"]
    straight = subprocess.run([*command, "--out-dir", str(tmp_path / "straight")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    process = subprocess.Popen([*command, "--out-dir", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "dml_n2_folder_resnet20_s42" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"epoch": 1, "node": "ensemble"' in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the run never finished epoch 1"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # its workers, children of a killed process, end with it
    process.wait()
    resumed = subprocess.run([*command, "--out-dir", str(tmp_path / "killed"), "--resume"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _records(metrics.parent) == _records(tmp_path / "straight" / "dml_n2_folder_resnet20_s42")

