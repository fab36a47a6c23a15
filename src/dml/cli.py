"""Command line: ``dml train``, ``report``, ``evaluate``, ``bench``, ``experiment`` and ``tune`` (also as
``python -m dml ...``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import typing
from collections.abc import Callable

from . import __version__
from .choices import AUTO, DEVICES, PRECISIONS
from .config import DATASETS, GROUPS, UPDATES, TrainConfig, field_default, flag_of
from .errors import RunStopped, UserError
from .launch import FAILURES_ENV, error_line, report_failure
from .models import model_factory


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line (status 2), not a usage dump, and takes
    no abbreviated flags: ``--temp`` meaning ``--temperature`` today would change meaning with a new flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # argparse reports a subcommand's unknown flags from the top parser: name the subcommand's help
            self._subcommand(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _subcommand(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(getattr(parsed, action.dest, ""), self)
        return self


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows a flag's default as a user would type it (``resnet32``, not ``['resnet32']``) and only
    where there is one: no ``None``, and no ``True``/``False`` for switches, whose help says what they do."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if (
            not action.option_strings
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or "%(default)" in text
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # the help is %-formatted next


def _config_argument(group, f: dataclasses.Field, hint) -> None:
    """The flag of one TrainConfig field: --name-with-dashes, a switch for booleans (--no-x where on
    by default), the field's type, default, choices and help."""
    options = {k: v for k, v in f.metadata["argument"].items() if k != "flag"}
    default = field_default(f)
    if hint is bool:
        options["action"] = "store_false" if default else "store_true"
    else:
        kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
        kind = kinds[0]
        options["type"] = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
    group.add_argument(flag_of(f), dest=f.name, default=default, help=f.metadata["help"], **options)


def _add_config_arguments(parser, names=None, groups=None) -> dict:
    """Flags for the TrainConfig fields ``names`` (all when None), in argument groups by their setting's group."""
    hints = typing.get_type_hints(TrainConfig)
    groups = groups if groups is not None else {}
    for f in dataclasses.fields(TrainConfig):
        if (names is not None and f.name not in names) or f.metadata.get("group") is None:
            continue
        group = groups.get(f.metadata["group"], parser)
        _config_argument(group, f, hints[f.name])
    return groups


DATA_SOURCE = ("data_dir", "skip_checksum", "download", "download_url")  # shared by train and evaluate
GROUP_TITLES = {"distributed": "distributed (peers spread over processes; see README)"}


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a cohort (one peer = independent training, K peers = deep mutual learning)",
        description="Train K peers with deep mutual learning: each minimises cross-entropy plus the mean KL "
        "divergence from the other peers' predictions. Defaults are the seed recipe on CIFAR-100.",
        formatter_class=_HelpFormatter,
    )
    groups = {g: p.add_argument_group(GROUP_TITLES.get(g, g)) for g in GROUPS}
    _add_config_arguments(p, groups=groups)
    run = groups["run"]
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=_resume_mode,
        metavar="auto",
        help="continue <out-dir>/<name> from its last complete epoch (repeat the original flags); "
        "--resume auto: continue it where it holds a complete epoch, start it where it holds "
        "nothing (one command for a first start, a torchrun restart and a Slurm requeue)",
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop after N epochs of this invocation (for time-limited jobs); continue with --resume",
    )
    groups["distributed"].add_argument(
        "--procs",
        type=int,
        default=None,
        metavar="P",
        help="start P local processes (P <= --num-nodes) that share the peers, through torch.distributed's "
        "launcher; on several machines use torchrun instead",
    )
    groups["distributed"].add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="with --procs: restart the whole group up to N times when a process is lost; the run continues "
        "from its last complete epoch (torchrun's --max-restarts)",
    )
    p.set_defaults(func=_run_train)


