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
    # 2 of 200 epochs: the cosine schedule keeps T_max = 200, as in the seed's run. Only training is
    # compared: 1,000 test images (a subset drawn from its own seed) leave training as it is. A third
    # epoch cost about 2 minutes of CI; it agreed as closely (27.17 % against 27.26 %, ../shared/reference).
    code = main(["train", "--models", "resnet32", "--num-nodes", "1", "--epochs", "200", "--stop-after", "2",
                 "--test-samples", "1000", "--data-dir", REAL_DATA_DIR, "--skip-checksum", "--no-download",
                 "--out-dir", str(tmp_path), "--no-progress"])
    assert code == 0
    ours = [json.loads(line) for line in (tmp_path / "independent_resnet32_s42" / "metrics.jsonl").read_text().splitlines()]
    ours = {r["epoch"]: r for r in ours if r["node"] == 0}
    with open(SEED_CURVE) as f:
        seed = {int(row["epoch"]): row for row in csv.DictReader(f)}
    report = []
    for epoch in (1, 2):
        report.append(f"epoch {epoch}: train_acc {ours[epoch]['train_acc']:.2f} vs {seed[epoch]['train_acc']}, "
                      f"train_loss {ours[epoch]['train_loss']:.3f} vs {seed[epoch]['train_loss']}")
    print("\n".join(report))
    for epoch in (1, 2):
        assert ours[epoch]["lr"] == pytest.approx(float(seed[epoch]["lr"]), rel=1e-5)
        assert abs(ours[epoch]["train_acc"] - float(seed[epoch]["train_acc"])) <= 2.0, report
        assert abs(ours[epoch]["train_loss"] - float(seed[epoch]["train_loss"])) <= 0.10, report



def _first_400_steps(out_dir, num_nodes: int) -> list[tuple[float, float]]:
    """(train_acc, test_acc) of every peer after 400 steps of batch 64 at lr 0.1 (epoch 1 of 200)."""
    code = main(["train", "--models", "resnet32", "--num-nodes", str(num_nodes), "--train-samples", "25600",
                 "--epochs", "200", "--stop-after", "1", "--data-dir", REAL_DATA_DIR, "--skip-checksum",
                 "--no-download", "--out-dir", str(out_dir), "--no-progress"])
    assert code == 0
    run = next(out_dir.iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["train_acc"], r["test_acc"]) for r in records if r["node"] != "ensemble"]


@pytest.mark.slow
@needs_real_data
def test_dml_cohort_starts_slowly_as_the_seeds_did(tmp_path):
    """With the seed's initialisation every ResNet starts confident and arbitrary, and in a cohort the
    KL term pulls each peer toward its partner's arbitrary predictions: 2 x resnet32 stays near chance
    (1 %) for its first 400 steps while the same network alone is already above it.

    Measured here over seeds 42 / 1 / 2 (train / test accuracy, %): DML peers 1.88 / 2.25, 1.48 / 1.70 |
    1.49 / 2.08, 1.46 / 2.02 | 1.34 / 1.82, 1.05 / 1.17; alone 2.78 / 5.97 | 5.56 / 9.06 | 4.48 / 8.26.
    Thresholds sit between the two groups: DML train < 2.5 and test < 3.5, alone test > 4.0 and train
    above both peers'.
    """
    cohort = _first_400_steps(tmp_path / "dml", 2)
    alone = _first_400_steps(tmp_path / "alone", 1)
    print(f"(train acc, test acc) after 400 steps: DML peers {cohort}, alone {alone}")
    assert len(cohort) == 2 and len(alone) == 1
    for train_acc, test_acc in cohort:
        assert train_acc < 2.5 and test_acc < 3.5, cohort
    assert alone[0][1] > 4.0, alone
    assert alone[0][0] > max(train_acc for train_acc, _ in cohort), (alone, cohort)
