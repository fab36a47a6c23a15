"""Independent training of one network on CIFAR-100 (the baseline of the DML experiments).

    python independent_train.py --model resnet32 --lr 0.1 --wd 5e-4 --seed 42

Data is read from (or downloaded to) ./data, the run is written to ./runs/independent_<model>_s<seed>.
Any other `dml train` flag is passed through, e.g. --resume or --epochs.
"""

import argparse
import sys

from dml.cli import main


def parse(argv=None):
    # no abbreviations: an unknown flag passes through to dml train whole, not taken for one of ours
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", default="resnet32", help="network to train (see `dml train --help`)")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    parser.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_known_args(argv)


if __name__ == "__main__":
    args, rest = parse()
    sys.exit(main(["train", "--models", args.model, "--num-nodes", "1", "--lr", str(args.lr), "--wd", str(args.wd),
                   "--seed", str(args.seed), "--data-dir", "data", "--out-dir", "runs", *rest]))
