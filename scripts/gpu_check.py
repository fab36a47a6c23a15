"""Check and measure dml on a GPU in one command (scripts/gpu-check.sh), within minutes.

Steps, each a child process with its own time limit, each recorded in one JSON summary:

1. environment: python, torch, CUDA, the GPU, bf16 support;
2. tests: the tests marked ``device`` (tests/test_device.py), on every device present;
3. train: a 2-epoch run of 2 x ResNet-32 on the real CIFAR-100 (``--data-dir``, or DML_DATA_DIR),
   its seconds per epoch and test accuracies; skipped, with the reason, where the data is absent;
4. bench: ``dml bench`` of 1 and 2 x ResNet-32, dml's loop against the seed-style loop on the device.

Where there is no CUDA device it says so in one line and stops. ``--device cpu --quick`` runs every
step on the CPU at a tiny size: the check of this script's own logic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS_S = {"tests": 240, "train": 240, "bench": 150}  # each step's limit: 8 minutes in all on one H100/H200


def environment(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                    gpus=torch.cuda.device_count())
    return info


def run_step(name: str, command: list[str], work: Path, limit_s: float) -> dict:
    """Run ``command`` with its output in ``work/<name>.log``; its status, seconds and the log's end."""
    log = work / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=limit_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            status = "passed" if code == 0 else f"failed (exit code {code})"
        except subprocess.TimeoutExpired:
            status = f"failed (over its {limit_s:g} s)"
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    return {"status": status, "seconds": round(time.perf_counter() - started, 1), "command": command,
            "log_tail": tail}


def tests_step(work: Path, quick: bool) -> dict:
    report = work / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "device", "-q", "-p", "no:cacheprovider", "--junitxml",
               str(report), "tests/test_device.py"]
    if quick:
        command += ["-k", "a_step_on_the_device"]
    result = run_step("tests", command, work, LIMITS_S["tests"])
    if report.exists():
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None]
    return result


def train_step(work: Path, device: str, data_dir: str | None, quick: bool) -> dict:
    if not data_dir or not (Path(data_dir) / "cifar-100-python").is_dir():
        return {"status": "skipped", "reason": f"no cifar-100-python/ under {data_dir or '(no --data-dir or DML_DATA_DIR)'}"}
    size = (["--models", "resnet20", "--epochs", "1", "--train-samples", "512", "--test-samples", "200"] if quick
            else ["--models", "resnet32", "--epochs", "2"])
    out = work / "runs"
    command = [sys.executable, "-m", "dml", "train", *size, "--num-nodes", "2", "--device", device, "--data-dir",
               data_dir, "--skip-checksum", "--no-download", "--no-progress", "--out-dir", str(out), "--name", "run"]
    result = run_step("train", command, work, LIMITS_S["train"])
    metrics = out / "run" / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result["epochs"] = [{"epoch": r["epoch"], "seconds": round(r["seconds"], 2), "ensemble_test_acc": r["test_acc"],
                             "peers_test_acc": [p["test_acc"] for p in records if p["epoch"] == r["epoch"]
                                                and p["node"] not in ("ensemble", "restart")]}
                            for r in records if r["node"] == "ensemble"]
    return result


def bench_step(work: Path, device: str, quick: bool) -> dict:
    report = work / "bench.json"
    size = (["--models", "resnet20", "--num-nodes", "1", "--steps", "2", "--warmup", "1", "--repeats", "1"] if quick
            else ["--models", "resnet32", "--num-nodes", "1,2"])
    result = run_step("bench", [sys.executable, "-m", "dml", "bench", *size, "--device", device, "--json",
                                str(report)], work, LIMITS_S["bench"])
    if report.exists():
        result["results"] = json.loads(report.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="where to check (cpu: this script's own logic)")
    parser.add_argument("--data-dir", default=os.environ.get("DML_DATA_DIR"),
                        help="a folder holding cifar-100-python/ (default: DML_DATA_DIR)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: one test, one small epoch, a short bench")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON summary (default: gpu-check.json)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"error: torch does not import here ({exc}); install it first", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): nothing to check; --device cpu --quick checks this script")
        return 0
    started = time.perf_counter()
    summary = {"environment": environment(args.device), "steps": {}}
    print(json.dumps(summary["environment"]))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        work = Path(folder)
        steps = {"tests": lambda: tests_step(work, args.quick),
                 "train": lambda: train_step(work, args.device, args.data_dir, args.quick),
                 "bench": lambda: bench_step(work, args.device, args.quick)}
        for name, step in steps.items():
            summary["steps"][name] = result = step()
            print(f"{name:<6} {result['status']:<28} {result.get('seconds', 0):7.1f} s")
        shutil.rmtree(work / "runs", ignore_errors=True)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["ok"] = all(not s["status"].startswith("failed") for s in summary["steps"].values())
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'all steps passed' if summary['ok'] else 'a step failed'} in {summary['seconds']:.0f} s; "
          f"summary in {args.out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