def _resume_mode(value: str):
    if value != AUTO:
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {value!r}")
    return AUTO


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Every TrainConfig field from the flag of the same name (each flag's dest is its field's name)."""
    return TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    )


def _run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args).resolved()  # graph file and teacher checkpoints read here, once
    if args.stop_after is not None and args.stop_after <= 0:
        raise UserError(f"--stop-after must be a positive integer, got {args.stop_after}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if args.max_restarts and args.procs is None:
        raise UserError(
            "--max-restarts restarts the processes that --procs starts; under torchrun, give torchrun "
            "--max-restarts and dml train --resume auto"
        )
    if args.procs is not None:
        placed = cfg.num_nodes - len(
            cfg.homes
        )  # a temporal mean lives in its source's process, a branch in its trunk's
        replicas = cfg.data_parallel
        if not 1 <= args.procs <= placed * replicas:
            kinds = [
                *(["temporal means"] if cfg.means else []),
                *(["a trunk's later branches or teacher"] if cfg.trunk_members else []),
            ]
            limit = f"the {placed} peers that are not {' or '.join(kinds)}" if kinds else f"--num-nodes ({placed})"
            limit += f" times --data-parallel ({replicas})" if replicas > 1 else ""
            raise UserError(f"--procs must be between 1 and {limit}, got {args.procs}")
        if args.procs % replicas:
            raise UserError(
                f"--procs {args.procs} is not a multiple of --data-parallel {replicas}: each peer group "
                f"needs {replicas} processes"
            )
        if args.procs > 1 or args.max_restarts:
            from .checkpoint import check_run_dir, what_is_saved
            from .launch import launch_processes
            from .runlog import RunDir

            run = RunDir.of(cfg)
            argv = _without_launcher_flags(args.argv)
            if args.max_restarts:
                # Said once, here, before the processes start; then every start of them continues the run
                # if it holds a complete epoch and starts it otherwise.
                check_run_dir(cfg, args.resume, run)
                argv = [*_without_resume(argv), "--resume", AUTO]
            return launch_processes(args.procs, argv, lambda: what_is_saved(run), args.max_restarts)

    from .distributed import launcher_restart, lost_contact
    from .engine import train  # imported here so that --help and argument errors stay fast

    try:
        train(cfg, resume=args.resume, stop_after=args.stop_after)
    except RuntimeError as exc:
        if not lost_contact(exc):
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        restart, max_restarts = launcher_restart()
        then = (
            "the launcher restarts the group from there"
            if restart < max_restarts
            else "continue with the same command and --resume"
        )
        report_failure(
            f"error: lost contact with another process ({first_line}); the last complete epoch is saved: " + then
        )
        return 1
    return 0


def _without_launcher_flags(argv: list[str]) -> list[str]:
    """The arguments without the flags that start processes (for the processes they start)."""
    return _without(argv, ("--procs", "--max-restarts"), lambda value: True)


def _without_resume(argv: list[str]) -> list[str]:
    return _without(argv, ("--resume",), lambda value: value == AUTO)


def _without(argv: list[str], flags: tuple[str, ...], takes: Callable[[str], bool]) -> list[str]:
    """``argv`` without ``flags``, spelt ``--flag=value`` or ``--flag [value]``: a token after the flag is
    its value where ``takes(token)``."""
    out, flag_before = [], False
    for token in argv:
        if flag_before and takes(token):
            flag_before = False
            continue
        flag_before = token in flags
        if not flag_before and token.split("=", 1)[0] not in flags:
            out.append(token)
    return out


def _report_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="Markdown tables and learning-curve plots of finished or interrupted runs",
        description="Read config.json and metrics.jsonl of run directories and write Markdown tables in the "
        "seed README's format (per peer, Average and Ensemble rows; final and best test accuracy; "
        "epochs done/planned; runs differing only in seed as mean ± std), optionally with PNG plots.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="a run directory, or a folder searched for the run directories below it",
    )
    p.add_argument(
        "--baseline",
        metavar="RUN",
        default=None,
        help="what to compare with: a run directory, a folder of seeds of one run, or the name of a run or "
        "seed group among RUN_DIR (independent_resnet20 for a plan's row); improvement = final test accuracy "
        "minus the baseline's peer-average final test accuracy, paired by seed, in percentage points",
    )
    p.add_argument("--out", metavar="FILE", default=None, help="write the Markdown here instead of to stdout")
    p.add_argument(
        "--plots",
        metavar="DIR",
        default=None,
        help="write per-run learning curves and a node-count comparison as PNG files into DIR",
    )
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .report import report  # imported here so that --help and argument errors stay fast

    markdown = report(args.runs, baseline=args.baseline, out=args.out, plots=args.plots)
    if args.out is None:
        print(markdown, end="")
    else:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="top-1/top-5 test accuracy of checkpoints and of their ensemble",
        description="Evaluate best.pt or last.pt checkpoints on the test split: top-1 and top-5 accuracy of "
        "each and of their ensemble (mean softmax). All checkpoints must be for the same dataset. They are "
        "evaluated as their run evaluated them during training (its precision; BatchNorm folded unless "
        "it ran with --plain), so the numbers match its log. The data is the run's own (its "
        "dataset, --data-dir, checksum choice and image size) unless given here.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="best.pt or last.pt files of dml runs")
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the network each checkpoint holds (one name for all, or one per checkpoint); needed where "
        "it is package.module:factory, which a checkpoint never imports by itself",
    )
    _add_config_arguments(p, names=DATA_SOURCE + ("image_size",))
    p.set_defaults(data_dir=None, skip_checksum=None, download=None)  # None: as the checkpoints' run did
    p.add_argument("--dataset", choices=DATASETS, default=None, help="test set (default: the checkpoints' dataset)")
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto (default): CUDA if available, else MPS, else CPU"
    )
    p.add_argument(
        "--test-samples",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on the seeded, class-balanced subset of N test images that training used",
    )
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_command  # imported here so that --help and argument errors stay fast

    evaluate_command(args)
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training throughput against a seed-style PyTorch loop",
        description="Throughput (images x peers per second) of dml train's training loop and of a seed-style "
        "loop (DataLoader with per-image augmentation in worker processes, per-peer backward and "
        ".item()), on synthetic CIFAR-shaped data, plus MFU against a measured matmul peak.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["resnet32"],
        metavar="NAME",
        help="one name for every peer, or one per peer (then --num-nodes must be that count)",
    )
    # --num-nodes as in dml train; --nodes, its first spelling, still works
    p.add_argument(
        "--num-nodes",
        "--nodes",
        dest="nodes",
        default="1,2,4",
        metavar="SIZES",
        help="comma-separated cohort sizes (numbers of peers) to measure",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed windows of --steps steps per measurement; the fastest counts"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per step (every peer sees the same batch)")
    p.add_argument(
        "--update", choices=UPDATES, default="simultaneous", help="the update mode of the engine, as dml train --update"
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA, then MPS, then CPU")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast on CPU, bf16 (or fp16) autocast on CUDA; as dml train --precision",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the reference loop")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="measure only the engine")
    p.add_argument(
        "--plain",
        action="store_true",
        help="measure dml train --plain (fp32 unless --precision says otherwise, contiguous memory, one "
        "thread for all peers) instead of the default path",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="intra-op threads per peer, as dml train --threads (default: as dml train decides)",
    )
    p.add_argument(
        "--procs",
        type=int,
        default=None,
        metavar="P",
        help="spread each cohort's peers over P local processes (the reference loop is skipped)",
    )
    p.add_argument(
        "--graph",
        default=None,
        metavar="FILE",
        help="also measure the cohort of this graph file (branches on a shared trunk, say) in one more row; "
        "its throughput counts the branches and peers that train, not a learned teacher",
    )
    p.add_argument(
        "--input-pipeline",
        default=None,
        metavar="DIR",
        help="time the input pipeline alone instead: training batches of the image folder DIR streamed as dml "
        "train --data-loader stream reads it (decoded, augmented, normalised), with 0 and --workers decoding "
        "processes; images/s against a model's images/s says whether a GPU would wait for data",
    )
    p.add_argument(
        "--image-size", type=int, default=224, metavar="S", help="with --input-pipeline: the crop size, as dml train"
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the records as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    try:
        nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
    except ValueError:
        raise UserError(f"--num-nodes must be comma-separated integers such as 1,2,4, got {args.nodes!r}") from None
    for flag, value in (
        ("--steps", args.steps),
        ("--batch-size", args.batch_size),
        ("--repeats", args.repeats),
        ("--threads", args.threads or 1),
    ):
        if value <= 0:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if args.warmup < 0 or args.workers < 0:
        raise UserError("--warmup and --workers must not be negative")
    if args.input_pipeline is not None:
        return _bench_input_pipeline(args)
    if not nodes or min(nodes) < 1:
        raise UserError(f"--num-nodes must list cohort sizes of at least 1, got {args.nodes!r}")
    for name in args.models:
        try:
            model_factory(name)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if len(args.models) > 1 and any(n != len(args.models) for n in nodes):
        raise UserError(f"{len(args.models)} models given: --num-nodes must be {len(args.models)}")
    if args.graph is not None:
        from .graph import read_graph

        read_graph(args.graph)  # its mistakes said before anything is measured
    if args.procs is not None and args.procs > 1:
        if args.graph is not None:
            raise UserError("--graph is measured in one process; drop --procs or --graph")
        if args.procs > min(nodes):
            raise UserError(f"--procs {args.procs} exceeds the smallest cohort in --num-nodes ({min(nodes)})")
        from .launch import launch_processes

        return launch_processes(args.procs, _without_launcher_flags(args.argv))

    from .bench import HEADER, BenchSettings, run_benchmark, write_json

    settings = BenchSettings(
        models=args.models,
        nodes=nodes,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        update=args.update,
        workers=args.workers,
        reference=args.reference,
        plain=args.plain,
        threads=args.threads,
        graph=args.graph,
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only process 0 prints
        print(" | ".join(HEADER))
    records = run_benchmark(settings)
    if args.json and records:
        write_json(records, args.json)
    return 0


def _bench_input_pipeline(args: argparse.Namespace) -> int:
    if args.image_size <= 0:
        raise UserError(f"--image-size must be a positive integer, got {args.image_size}")
    from .bench import PIPELINE_HEADER, measure_input_pipeline, pipeline_row, write_json

    print(" | ".join(PIPELINE_HEADER))
    records = []
    for workers in sorted({0, args.workers}):
        record = measure_input_pipeline(
            args.input_pipeline, args.image_size, args.batch_size, workers, args.steps, args.warmup
        )
        print(pipeline_row(record), flush=True)
        records.append(record)
    if args.json:
        write_json(records, args.json)
    return 0


def _experiment_parser(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="run every dml train run of a plan (TOML), resumably, then report them",
        description="Run the plan's runs ([defaults] settings, every combination of the [grid] lists, [[run]] rows) "
        "one after another or --jobs at a time, each a dml train process with its log in "
        "OUT_DIR/logs/. Run the same command again after any interruption: finished runs are skipped, "
        "interrupted ones resume from their last complete epoch. Ends with OUT_DIR/report.md and "
        "plots (mean ± std over seeds). A changed plan is refused for an existing OUT_DIR.",
    )
    p.add_argument("plan", metavar="PLAN.toml", help="the plan file (see README: Experiments)")
    p.add_argument("--out-dir", default=None, metavar="DIR", help="where the runs go (default: runs/<plan name>)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time: one per GPU where there are several; on CPU they share the cores",
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs, their state and commands; train nothing")
    _set_argument(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_experiment)


def _set_argument(p) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dml train setting, named as in config.json, for every run in place of the plan's "
        "(repeatable), e.g. --set data_dir=/data/cifar; VALUE is read as in the plan (0.05, true, "
        '["a", "b"]) or else as text. OUT_DIR records it: continue there with the same --set',
    )


def _run_experiment(args: argparse.Namespace) -> int:
    from .experiment import experiment  # imported here so that --help and argument errors stay fast
    from .plan import parse_overrides

    return experiment(args.plan, args.out_dir, args.jobs, args.dry_run, args.progress, parse_overrides(args.overrides))


def _tune_parser(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="search the ranges of a plan's [search] table with optuna, on a validation split",
        description="Each trial is a dml train run of the plan's one configuration with values from the [search] "
        "ranges, judged by its best validation accuracy (val_samples must be set) and pruned epoch by "
        "epoch by optuna's median pruner. The study is stored in OUT_DIR/study.db: the same command "
        "continues a killed search. Ends with OUT_DIR/tune.md: every trial, and the best settings as a "
        "dml train command. Needs optuna: pip install optuna (or, in the project's checkout, "
        "pip install -e '.[tune]').",
    )
    p.add_argument("plan", metavar="PLAN.toml", help="a plan with [defaults] and [search] (see README: Experiments)")
    p.add_argument(
        "--trials",
        type=int,
        required=True,
        metavar="N",
        help="finished trials (complete, pruned or failed) the study should hold",
    )
    p.add_argument(
        "--out-dir", default=None, metavar="DIR", help="where trials and the study go (default: runs/<plan name>-tune)"
    )
    _set_argument(p)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from .plan import parse_overrides
    from .tune import tune  # imported here so that --help and argument errors stay fast

    return tune(args.plan, args.trials, args.out_dir, args.progress, parse_overrides(args.overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dml", description="Deep Mutual Learning on CIFAR: train cohorts of peers.")
    parser.add_argument("--version", action="version", version=f"dml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _bench_parser(sub)
    _report_parser(sub)
    _evaluate_parser(sub)
    _experiment_parser(sub)
    _tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        if not argv:  # a first look: the commands, not a one-line complaint about the missing one
            print(parser.format_help(), end="", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
        args.argv = argv
        return args.func(args)
    except UserError as exc:
        report_failure(f"error: {exc}")
        return 2
    except RunStopped as exc:
        report_failure(f"error: {exc}")
        return exc.exit_code
    except BrokenPipeError:  # e.g. `dml experiment plan.toml --dry-run | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0 if argv[:1] == ["report"] or "--dry-run" in argv else 1  # work that was cut short failed
    except KeyboardInterrupt:  # dml train says what it saved itself (RunStopped); nothing else saves partial work
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: its traceback, except at a restart that fails as the start before
        if not os.environ.get(FAILURES_ENV):
            raise
        report_failure(error_line(exc), traceback.print_exc)
        return 1
