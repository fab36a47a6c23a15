"""Every setting of a training run, in one dataclass: the CLI fills it, config.json stores it,
``--resume`` compares it."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .choices import DEVICES, LOADERS, PRECISIONS
from .errors import UserError
from .models import MODEL_NAMES, folder_name, model_factory

if TYPE_CHECKING:
    from .peer import MeanOf

# graph.py (and with it torch) is imported where a graph is read, not here: the command line is
# generated from this module, and `dml --help` took 3 s when it imported torch.

DATASETS = ("cifar100", "cifar10", "folder")
UPDATES = ("simultaneous", "sequential")
KD_RAMPS = ("linear", "sigmoid")  # --kd-ramp R: every KL link's gate is R_ramp (links.py)

# Settings that may change between a run and its ``--resume`` without changing what is computed
# (config.differences). Graph files and teachers are compared through graph_spec, their contents.
RESUME_MAY_CHANGE = frozenset(
    {
        "device",
        "data_dir",
        "out_dir",
        "name",
        "download",
        "download_url",
        "skip_checksum",
        "progress",
        "check_batches",
        "graph",
        "teacher",
        "teacher_model",
        "threads",
        "data_parallel",
        "workers",
    }
)


GROUPS = ("cohort", "recipe", "data", "run", "distributed")


def setting(default=None, *, group: str, help: str, factory=None, **argument):
    """A TrainConfig field with what its command-line flag needs: its help group, help text and any
    argparse options (``flag`` renames it; booleans become switches)."""
    metadata = {"group": group, "help": help, "argument": argument}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of ``dml train``; the command line is generated from these fields."""

    models: list[str] = setting(
        group="cohort",
        factory=lambda: ["resnet32"],
        nargs="+",
        metavar="NAME",
        help="one name for every peer, or one per peer: a built-in network "
        f"({', '.join(MODEL_NAMES)}) or package.module:factory (a callable taking "
        "num_classes that returns an nn.Module, imported from the current directory "
        "or PYTHONPATH)",
    )
    num_nodes: int = setting(1, group="cohort", help="number of peers K (1 = independent)")
    teacher: list[str] | None = setting(
        group="cohort",
        nargs="+",
        metavar="CHECKPOINT",
        help="knowledge distillation: frozen teacher(s) from a best.pt or last.pt of "
        "an earlier run; every peer of --models learns from them (and from "
        "each other) with --temperature and --kl-weight",
    )
    teacher_model: list[str] | None = setting(
        group="cohort",
        nargs="+",
        metavar="NAME",
        help="the network each --teacher checkpoint holds (one name for "
        "all, or one per teacher); needed where it is "
        "package.module:factory, which a checkpoint never imports by "
        "itself",
    )
    graph: str | None = setting(
        group="cohort",
        metavar="FILE",
        help="a TOML file of peers (trainable, frozen from a checkpoint, or a temporal "
        "mean: ema_of = PEER), links (source, target, temperature, weight, gate) and "
        "[[trunk]] tables; replaces --models, --num-nodes and --teacher (see README)",
    )
    dataset: str = setting(
        "cifar100",
        group="data",
        choices=DATASETS,
        help="cifar100 / cifar10 (official files), or folder: --data-dir holds train/<class>/ "
        "and test/<class>/ with png or jpg images",
    )
    image_size: int | None = setting(
        group="data",
        metavar="S",
        help="folder datasets: resize every image to SxS (needed when their sizes differ); a streamed folder "
        "crops to SxS (random-resized crops for training, the centre crop for evaluation)",
    )
    data_loader: str = setting(
        "auto",
        group="data",
        choices=LOADERS,
        help="memory: decode a folder once into memory (fastest where it fits); stream: decode it batch by batch "
        "in --workers processes, each process loading only the rows it computes; auto: stream where the decoded "
        "images would take more than a quarter of the available memory",
    )
    workers: int | None = setting(
        group="data",
        metavar="N",
        help="processes decoding a streamed folder, per training process (default: its cores less one; 0 decodes "
        "in the training process)",
    )
    augment: bool = setting(True, group="data", help="train on the images as they are: no crops, no flips")
    epochs: int = setting(200, group="recipe", help="epochs of the schedule")
    batch_size: int = setting(64, group="recipe", help="images per step (the last partial batch is dropped)")
    lr: float = setting(0.1, group="recipe", help="initial learning rate (cosine to 0, or steps with --lr-milestones)")
    lr_milestones: list[int] | None = setting(
        group="recipe",
        nargs="+",
        metavar="EPOCH",
        help="a step schedule instead of the cosine: the learning rate is "
        "multiplied by --lr-gamma after each of these epochs (e.g. 150 225, "
        "the recipe of ONE, OKDDip and PCL's 300 epochs)",
    )
    lr_gamma: float = setting(0.1, group="recipe", help="with --lr-milestones: the factor at each milestone")
    wd: float = setting(5e-4, group="recipe", help="weight decay")
    momentum: float = setting(0.9, group="recipe", help="SGD momentum")
    nesterov: bool = setting(True, group="recipe", help="plain momentum instead of Nesterov")
    temperature: float = setting(1.0, group="cohort", help="softmax temperature T of the KL term")
    kl_weight: float = setting(1.0, group="cohort", help="weight w of the KL term")
    kd_ramp: str | None = setting(
        group="cohort",
        choices=KD_RAMPS,
        help="ramp the KL term's weight up with every step instead of using it at once: "
        "linear (t) or sigmoid (exp(-5 (1 - t)^2), the ramp of ONE, OKDDip and "
        "PCL), t going from 0 to 1 over --kd-ramp-epochs",
    )
    kd_ramp_epochs: float | None = setting(
        group="cohort",
        metavar="E",
        help="epochs the --kd-ramp takes to reach full weight (fractions allowed; default: the whole run)",
    )
    update: str = setting(
        "simultaneous",
        group="cohort",
        choices=UPDATES,
        help="simultaneous: all peers step on one set of predictions; sequential: the paper's "
        "Algorithm 1, peers step in turn",
    )
    seed: int = setting(42, group="recipe", help="seed of initial weights, batches and subsets")
    device: str = setting("auto", group="run", choices=DEVICES, help="auto: CUDA, then MPS, then CPU")
    precision: str = setting(
        "auto", group="run", choices=PRECISIONS, help="auto: bf16 autocast on CPU, bf16 (or fp16) autocast on CUDA"
    )
    plain: bool = setting(
        False,
        group="run",
        help="PyTorch's plain path: fp32 unless --precision says otherwise, contiguous memory, "
        "denormals kept, peers on one thread, BatchNorm kept at evaluation (slower; a "
        "reference for numerics)",
    )
    threads: int | None = setting(
        group="run",
        metavar="N",
        help="intra-op threads per peer on CPU (default: the peer's share of the cores, or "
        "fewer when other programs keep them busy, measured at start and recorded in "
        "config.json; a resumed run keeps its count)",
    )
    train_samples: int | None = setting(
        group="data", metavar="N", help="train on a seeded, class-balanced subset of N images (quick runs)"
    )
    test_samples: int | None = setting(
        group="data", metavar="N", help="evaluate on a seeded, class-balanced subset of N images"
    )
    val_samples: int | None = setting(
        group="data",
        metavar="N",
        help="hold out a seeded, class-balanced validation split of N training images: "
        "metrics gain val_acc and best.pt is chosen on it (not on test accuracy)",
    )
    data_dir: str = setting(
        "./data",
        group="data",
        help="folder holding cifar-100-python/ (or the .tar.gz archive; downloaded there if "
        "absent), or the image folder of --dataset folder",
    )
    out_dir: str = setting("./runs", group="run", help="parent folder of run directories")
    name: str | None = setting(group="run", help="run directory name (default says what ran, e.g. dml_n2_resnet32_s42)")
    skip_checksum: bool = setting(
        False,
        group="data",
        help="accept data files whose MD5 differs from the official release (structure is still checked)",
    )
    download: bool = setting(True, group="data", help="fail at once if the data is missing instead of downloading it")
    download_url: str | None = setting(
        group="data", metavar="URL", help="archive URL for a mirror (default: the official URL, or $DML_DOWNLOAD_URL)"
    )
    progress: bool = setting(True, group="run", help="no progress bars")
    check_batches: bool = setting(
        False, group="distributed", help="compare a fingerprint of every batch across processes and stop on a mismatch"
    )
    data_parallel: int = setting(
        1,
        group="distributed",
        metavar="D",
        help="replicas per peer (under --procs or torchrun): the processes form peer groups "
        "x D replicas; each replica computes 1/D of every --batch-size batch, their "
        "gradients averaged and BatchNorm statistics shared (the results of one process "
        "up to rounding)",
    )
    local_batchnorm: bool = setting(
        False,
        group="distributed",
        help="with --data-parallel: each replica's BatchNorm uses its own shard's statistics "
        "(faster; a change of the algorithm, not only of the layout)",
    )
    # The peers and links of --graph or --teacher, resolved (no flag of its own): config.json stores
    # it and --resume compares it, so a changed file or teacher checkpoint is noticed.
    graph_spec: dict | None = field(default=None, metadata={"group": None})

    def __post_init__(self) -> None:
        """Checks every setting and reads no file: the peers and links of --graph or --teacher stay
        unresolved (graph_spec None, name None unless given) until ``resolved()``."""
        self.models = list(self.models)
        if len(self.models) == 1 and self.num_nodes > 1:
            self.models = self.models * self.num_nodes
        self.validate()
        if self.graph_spec is not None:
            self.models = [peer["model"] for peer in self.graph_spec["peers"]]
            self.num_nodes = len(self.models)
            if len({t["branches"] for t in self.trunks if t.get("views")}) > 1:
                raise UserError(
                    f"graph file {self.graph}: trunks with views see one augmentation of the batch per "
                    "branch: give them the same number of branches"
                )
            if self.trunks and self.update != "simultaneous":
                raise UserError(f"graph file {self.graph}: branches on a shared trunk train with --update simultaneous")
        if self.name is None and not self.unresolved:
            self.name = self.default_name()

    @property
    def unresolved(self) -> bool:
        """True where --graph or --teacher names files whose peers are not read yet (see ``resolved``)."""
        return self.graph_spec is None and bool(self.graph or self.teacher)

    def resolved(self) -> TrainConfig:
        """This configuration with the graph file or teacher checkpoints of --graph / --teacher read
        into graph_spec (each checkpoint loaded for its model name and hashed), its peers and default
        name: a step of ``dml train`` (config.json stores the result, --resume compares it). Itself
        where there is nothing to resolve."""
        if not self.unresolved:
            return self
        return replace(self, graph_spec=self._read_graph(open_checkpoints=True))

    def count_trained_peers(self) -> int:
        """How many peers learn, opening no checkpoint: from graph_spec once resolved; otherwise the
        students of --teacher, or the peers of the --graph file that name no checkpoint. A graph file is
        read and checked, and every teacher checkpoint checked to exist (what a plan validates)."""
        if not self.unresolved:
            return self.trained_peers
        spec = self._read_graph(open_checkpoints=False)
        return sum(peer["checkpoint"] is None and "ema_of" not in peer for peer in spec["peers"])

    def validate(self) -> None:
        if self.num_nodes < 1:
            raise UserError(f"--num-nodes must be at least 1, got {self.num_nodes}")
        if len(self.models) != self.num_nodes:
            raise UserError(
                f"--models lists {len(self.models)} names for --num-nodes {self.num_nodes}; "
                "give one name (used for every peer) or exactly --num-nodes names"
            )
        for name in self.models if self.graph_spec is None else ():  # a graph's peers were checked when read
            try:
                model_factory(name)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        _positive_int("--epochs", self.epochs)
        _positive_int("--batch-size", self.batch_size)
        if self.threads is not None:
            _positive_int("--threads", self.threads)
        _positive_float("--lr", self.lr)
        _positive_float("--lr-gamma", self.lr_gamma)
        if self.lr_milestones is not None:
            milestones = list(self.lr_milestones)
            if (
                not milestones
                or any(isinstance(m, bool) or not isinstance(m, int) for m in milestones)
                or milestones != sorted(set(milestones))
                or not 0 < milestones[0]
                or milestones[-1] >= self.epochs
            ):
                raise UserError(
                    f"--lr-milestones must be increasing epochs between 1 and --epochs - 1 "
                    f"({self.epochs - 1}), got {' '.join(map(str, milestones))}"
                )
        elif self.lr_gamma != 0.1:
            raise UserError("--lr-gamma is the factor of a step schedule; give its --lr-milestones too")
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
            ("--data-loader", self.data_loader, LOADERS),
        ):
            if value not in choices:
                raise UserError(f"{flag} {value!r} is not one of: {', '.join(choices)}")
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0
        ):
            raise UserError(f"--workers must be 0 or more, got {self.workers}")
        if self.data_loader == "stream" and self.dataset != "folder":
            raise UserError(
                f"--data-loader stream reads image folders; {self.dataset} is read whole (it fits in memory)"
            )
        if self.image_size is not None:
            _positive_int("--image-size", self.image_size)
            if self.dataset != "folder":
                raise UserError(f"--image-size applies to --dataset folder; {self.dataset} images are 32x32")
        for flag, samples in (
            ("--train-samples", self.train_samples),
            ("--test-samples", self.test_samples),
            ("--val-samples", self.val_samples),
        ):
            if samples is not None:
                _positive_int(flag, samples)
        if self.train_samples is not None and self.train_samples < self.batch_size:
            raise UserError(
                f"--train-samples {self.train_samples} is smaller than --batch-size {self.batch_size}: "
                "no full training batch; raise --train-samples or lower --batch-size"
            )
        _positive_int("--data-parallel", self.data_parallel)
        if self.data_parallel > self.batch_size:
            raise UserError(
                f"--data-parallel {self.data_parallel} exceeds --batch-size {self.batch_size}: every replica "
                "needs at least one image of each batch"
            )
        if self.batch_size % self.data_parallel:
            raise UserError(
                f"--data-parallel {self.data_parallel} does not divide --batch-size {self.batch_size}: every "
                "replica computes an equal share of each batch"
            )
        if self.local_batchnorm and self.data_parallel == 1:
            raise UserError("--local-batchnorm applies to --data-parallel replicas; pass --data-parallel D too")
        if self.kd_ramp is not None and self.kd_ramp not in KD_RAMPS:
            raise UserError(f"--kd-ramp {self.kd_ramp!r} is not one of: {', '.join(KD_RAMPS)}")
        if self.kd_ramp_epochs is not None:
            _positive_float("--kd-ramp-epochs", self.kd_ramp_epochs)
            if self.kd_ramp is None:
                raise UserError("--kd-ramp-epochs is the length of a ramp: pass --kd-ramp linear or sigmoid too")
        if self.kd_ramp is not None and self.num_nodes == 1 and not self.teacher and not self.graph:
            raise UserError(
                "--kd-ramp ramps up the KL term, and a network trained alone has none: pass "
                "--num-nodes 2 or more (DML) or --teacher"
            )
        if self.kd_ramp is not None and self.graph:
            raise UserError(
                "--kd-ramp applies to DML and --teacher; in a graph file, give each link its gate "
                '(gate = "sigmoid_ramp", ramp_epochs = E)'
            )
        if self.teacher_model and not self.teacher and not self.graph:
            raise UserError("--teacher-model names the networks of --teacher checkpoints; pass --teacher too")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise UserError(f"--name {self.name!r} must be a plain folder name (no '/')")
        if (
            self.graph_spec is None
            and self.graph
            and (self.teacher or self.teacher_model or self.models != ["resnet32"] or self.num_nodes != 1)
        ):
            raise UserError(
                "--graph gives the peers and links: drop --models, --num-nodes, --teacher and --teacher-model"
            )

    def _read_graph(self, open_checkpoints: bool) -> dict:
        from .graph import read_graph, teacher_spec

        if self.graph:
            return read_graph(self.graph, open_checkpoints)
        assert self.teacher is not None  # unresolved: --graph or --teacher is given
        return teacher_spec(
            self.models,
            self.teacher,
            self.temperature,
            self.kl_weight,
            self.teacher_model,
            open_checkpoints,
            **self.kd_gate,
        )

    @property
    def kd_gate(self) -> dict:
        """The gate of the KL links of DML and --teacher: ``through``, or the ramp of --kd-ramp."""
        if self.kd_ramp is None:
            return {"gate": "through"}
        return {"gate": f"{self.kd_ramp}_ramp", "ramp_epochs": self.kd_ramp_epochs}

    @property
    def frozen(self) -> list[int]:
        """Indices of the frozen peers (teachers); known once resolved."""
        if self.unresolved:
            raise ValueError("the peers of --graph / --teacher are not read yet: use cfg.resolved()")
        peers = self.graph_spec["peers"] if self.graph_spec else []
        return [k for k, peer in enumerate(peers) if peer["checkpoint"] is not None]

    @property
    def means(self) -> dict[int, MeanOf]:
        """The temporal means of the graph: index -> the peer it follows, with its decay."""
        from .graph import means_of

        return means_of(self.graph_spec)

    @property
    def trunks(self) -> list[dict]:
        """The multi-branch networks of the graph (see graph.read_graph): their first peer, branches and split."""
        from .graph import trunks_of

        return trunks_of(self.graph_spec)

    @property
    def homes(self) -> dict[int, int]:
        """Peers that live where another does: a branch with its trunk, a temporal mean with its source."""
        from .graph import homes_of

        return homes_of(self.graph_spec)

    @property
    def views(self) -> int:
        """Augmentations of each batch: one per branch of a trunk with views (PCL), else 1."""
        return max([t["branches"] for t in self.trunks if t.get("views")], default=1)

    @property
    def trunk_members(self) -> set[int]:
        """The peers a multi-branch network computes beside its first branch: its other branches and teacher."""
        return set(self.homes) - set(self.means)

    @property
    def trained_peers(self) -> int:
        """How many peers learn from gradients (teachers and temporal means do not)."""
        return self.num_nodes - len(self.frozen) - len(self.means)

    @property
    def is_dml(self) -> bool:
        return self.trained_peers > 1

    def default_name(self) -> str:
        """A name that says what ran, e.g. dml_n2_resnet32_s42, dml_n2_sigmoid_ramp_resnet32_s42,
        independent_resnet32_s42, kd_resnet32_from_wrn28_2_s42 or graph-mygraph_resnet32-wrn28_2_s42."""
        ramp = [f"{self.kd_ramp}_ramp"] if self.kd_ramp else []  # the method differs: so does the name
        if self.graph_spec is not None:
            frozen = self.frozen
            students = joined_models([m for k, m in enumerate(self.models) if k not in frozen])
            if self.graph:
                kind = f"graph-{folder_name(Path(self.graph).stem)}"
                networks = [m for k, m in enumerate(self.models) if k not in self.trunk_members]  # a trunk once
                return "_".join([kind, joined_models(networks), f"s{self.seed}"])
            return "_".join(
                ["kd", students, "from", joined_models([self.models[k] for k in frozen]), *ramp, f"s{self.seed}"]
            )
        models = joined_models(self.models)
        parts = [f"dml_n{self.num_nodes}" if self.is_dml else "independent", *ramp, models]
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
        return [change for k in mine if k not in RESUME_MAY_CHANGE for change in _changes(k, theirs[k], mine[k])]


