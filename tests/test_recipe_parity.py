"""The seed's recipe on the real data: our first epochs must follow the seed system's own curve."""

import csv
import json
from pathlib import Path

import pytest

from conftest import REAL_DATA_DIR, needs_real_data
from dml.cli import main

SEED_CURVE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "seed-curve-independent-resnet32.csv"


@pytest.mark.slow
@needs_real_data
def test_independent_resnet32_follows_the_seed_curve(tmp_path):
    if not SEED_CURVE.exists():
        pytest.skip(f"the seed's curve is not at {SEED_CURVE}")
    # 3 of 200 epochs: the cosine schedule keeps T_max = 200, as in the seed's run.
    code = main(["train", "--models", "resnet32", "--num-nodes", "1", "--epochs", "200", "--stop-after", "3",
                 "--data-dir", REAL_DATA_DIR, "--skip-checksum", "--no-download", "--out-dir", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    ours = [json.loads(line) for line in (tmp_path / "independent_resnet32_s42" / "metrics.jsonl").read_text().splitlines()]
    ours = {r["epoch"]: r for r in ours if r["node"] == 0}
    with open(SEED_CURVE) as f:
        seed = {int(row["epoch"]): row for row in csv.DictReader(f)}
    report = []
    for epoch in (1, 2, 3):
        report.append(f"epoch {epoch}: train_acc {ours[epoch]['train_acc']:.2f} vs {seed[epoch]['train_acc']}, "
                      f"train_loss {ours[epoch]['train_loss']:.3f} vs {seed[epoch]['train_loss']}")
    print("\n".join(report))
    for epoch in (1, 2, 3):
        assert ours[epoch]["lr"] == pytest.approx(float(seed[epoch]["lr"]), rel=1e-5)
        assert abs(ours[epoch]["train_acc"] - float(seed[epoch]["train_acc"])) <= 2.0, report
        assert abs(ours[epoch]["train_loss"] - float(seed[epoch]["train_loss"])) <= 0.10, report
