"""Knowledge distillation on CIFAR-100: a student learns from a frozen, already trained teacher.

    python independent_train.py --model wrn28_2                       # the teacher, first
    python kd_train.py --teacher-model wrn28_2 --student-model resnet32 --temperature 2.0

The teacher is read from --teacher-checkpoint, by default the independent run of the teacher model
(./runs/independent_<teacher>_s<seed>/0_<teacher>/best.pt); a missing teacher is an error, never a
randomly initialised one. The run is written to ./runs/kd_<student>_from_<teacher>_s<seed>.
Any other `dml train` flag is passed through, e.g. --resume to continue an interrupted run.
"""

import argparse
import sys
from pathlib import Path

from dml.cli import main
from dml.models import folder_name, is_import_path


def parse(argv=None):
    # no abbreviations: an unknown flag passes through to dml train whole, not taken for one of ours
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--teacher-model", default="wrn28_2", help="the teacher's network")
    parser.add_argument("--student-model", default="resnet32", help="the student's network")
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T of the KD link")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    parser.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--teacher-checkpoint", default=None,
                        help="the teacher's best.pt or last.pt (default: "
                             "runs/independent_<teacher-model>_s<seed>/0_<teacher-model>/best.pt)")
    return parser.parse_known_args(argv)


def teacher_checkpoint(args) -> str:
    if args.teacher_checkpoint is not None:
        return args.teacher_checkpoint
    name = folder_name(args.teacher_model)
    return str(Path("runs") / f"independent_{name}_s{args.seed}" / f"0_{name}" / "best.pt")


def teacher_model(args) -> list[str]:
    """A teacher of the user's own is imported only where named: --teacher-model names it to dml train."""
    return ["--teacher-model", args.teacher_model] if is_import_path(args.teacher_model) else []


if __name__ == "__main__":
    args, rest = parse()
    sys.exit(main(["train", "--models", args.student_model, "--teacher", teacher_checkpoint(args),
                   *teacher_model(args), "--temperature", str(args.temperature), "--lr", str(args.lr),
                   "--wd", str(args.wd), "--seed", str(args.seed), "--data-dir", "data", "--out-dir", "runs", *rest]))
