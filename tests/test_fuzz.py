"""Fuzzing the two readers of user files: the CIFAR reader and the checkpoint loader.

Whatever the damage (random bytes, truncation, a well-formed pickle of the wrong type, one value
replaced), the outcome is a UserError (``error: ...`` and status 2 on the command line) or, when
the damage happens to leave valid content, a normal result: never another exception, never a hang.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

# hypothesis is not among the `test` extra's requirements: skip this file where it is missing.
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cifar_fixtures import LAYOUTS, write_cifar_folder, write_pickle
from dml.checkpoint import PURPOSES, checkpoint_epoch, read_checkpoint
from dml.cli import main
from dml.data.cifar import load_cifar
from dml.errors import UserError
from tiny_run import tiny_flags, train_argv

# Function-scoped fixtures (tmp_path, capsys) are fine here: every example makes its own copy.
# DML_FUZZ_EXAMPLES=2000 searches longer than the default, which keeps the suite quick.
EXAMPLES = int(os.environ.get("DML_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Whole training runs: few examples, and no "explain" phase, which reruns a failure many times.
FEW = settings(max_examples=max(1, EXAMPLES // 4), deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture],
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])


class _Hang(BaseException):
    """Not an Exception: the readers' ``except Exception`` must not swallow the time limit."""


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (instead of blocking the suite) when the body runs longer than ``seconds``."""

    def on_alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    except _Hang:
        raise AssertionError(f"no result after {seconds} s: a hang") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- strategies ----------------------------------------------------------------------------

CIFAR_KEYS = ["data", "fine_labels", "coarse_labels", "fine_label_names", "filenames", "batch_label"]
keys = st.sampled_from(CIFAR_KEYS + [k.encode() for k in CIFAR_KEYS]) | st.text(max_size=8) | st.binary(max_size=8)

arrays = hnp.arrays(
    dtype=hnp.scalar_dtypes() | hnp.byte_string_dtypes(max_len=4) | hnp.unicode_string_dtypes(max_len=4),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
)
# Arrays that nearly pass the image check: the right width with a wrong dtype or row count, or
# a wrong width; their content does not matter, so zeros keep them cheap.
near_images = st.builds(
    np.zeros,
    st.tuples(st.integers(0, 25), st.sampled_from([3072, 3071, 3073, 1024])),
    st.sampled_from([np.uint8, np.int8, np.uint16, np.int64, np.float32, np.bool_, np.object_]),
)
labels_like = st.lists(st.integers(-3, 103), min_size=0, max_size=25) | hnp.arrays(
    dtype=st.sampled_from([np.int8, np.uint8, np.int64, np.float64, np.bool_]), shape=st.integers(0, 25))
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.complex_numbers() | st.text(max_size=12)
          | st.binary(max_size=12) | arrays | near_images | labels_like)
pyobjects = st.recursive(
    leaves,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.frozensets(st.integers(), max_size=3)
                   | st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)

tensors = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 4), max_size=3),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool, torch.bfloat16]),
)
CHECKPOINT_KEYS = ["model", "optimizer", "scheduler", "run", "epoch", "model_name", "best_acc", "best_epoch",
                   "index", "data_generator", "torch_rng"]
# What torch.save can write and weights_only loading may accept: plain containers and tensors.
torchobjects = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12) | tensors,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(st.sampled_from(CHECKPOINT_KEYS) | st.text(max_size=6) | st.integers(0, 3),
                                     inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def byte_damage(draw, original: bytes, hows=("random", "truncate", "flip")) -> bytes:
    """Random bytes, a truncation, or a few bytes of the original overwritten."""
    how = draw(st.sampled_from(hows))
    if how == "random":
        return draw(st.binary(max_size=4096))
    if how == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 8))):
        # Headers sit at both ends of pickles and zip files: favour those bytes.
        where = draw(st.integers(0, 511) | st.integers(0, len(data) - 1) | st.integers(len(data) - 512, len(data) - 1))
        data[where % len(data)] = draw(st.integers(0, 255))
    return bytes(data)


# --- the CIFAR reader ------------------------------------------------------------------------

COUNTS = {"train": 20, "test": 10}
CIFAR_FILES = ["meta", "train", "test"]


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory) -> Path:
    """A valid, small CIFAR-100 root; each example damages its own copy."""
    root = tmp_path_factory.mktemp("small_cifar")
    write_cifar_folder(root, "cifar100", n_train=COUNTS["train"], n_test=COUNTS["test"])
    return root


@contextlib.contextmanager
def copy_of(root: Path):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(root, tmp, dirs_exist_ok=True)
        yield Path(tmp)


def load_damaged(root: Path) -> None:
    """load_cifar must raise UserError, or return valid data when the damage was harmless."""
    with time_limit(10):
        try:
            data = load_cifar(root, "cifar100", download=False, skip_checksum=True, progress=False,
                              expected_counts=COUNTS)
        except UserError:
            return
    assert data.train.images.shape == (COUNTS["train"], 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.labels.dtype == torch.int64 and len(data.class_names) == 100
    for split in (data.train, data.test):
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 100


@FUZZ
@given(name=st.sampled_from(CIFAR_FILES), data=st.data())
def test_cifar_reader_survives_damaged_bytes(small_cifar, name, data):
    with copy_of(small_cifar) as root:
        path = root / LAYOUTS["cifar100"]["folder"] / name
        path.write_bytes(data.draw(byte_damage(path.read_bytes())))
        load_damaged(root)


@FUZZ
@given(name=st.sampled_from(CIFAR_FILES), obj=pyobjects)
def test_cifar_reader_survives_wrong_pickled_types(small_cifar, name, obj):
    with copy_of(small_cifar) as root:
        write_pickle(root / LAYOUTS["cifar100"]["folder"] / name, obj)
        load_damaged(root)


@FUZZ
@given(name=st.sampled_from(CIFAR_FILES), data=st.data())
def test_cifar_reader_survives_one_wrong_value(small_cifar, name, data):
    with copy_of(small_cifar) as root:
        path = root / LAYOUTS["cifar100"]["folder"] / name
        content = pickle.loads(path.read_bytes())
        key = data.draw(st.sampled_from(sorted(content)), label="key")
        content[key] = data.draw(pyobjects, label="value")
        write_pickle(path, content)
        load_damaged(root)


# Hand-written pickle opcodes: pickle.dump itself recurses and cannot write such deep objects.
def _deep(close: bytes, depth: int = 10_000) -> bytes:
    """``close`` b"l" nests lists, b"t" tuples: ((((0,),),),) ``depth`` levels deep."""
    return b"(" * depth + b"K\x00" + close * depth


def _key(text: str) -> bytes:
    return b"X" + len(text).to_bytes(4, "little") + text.encode()


def _dict_pickle(*items: tuple[bytes, bytes]) -> bytes:
    return b"\x80\x02}" + b"".join(key + value + b"s" for key, value in items) + b"."


def _data_pickle() -> bytes:
    return pickle.dumps(np.zeros((COUNTS["train"], 3072), np.uint8), protocol=2)[2:-1]


@pytest.mark.parametrize("name, content", [
    ("train", _dict_pickle((_key("data"), _deep(b"l")))),
    ("train", _dict_pickle((_deep(b"t"), b"K\x01"))),  # a key whose repr() recurses too deep
    ("meta", _dict_pickle((_key("fine_label_names"), b"(" + _deep(b"l", 2000) * 100 + b"l"))),
    ("train", _dict_pickle((_key("data"), _data_pickle()), (_key("fine_labels"), _deep(b"l")))),
], ids=["deep-data", "deep-key", "deep-class-names", "deep-labels"])
def test_cifar_reader_survives_deep_nesting(small_cifar, name, content):
    with copy_of(small_cifar) as root:
        (root / LAYOUTS["cifar100"]["folder"] / name).write_bytes(content)
        with time_limit(10), pytest.raises(UserError):
            load_cifar(root, "cifar100", download=False, skip_checksum=True, progress=False,
                       expected_counts=COUNTS)


# --- the checkpoint loader ------------------------------------------------------------------

RUN = "independent_resnet20_s42"
TINY = tiny_flags("--models", "resnet20", "--epochs", "2", train=64)
_train_args = partial(train_argv, tiny=TINY)


def run_main(args: list[str]) -> int:
    """``dml`` in this process, then denormal floats back on: training on CPU flushes them to
    zero process-wide, and hypothesis cannot draw floats without them."""
    try:
        return main(args)
    finally:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def stopped_run(cifar_root, tmp_path_factory) -> Path:
    """A real run stopped after epoch 1 of 2, so that resuming it has an epoch left to train."""
    out = tmp_path_factory.mktemp("fuzz_run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_main(_train_args(cifar_root, out, "--stop-after", "1")) == 0
    return out / RUN


@pytest.fixture(scope="module")
def last_pt(stopped_run) -> Path:
    # A path, not the bytes: hypothesis prints its arguments when a test fails.
    return stopped_run / "0_resnet20" / "last.pt"


def load_checkpoint_damaged(path: Path) -> None:
    """The reader raises UserError for every purpose, or accepts a checkpoint the damage left loadable."""
    with time_limit(10):
        for purpose in PURPOSES:
            try:
                read_checkpoint(path, purpose)
            except UserError:
                pass
        try:
            epoch = checkpoint_epoch(path)
        except UserError:
            return
    assert isinstance(epoch, int) and epoch >= 1


@FUZZ
@given(data=st.data())
def test_checkpoint_loader_survives_damaged_bytes(last_pt, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        path.write_bytes(data.draw(byte_damage(last_pt.read_bytes())))
        load_checkpoint_damaged(path)


@FUZZ
@given(obj=torchobjects)
def test_checkpoint_loader_survives_wrong_saved_types(obj):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        torch.save(obj, path)
        load_checkpoint_damaged(path)


# Where one value of a real checkpoint is replaced: the top level, the run state, the first
# parameter group of the optimizer, the first momentum buffer, the schedule.
PARTS = {
    "top": lambda state: state,
    "run": lambda state: state["run"],
    "param_group": lambda state: state["optimizer"]["param_groups"][0],
    "momentum": lambda state: state["optimizer"]["state"][0],
    "scheduler": lambda state: state["scheduler"],
}


def with_one_wrong_value(last_pt: Path, part: str, data) -> dict:
    state = torch.load(last_pt, weights_only=True)
    target = PARTS[part](state)
    key = data.draw(st.sampled_from(sorted(target, key=str)), label="key")
    target[key] = data.draw(torchobjects, label="value")
    return state


@FUZZ
@given(part=st.sampled_from(sorted(PARTS)), data=st.data())
def test_checkpoint_loader_survives_one_wrong_value(last_pt, part, data):
    state = with_one_wrong_value(last_pt, part, data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        torch.save(state, path)
        load_checkpoint_damaged(path)


# --- end to end: `dml train --resume` with a damaged last.pt ---------------------------------


@pytest.fixture(scope="module")
def read_data_once(cifar_root):
    """The in-process runs below read the (full-size) data once: they fuzz the checkpoint, not it."""
    import dml.engine

    cached = dml.engine.load_dataset("cifar100", cifar_root, download=False, skip_checksum=True, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dml.engine, "load_dataset", lambda *args, **kwargs: dataclasses.replace(cached))
        yield


def resume_in_process(cifar_root: Path, run: Path) -> tuple[int, str]:
    err = io.StringIO()
    with time_limit(120), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_main(_train_args(cifar_root, run.parent, "--resume"))
    return code, err.getvalue()


def assert_one_error_line(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err


@contextlib.contextmanager
def copy_of_run(stopped_run: Path):
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(stopped_run, Path(tmp) / RUN)
        yield Path(tmp) / RUN


def test_undamaged_checkpoint_resumes(cifar_root, stopped_run, read_data_once):
    """The premise of the fuzzers below: the checkpoint they damage resumes when left alone."""
    with copy_of_run(stopped_run) as run:
        code, err = resume_in_process(cifar_root, run)
        assert code == 0 and err == "", err
        assert torch.load(run / "0_resnet20" / "last.pt", weights_only=True)["run"]["epoch"] == 2


@FEW
@given(data=st.data())
def test_resume_with_damaged_bytes_is_one_error_line(cifar_root, stopped_run, last_pt, read_data_once, data):
    original = last_pt.read_bytes()
    # Overwritten bytes may leave a loadable checkpoint (a zip holds its names twice, for one);
    # random bytes and truncations never do.
    damaged = data.draw(byte_damage(original, hows=("random", "truncate")))
    with copy_of_run(stopped_run) as run:
        (run / "0_resnet20" / "last.pt").write_bytes(damaged)
        assert_one_error_line(*resume_in_process(cifar_root, run))


@FEW
@given(part=st.sampled_from(sorted(PARTS)), data=st.data())
def test_resume_with_one_wrong_value_is_one_error_line_or_runs(cifar_root, stopped_run, last_pt, read_data_once,
                                                               part, data):
    """A checkpoint edited by hand: refused with one line, or (a harmless edit) resumed."""
    state = with_one_wrong_value(last_pt, part, data)
    with copy_of_run(stopped_run) as run:
        torch.save(state, run / "0_resnet20" / "last.pt")
        code, err = resume_in_process(cifar_root, run)
        if code != 0:
            assert_one_error_line(code, err)
        else:  # a harmless edit: the run resumed and finished its next epoch with finite numbers
            assert err == "", err
            assert torch.load(run / "0_resnet20" / "last.pt", weights_only=True)["run"]["epoch"] == 2
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert {r["epoch"] for r in records} == {1, 2}
            assert all(math.isfinite(r["train_loss"]) for r in records if "train_loss" in r)


@pytest.mark.processes  # a dml train process
@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_resume_with_damaged_checkpoint_in_a_real_process(cifar_root, stopped_run, last_pt, tmp_path, damage):
    shutil.copytree(stopped_run, tmp_path / RUN)
    last = tmp_path / RUN / "0_resnet20" / "last.pt"
    last.write_bytes(np.random.default_rng(0).bytes(2048) if damage == "random-bytes" else last_pt.read_bytes()[:1000])
    proc = subprocess.run([sys.executable, "-m", "dml", *_train_args(cifar_root, tmp_path, "--resume")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert_one_error_line(proc.returncode, proc.stderr)
    assert str(last) in proc.stderr


def _set(state: dict, path: tuple, value) -> dict:
    *parents, last = path
    target = state
    for key in parents:
        target = target[key]
    target[last] = value
    return state


# Values load_state_dict accepted as they were; training then failed with a traceback.
@pytest.mark.parametrize("path, value", [
    (("best_acc",), None),
    (("best_epoch",), "1"),
    (("optimizer", "param_groups", 0, "lr"), "0.1"),
    (("optimizer", "state", 0, "momentum_buffer"), torch.zeros(3)),
    (("optimizer", "state", 0, "momentum_buffer"), 0.0),
    (("scheduler", "base_lrs"), None),
    (("run", "data_generator"), torch.zeros(16, dtype=torch.uint8)),
    (("run", "torch_rng"), torch.zeros(5056, dtype=torch.int64)),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else type(v).__name__)
def test_resume_refuses_values_training_would_trip_on(cifar_root, stopped_run, last_pt, read_data_once, path, value):
    state = _set(torch.load(last_pt, weights_only=True), path, value)
    with copy_of_run(stopped_run) as run:
        torch.save(state, run / "0_resnet20" / "last.pt")
        code, err = resume_in_process(cifar_root, run)
        assert_one_error_line(code, err)
        assert "does not fit peer 0_resnet20" in err
