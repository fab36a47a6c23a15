"""Every setting of a training run, in one dataclass: the CLI fills it, config.json stores it,
``--resume`` compares it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .errors import UserError
from .models import folder_name, model_factory
from .runtime import DEVICES, PRECISIONS

DATASETS = ("cifar100", "cifar10", "folder")
UPDATES = ("simultaneous", "sequential")

# Settings that may change between a run and its resumption without changing what is computed.
RESUMABLE_CHANGES = frozenset(
    {"device", "data_dir", "out_dir", "name", "download", "download_url", "skip_checksum", "progress",
     "check_batches"}
)


@dataclass
class TrainConfig:
    models: list[str] = field(default_factory=lambda: ["resnet32"])
    num_nodes: int = 1
    dataset: str = "cifar100"
    image_size: int | None = None  # folder datasets: resize every image to this square side
    epochs: int = 200
    batch_size: int = 64
    lr: float = 0.1
    wd: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    temperature: float = 1.0
    kl_weight: float = 1.0
    update: str = "simultaneous"
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    plain: bool = False  # PyTorch's defaults: fp32 (unless --precision says otherwise), contiguous tensors,
    # one thread for all peers, BatchNorm kept at evaluation
    train_samples: int | None = None
    test_samples: int | None = None
    data_dir: str = "./data"
    out_dir: str = "./runs"
    name: str | None = None
    skip_checksum: bool = False
    download: bool = True
    download_url: str | None = None
    progress: bool = True
    check_batches: bool = False

    def __post_init__(self) -> None:
        self.models = list(self.models)
        if len(self.models) == 1 and self.num_nodes > 1:
            self.models = self.models * self.num_nodes
        self.validate()
        if self.name is None:
            self.name = self.default_name()

    def validate(self) -> None:
        if self.num_nodes < 1:
            raise UserError(f"--num-nodes must be at least 1, got {self.num_nodes}")
        if len(self.models) != self.num_nodes:
            raise UserError(
                f"--models lists {len(self.models)} names for --num-nodes {self.num_nodes}; "
                "give one name (used for every peer) or exactly --num-nodes names"
            )
        for name in self.models:
            try:
                model_factory(name)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        _positive_int("--epochs", self.epochs)
        _positive_int("--batch-size", self.batch_size)
        _positive_float("--lr", self.lr)
        _positive_float("--temperature", self.temperature)
        _non_negative_float("--wd", self.wd)
        _non_negative_float("--momentum", self.momentum)
        _non_negative_float("--kl-weight", self.kl_weight)
        if self.nesterov and self.momentum == 0:
            raise UserError("Nesterov momentum needs --momentum > 0; pass --momentum 0.9 or --no-nesterov")
        for flag, value, choices in (
            ("--dataset", self.dataset, DATASETS),
            ("--update", self.update, UPDATES),
            ("--device", self.device, DEVICES),
            ("--precision", self.precision, PRECISIONS),
        ):
            if value not in choices:
                raise UserError(f"{flag} {value!r} is not one of: {', '.join(choices)}")
        if self.image_size is not None:
            _positive_int("--image-size", self.image_size)
            if self.dataset != "folder":
                raise UserError(f"--image-size applies to --dataset folder; {self.dataset} images are 32x32")
        for flag, value in (("--train-samples", self.train_samples), ("--test-samples", self.test_samples)):
            if value is not None:
                _positive_int(flag, value)
        if self.train_samples is not None and self.train_samples < self.batch_size:
            raise UserError(
                f"--train-samples {self.train_samples} is smaller than --batch-size {self.batch_size}: "
                "no full training batch; raise --train-samples or lower --batch-size"
            )
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise UserError(f"--name {self.name!r} must be a plain folder name (no '/')")

    @property
    def is_dml(self) -> bool:
        return self.num_nodes > 1

    def default_name(self) -> str:
        """A name that says what ran, e.g. dml_n2_resnet32_s42 or independent_resnet32_s42."""
        unique = list(dict.fromkeys(folder_name(m) for m in self.models))
        models = "-".join(folder_name(m) for m in self.models) if len(unique) > 1 else unique[0]
        parts = [f"dml_n{self.num_nodes}" if self.is_dml else "independent", models]
        if self.dataset != "cifar100":
            parts.insert(1, self.dataset)
        return "_".join(parts + [f"s{self.seed}"])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, other: TrainConfig) -> list[str]:
        """Settings that differ and would change what a resumed run computes."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{k}: {theirs[k]!r} -> {mine[k]!r}"
            for k in mine
            if k not in RESUMABLE_CHANGES and mine[k] != theirs[k]
        ]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value!r}")


def _positive_float(flag: str, value) -> None:
    if not _is_number(value) or value <= 0:
        raise UserError(f"{flag} must be a positive finite number, got {value!r}")


def _non_negative_float(flag: str, value) -> None:
    if not _is_number(value) or value < 0:
        raise UserError(f"{flag} must be a non-negative finite number, got {value!r}")
