"""Command line: ``dml train`` (and ``python -m dml train``)."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import DATASETS, DEVICES, PRECISIONS, UPDATES, TrainConfig
from .errors import UserError
from .models import MODEL_NAMES


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line (status 2), not a usage dump."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _train_parser(sub) -> None:
    defaults = TrainConfig()
    p = sub.add_parser(
        "train", help="train a cohort (one peer = independent training, K peers = deep mutual learning)",
        description="Train K peers with deep mutual learning on CIFAR: each minimises cross-entropy plus "
                    "the mean KL divergence from the other peers' predictions. Defaults are the seed recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("cohort")
    g.add_argument("--models", nargs="+", default=defaults.models, metavar="NAME",
                   help=f"one name for every peer, or one per peer; choices: {', '.join(MODEL_NAMES)}")
    g.add_argument("--num-nodes", type=int, default=defaults.num_nodes, help="number of peers K (1 = independent)")
    g.add_argument("--update", choices=UPDATES, default=defaults.update,
                   help="simultaneous: all peers step on one set of predictions; sequential: the paper's "
                        "Algorithm 1, peers step in turn")
    g.add_argument("--temperature", type=float, default=defaults.temperature, help="softmax temperature T of the KL term")
    g.add_argument("--kl-weight", type=float, default=defaults.kl_weight, help="weight w of the KL term")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=defaults.epochs)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size)
    g.add_argument("--lr", type=float, default=defaults.lr, help="initial learning rate (cosine to 0)")
    g.add_argument("--wd", type=float, default=defaults.wd, help="weight decay")
    g.add_argument("--momentum", type=float, default=defaults.momentum)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum instead of Nesterov")
    g.add_argument("--seed", type=int, default=defaults.seed)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    g.add_argument("--data-dir", default=defaults.data_dir,
                   help="folder holding cifar-100-python/ (or the .tar.gz archive); downloaded there if absent")
    g.add_argument("--train-samples", type=int, default=None, metavar="N",
                   help="train on a seeded, class-balanced subset of N images (quick runs)")
    g.add_argument("--test-samples", type=int, default=None, metavar="N",
                   help="evaluate on a seeded, class-balanced subset of N images")
    g.add_argument("--skip-checksum", action="store_true",
                   help="accept data files whose MD5 differs from the official release (structure is still checked)")
    g.add_argument("--no-download", dest="download", action="store_false",
                   help="fail at once if the data is missing instead of downloading it")
    g.add_argument("--download-url", default=None, metavar="URL",
                   help="archive URL for a mirror (default: the official URL, or $DML_DOWNLOAD_URL)")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=DEVICES, default=defaults.device)
    g.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                   help="auto: bf16 autocast on CPU, bf16 (or fp16) autocast on CUDA")
    g.add_argument("--out-dir", default=defaults.out_dir, help="parent folder of run directories")
    g.add_argument("--name", default=None, help="run directory name (default says what ran, e.g. dml_n2_resnet32_s42)")
    g.add_argument("--resume", action="store_true",
                   help="continue <out-dir>/<name> from its last complete epoch (repeat the original flags)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (for time-limited jobs); continue with --resume")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        models=args.models, num_nodes=args.num_nodes, dataset=args.dataset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, wd=args.wd, momentum=args.momentum, nesterov=args.nesterov,
        temperature=args.temperature, kl_weight=args.kl_weight, update=args.update, seed=args.seed,
        device=args.device, precision=args.precision, train_samples=args.train_samples,
        test_samples=args.test_samples, data_dir=args.data_dir, out_dir=args.out_dir, name=args.name,
        skip_checksum=args.skip_checksum, download=args.download, download_url=args.download_url,
        progress=args.progress,
    )


def _run_train(args: argparse.Namespace) -> int:
    from .engine import train  # imported here so that --help and argument errors stay fast

    cfg = config_from_args(args)
    if args.stop_after is not None and args.stop_after <= 0:
        raise UserError(f"--stop-after must be a positive integer, got {args.stop_after}")
    train(cfg, resume=args.resume, stop_after=args.stop_after)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dml", description="Deep Mutual Learning on CIFAR: train cohorts of peers.")
    parser.add_argument("--version", action="version", version=f"dml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the last complete epoch is saved: continue with the same command and --resume",
              file=sys.stderr)
        return 130