def _changes(where: str, old, new, most: int = 5) -> list[str]:
    """What differs between two settings, down to the entries of nested ones (a graph spec's
    ``links[3].ramp_epochs: 80.0 -> 5.0``, not both whole specs); at most ``most`` of them, then a count."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        found = [
            c
            for key in [*old, *(k for k in new if k not in old)]
            for c in _changes(f"{where}.{key}", old.get(key, "(none)"), new.get(key, "(none)"), most)
        ]
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = [c for i, (a, b) in enumerate(zip(old, new)) for c in _changes(f"{where}[{i}]", a, b, most)]
    elif isinstance(old, list) and isinstance(new, list):
        return [f"{where}: {len(old)} entries -> {len(new)}"]
    else:
        return [f"{where}: {old!r} -> {new!r}"]
    return found if len(found) <= most else found[:most] + [f"{where}: {len(found) - most} more changes"]


def field_default(f):
    return f.default_factory() if f.default is MISSING else f.default


def flag_of(f) -> str:
    """The command-line flag of a TrainConfig field: --name-with-dashes, or for a switch that is on by
    default the --no-... that turns it off."""
    name = f.metadata["argument"].get("flag", "--" + f.name.replace("_", "-"))
    return "--no-" + name[2:] if field_default(f) is True else name


def train_flags(settings: dict) -> list[str]:
    """The ``dml train`` flags that give ``settings`` (TrainConfig field names, as in config.json)."""
    by_name = {f.name: f for f in fields(TrainConfig) if f.metadata.get("group") is not None}
    argv = []
    for key, value in settings.items():
        f = by_name[key]
        if isinstance(value, bool):
            argv += [flag_of(f)] if value != field_default(f) else []
        elif isinstance(value, (list, tuple)):
            argv += [flag_of(f), *(str(v) for v in value)]
        elif value is not None:
            argv += [flag_of(f), str(value)]
    return argv


def joined_models(models: list[str]) -> str:
    """resnet32 for [resnet32, resnet32]; resnet32-wrn28_2 for a mixed list."""
    unique = list(dict.fromkeys(folder_name(m) for m in models))
    return "-".join(folder_name(m) for m in models) if len(unique) > 1 else unique[0]


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
