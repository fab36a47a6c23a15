"""Deep Mutual Learning of a cohort of networks on CIFAR-100.

    python dml_train.py --models resnet32 --num-nodes 2 --lr 0.1 --wd 5e-4 --seed 42
    python dml_train.py --models resnet32 wrn28_2 --num-nodes 2     # a mixed cohort

Data is read from (or downloaded to) ./data, the run is written to ./runs/dml_n<K>_<models>_s<seed>.
Any other `dml train` flag is passed through, e.g. --resume to continue an interrupted run.
"""

import argparse
import sys

from dml.cli import main


def parse(argv=None):
    # no abbreviations: an unknown flag passes through to dml train whole, not taken for one of ours
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--models", nargs="+", default=["resnet32"],
                        help="one name for every peer, or one name per peer")
    parser.add_argument("--num-nodes", type=int, default=2, help="number of peers in the cohort")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    parser.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_known_args(argv)


if __name__ == "__main__":
    args, rest = parse()
    sys.exit(main(["train", "--models", *args.models, "--num-nodes", str(args.num_nodes), "--lr", str(args.lr),
                   "--wd", str(args.wd), "--seed", str(args.seed), "--data-dir", "data", "--out-dir", "runs", *rest]))
