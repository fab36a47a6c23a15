"""--dataset folder: a user's own images in DIR/train/<class>/ and DIR/test/<class>/."""

import json

import numpy as np
import pytest
from PIL import Image

from dml.cli import main
from dml.data.folder import load_image_folder

CLASSES = ("cat", "dog", "eel")


def write_folder(root, size=16, per_class=(6, 3), classes=CLASSES, seed=0):
    """Random png (train) and jpg (test) images; returns the pixel arrays of the training images."""
    rng = np.random.default_rng(seed)
    train_pixels = []
    for split, count in zip(("train", "test"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                if split == "train":
                    Image.fromarray(pixels).save(folder / f"{i}.png")
                    train_pixels.append(pixels)
                else:
                    Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)
    return np.stack(train_pixels)


def _train(root, out, *extra):
    return main(["train", "--dataset", "folder", "--data-dir", str(root), "--models", "resnet20", "--num-nodes", "2",
                 "--epochs", "1", "--batch-size", "6", "--out-dir", str(out), "--no-progress", *extra])


def test_a_folder_trains_and_records_its_classes_and_statistics(tmp_path, capsys):
    pixels = write_folder(tmp_path / "images")
    assert _train(tmp_path / "images", tmp_path / "runs") == 0
    run = tmp_path / "runs" / "dml_n2_folder_resnet20_s42"
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["classes"] == list(CLASSES) and (data["train_images"], data["test_images"]) == (18, 9)
    scaled = pixels.astype(np.float64) / 255
    np.testing.assert_allclose(data["mean"], scaled.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(data["std"], scaled.std(axis=(0, 1, 2)), atol=1e-6)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["node"] for r in records] == [0, 1, "ensemble"]
    capsys.readouterr()
    assert main(["evaluate", str(run / "0_resnet20" / "last.pt"), "--dataset", "folder",
                 "--data-dir", str(tmp_path / "images"), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["checkpoints"][0]["top1"] == records[0]["test_acc"]


def test_labels_follow_sorted_class_names_and_pixels_are_kept(tmp_path):
    pixels = write_folder(tmp_path, classes=("b", "a"))
    data = load_image_folder(tmp_path, progress=False)
    assert data.class_names == ["a", "b"] and data.num_classes == 2
    assert data.train.labels.tolist() == [0] * 6 + [1] * 6
    # class "a" was written second: its first training image is pixels[6]
    assert np.array_equal(data.train.images[0].permute(1, 2, 0).numpy(), pixels[6])


def test_images_of_different_sizes_need_image_size(tmp_path, capsys):
    write_folder(tmp_path / "images")
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / "train" / "dog" / "big.png")
    assert _train(tmp_path / "images", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "big.png is 24x20" in err and "--image-size" in err
    assert _train(tmp_path / "images", tmp_path / "runs", "--image-size", "12") == 0
    assert json.loads((tmp_path / "runs" / "dml_n2_folder_resnet20_s42" / "config.json").read_text())["data"][
        "image_size"] == [12, 12]


@pytest.mark.parametrize(("damage", "message"), [
    (lambda root: (root / "test" / "eel").rename(root / "test" / "emu"),
     "hold different classes (only in train: ['eel']; only in test: ['emu'])"),
    (lambda root: [p.unlink() for p in (root / "train" / "cat").iterdir()], "train/cat holds no images"),
    (lambda root: (root / "train" / "dog" / "notes.txt").write_text("hi"), "notes.txt is not a png or jpg image"),
    (lambda root: (root / "train" / "dog" / "1.png").write_bytes(b"not a png"), "cannot read image"),
    (lambda root: (root / "train" / "stray.png").write_bytes(b""), "stray.png is not a class folder"),
    (lambda root: __import__("shutil").rmtree(root / "test"), "test is not a folder"),
])
def test_bad_folders_are_one_error_line(tmp_path, capsys, damage, message):
    write_folder(tmp_path / "images")
    damage(tmp_path / "images")
    assert _train(tmp_path / "images", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_image_size_is_only_for_folders(tmp_path, capsys):
    assert main(["train", "--image-size", "32", "--out-dir", str(tmp_path)]) == 2
    assert "--image-size applies to --dataset folder" in capsys.readouterr().err
