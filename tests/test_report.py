"""`dml report` on synthetic run directories whose table values are known in advance."""

import json
import math

import pytest

from dml.cli import main
from dml.errors import UserError
from dml.report import find_runs, read_run, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(root, name, peers, ensemble=None, epochs=None, seed=1, lr=0.1, dataset="cifar100", model="resnet32",
              val=None, ensemble_val=None, terms=None):
    """A run directory as `dml train` writes it. ``peers`` holds, per peer, a list of per-epoch
    (train_acc, test_acc, train_loss); ``epochs`` is the planned count (default: the epochs given);
    ``val`` per peer a list of per-epoch validation accuracies (a run with --val-samples); ``terms``
    per peer a list of per-epoch (train_ce, train_kd)."""
    run = root / name
    run.mkdir(parents=True)
    done = len(peers[0])
    config = {"models": [model] * len(peers), "num_nodes": len(peers), "dataset": dataset,
              "epochs": epochs or done, "batch_size": 64, "lr": lr, "wd": 5e-4, "seed": seed,
              "device": "auto", "data_dir": f"/data/{name}", "out_dir": str(root), "name": name,
              "val_samples": 500 if val else None}
    (run / "config.json").write_text(json.dumps({"config": config, "dml_version": "0.1.0"}, indent=2))
    lines = []
    for e in range(done):
        for i, history in enumerate(peers):
            train_acc, test_acc, loss = history[e]
            lines.append({"epoch": e + 1, "node": i, "model": model, "lr": lr, "train_loss": loss,
                          "train_acc": train_acc, "test_acc": test_acc, "seconds": 1.5,
                          **({"val_acc": val[i][e]} if val else {}),
                          **(dict(zip(("train_ce", "train_kd"), terms[i][e])) if terms else {})})
        acc = ensemble[e] if ensemble else max(h[e][1] for h in peers)
        lines.append({"epoch": e + 1, "node": "ensemble", "test_acc": acc, "seconds": 1.5,
                      **({"val_acc": ensemble_val[e]} if ensemble_val else {})})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


# Two peers, three epochs: finals 35/45, bests 40 (epoch 2) and 45 (epoch 3).
PEER0 = [(10.0, 15.0, 3.0), (20.0, 40.0, 2.0), (30.0, 35.0, 1.5)]
PEER1 = [(12.0, 14.0, 3.1), (22.0, 30.0, 2.1), (32.0, 45.0, 1.25)]


def rows(markdown, section=None):
    """Table rows (lists of cells, bold/italic markers removed) of the section titled ``section``."""
    if section is not None:
        start = markdown.index(section)
        end = markdown.find("\n## ", start)
        markdown = markdown[start:end if end >= 0 else None]
    found = []
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|--"):
            found.append([c.strip().strip("*") for c in line.strip().strip("|").split(" | ")])
    return {r[0]: r[1:] for r in found}


def cell(table, row, column):
    """The cell of ``row`` under the heading ``column`` of a table read by ``rows``."""
    header = next(cells for cells in table.values() if column in cells)
    return table[row][header.index(column)]


def test_table_has_peer_average_and_ensemble_rows(tmp_path):
    write_run(tmp_path, "dml_n2_resnet32_s1", [PEER0, PEER1], ensemble=[16.0, 41.0, 47.0])
    table = rows(report([tmp_path]), "## DML with 2 nodes")
    assert table["Model ID"] == ["Train Accuracy (%)", "Test Accuracy (%)", "Best Test Accuracy (%)", "Train Loss"]
    assert table["0_resnet32"] == ["30.00", "35.00", "40.00 (ep 2)", "1.500"]
    assert table["1_resnet32"] == ["32.00", "45.00", "45.00 (ep 3)", "1.250"]
    assert table["Average"] == ["31.00", "40.00", "42.50", "1.375"]
    assert table["Ensemble"] == ["–", "47.00", "47.00 (ep 3)", "–"]


def test_improvement_against_baseline_per_peer_and_on_average(tmp_path):
    write_run(tmp_path / "runs", "dml_n2_resnet32_s1", [PEER0, PEER1])
    baseline = write_run(tmp_path, "independent_resnet32_s1", [[(50.0, 20.0, 2.5), (60.0, 38.15, 2.0)]])
    markdown = report([tmp_path / "runs", baseline], baseline=baseline)
    assert markdown.count("\n## ") == 3  # summary, baseline (once, though also listed as a run), DML run
    table = rows(markdown, "## DML with 2 nodes")
    assert table["Model ID"][-1] == "Improvement vs Baseline (pp)"
    assert table["0_resnet32"][-1] == "-3.15"  # 35 - 38.15
    assert table["1_resnet32"][-1] == "+6.85"  # 45 - 38.15
    assert table["Average"][-1] == "+1.85"  # 40 - 38.15
    assert table["Ensemble"][-1] == "–"
    # The baseline has its own section (one peer: no Average row) and a line in the summary.
    base = rows(markdown, "## Baseline: independent_resnet32_s1")
    assert base["0_resnet32"] == ["60.00", "38.15", "38.15 (ep 2)", "2.000"] and "Average" not in base
    summary = rows(markdown, "## Summary")
    assert summary["independent_resnet32_s1 (baseline)"][-2:] == ["–", "–"]
    assert cell(summary, "dml_n2_resnet32_s1", "Improvement vs Baseline (pp)") == "+1.85"
    assert cell(summary, "dml_n2_resnet32_s1", "Ensemble Improvement (pp)") == "+6.85"  # 45 - 38.15
    assert cell(summary, "dml_n2_resnet32_s1", "Avg Train Accuracy (%)") == "31.00"  # (30 + 32) / 2
    assert "independent_resnet32_s1: 38.15%" in markdown


def test_the_summary_shows_train_accuracy_and_temporal_means_apart_from_the_peers(tmp_path):
    mean_run = write_run(tmp_path, "pcl_s1", [PEER0, PEER1, [(0.0, 20.0, 0.0)] * 3])
    record = json.loads((mean_run / "config.json").read_text())
    record["config"]["graph_spec"] = {"peers": [{}, {}, {"ema_of": 0, "decay": 0.999}]}
    (mean_run / "config.json").write_text(json.dumps(record))
    write_run(tmp_path, "dml_s1", [PEER0, PEER1])
    summary = rows(report([tmp_path]), "## Summary")
    assert cell(summary, "pcl_s1", "Temporal Means' Test Accuracy (%)") == "20.00"
    assert cell(summary, "pcl_s1", "Avg Test Accuracy (%)") == "40.00"  # (35 + 45) / 2: the mean is not a peer
    assert cell(summary, "pcl_s1", "Avg Train Accuracy (%)") == "31.00"
    assert cell(summary, "dml_s1", "Temporal Means' Test Accuracy (%)") == "–"
    assert "Temporal Means" not in report([tmp_path / "dml_s1"]) and "Learned Teachers" not in report([tmp_path])


def test_the_summary_shows_a_learned_teacher_apart_from_the_peers(tmp_path):
    one = write_run(tmp_path, "one_s1", [PEER0, PEER1, [(50.0, 48.0, 1.0)] * 3])  # the last: ONE's gate
    record = json.loads((one / "config.json").read_text())
    record["config"]["graph_spec"] = {"peers": [{}, {}, {"learned_teacher": True}]}
    (one / "config.json").write_text(json.dumps(record))
    summary = rows(report([tmp_path]), "## Summary")
    assert cell(summary, "one_s1", "Learned Teachers' Test Accuracy (%)") == "48.00"
    assert cell(summary, "one_s1", "Avg Test Accuracy (%)") == "40.00"
    assert cell(summary, "one_s1", "Nodes") == "2 students + 1 teacher"


def test_a_baseline_named_by_its_row_is_the_seeds_among_the_runs(tmp_path, capsys):
    for seed, (base, dml) in zip((1, 2), ((69.0, 70.0), (71.0, 74.0))):
        write_run(tmp_path, f"independent_s{seed}", [[(1.0, base, 1.0)]], seed=seed, model="resnet20")
        write_run(tmp_path, f"dml_s{seed}", [[(1.0, dml, 1.0)]] * 2, seed=seed)
    named = report([tmp_path], baseline="independent")
    assert named == report([tmp_path], baseline=[tmp_path / "independent_s1", tmp_path / "independent_s2"])
    assert cell(rows(named, "## Summary"), "dml", "Improvement vs Baseline (pp)") == f"+2.00 ± {math.sqrt(2):.2f}"
    assert main(["report", str(tmp_path), "--baseline", "independent_s2", "--out", str(tmp_path / "r.md")]) == 0
    assert "## Baseline: independent_s2" in (tmp_path / "r.md").read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--baseline", "indep"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --baseline indep is neither") and "(dml, independent)" in err and err.count("\n") == 1


def test_baseline_with_several_peers_is_compared_by_its_peer_average(tmp_path):
    write_run(tmp_path / "runs", "dml_n2_resnet32_s1", [PEER0, PEER1])
    baseline = write_run(tmp_path, "base", [[(1.0, 30.0, 1.0)], [(1.0, 34.0, 1.0)]])  # average 32
    table = rows(report([tmp_path / "runs"], baseline=baseline), "## DML with 2 nodes")
    assert [table[k][-1] for k in ("0_resnet32", "1_resnet32", "Average")] == ["+3.00", "+13.00", "+8.00"]


def test_interrupted_run_is_labelled_with_epochs_done_of_planned(tmp_path):
    write_run(tmp_path, "dml_n3_resnet32_s1", [PEER0, PEER1, PEER0], epochs=200)
    write_run(tmp_path, "dml_n2_resnet32_s1", [PEER0, PEER1])
    markdown = report([tmp_path])
    assert "- Epochs: 3/200 (interrupted)" in markdown
    assert "- Epochs: 3/3\n" in markdown
    summary = rows(markdown, "## Summary")
    assert summary["dml_n3_resnet32_s1"][1] == "3/200 (interrupted)"
    assert summary["dml_n2_resnet32_s1"][1] == "3/3"


def test_runs_that_differ_only_in_seed_are_aggregated(tmp_path):
    finals0, finals1 = [70.0, 72.0, 74.0], [71.0, 71.0, 74.0]
    for seed, a, b in zip((1, 2, 3), finals0, finals1):
        write_run(tmp_path, f"dml_n2_resnet32_s{seed}", [[(80.0 + seed, a, 1.0 * seed)], [(80.0, b, 1.0)]], seed=seed)
    write_run(tmp_path, "dml_n2_resnet32_lr05_s1", [[(1.0, 10.0, 1.0)], [(1.0, 10.0, 1.0)]], lr=0.05)
    markdown = report([tmp_path])
    assert "## DML with 2 nodes: dml_n2_resnet32 (3 seeds)" in markdown
    assert "- Seeds: 1, 2, 3 (n = 3)" in markdown
    table = rows(markdown, "## DML with 2 nodes: dml_n2_resnet32 (3 seeds)")
    assert table["0_resnet32"] == ["82.00 ± 1.00", "72.00 ± 2.00", "72.00 ± 2.00", "2.000 ± 1.000"]
    assert table["1_resnet32"][1] == f"72.00 ± {math.sqrt(3):.2f}"  # deviations -1, -1, +2
    assert table["Average"][1] == f"72.00 ± {math.sqrt(3.25):.2f}"  # seed averages 70.5, 71.5, 74
    # Another learning rate is another experiment, reported on its own.
    other = rows(markdown, "## DML with 2 nodes: dml_n2_resnet32_lr05_s1")
    assert other["0_resnet32"][1] == "10.00"
    assert markdown.count("\n## ") == 3  # summary and two experiments


def test_seeds_stopped_at_different_epochs_are_not_aggregated(tmp_path):
    write_run(tmp_path, "n2_s1", [PEER0, PEER1], epochs=10, seed=1)
    write_run(tmp_path, "n2_s2", [PEER0[:2], PEER1[:2]], epochs=10, seed=2)
    markdown = report([tmp_path])
    assert "(2 seeds)" not in markdown
    assert "## DML with 2 nodes: n2_s1\n" in markdown and "## DML with 2 nodes: n2_s2\n" in markdown


@pytest.mark.parametrize("baseline_seeds, gain", [
    ((1, 2), f"+2.00 ± {math.sqrt(2):.2f}"),  # paired by seed: 70 - 69 and 74 - 71
    ((5, 6), f"+2.00 ± {math.sqrt(8):.2f}"),  # other seeds: 70 and 74 minus the baseline's mean, 70
])
def test_seed_aggregated_improvement_is_paired_by_seed_where_it_can_be(tmp_path, baseline_seeds, gain):
    for seed, acc in ((1, 70.0), (2, 74.0)):
        write_run(tmp_path / "runs", f"n2_s{seed}", [[(1.0, acc, 1.0)], [(1.0, acc, 1.0)]], seed=seed)
    for seed, acc in zip(baseline_seeds, (69.0, 71.0)):  # a baseline folder of two seeds: mean 70
        write_run(tmp_path / "base", f"b_s{seed}", [[(1.0, acc, 1.0)]], seed=seed)
    markdown = report([tmp_path / "runs"], baseline=tmp_path / "base")
    assert rows(markdown, "## DML with 2 nodes")["Average"][-1] == gain
    assert cell(rows(markdown, "## Summary"), "n2", "Improvement vs Baseline (pp)") == gain
    assert cell(rows(markdown, "## Summary"), "n2", "Ensemble Improvement (pp)") == gain  # the ensemble of equal peers
    assert "paired by seed where the baseline ran the same seeds" in markdown


def test_the_comparison_draws_a_seed_groups_spread_as_a_band(tmp_path):
    from matplotlib.collections import PolyCollection

    from dml.report import comparison_figure, find_runs, read_run, seed_groups

    for seed, accs in ((1, (10.0, 30.0)), (2, (14.0, 36.0))):
        write_run(tmp_path, f"n2_s{seed}", [[(1.0, a, 1.0) for a in accs]] * 2, seed=seed)
    write_run(tmp_path, "n1_s1", [[(1.0, 20.0, 1.0), (1.0, 25.0, 1.0)]], seed=1)
    groups = seed_groups([read_run(p) for p in find_runs([tmp_path])])
    ax = comparison_figure(groups).axes[0]
    [band] = [c for c in ax.collections if isinstance(c, PolyCollection)]  # the two-seed group only
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(12.0 - math.sqrt(8)) and max(ys) == pytest.approx(33.0 + math.sqrt(18))


def test_past_four_runs_the_comparison_gives_each_run_a_panel_against_the_baseline(tmp_path):
    from dml.report import comparison_figure, find_runs, read_run, seed_groups

    names = ["a", "b", "c", "d", "e"]
    for i, name in enumerate(names):
        write_run(tmp_path / "runs", f"{name}_s1", [[(1.0, 10.0 + i, 1.0), (1.0, 20.0 + i, 1.0)]] * 2, lr=0.1 + i / 100)
    baseline = [read_run(write_run(tmp_path, "alone_s1", [[(1.0, 9.0, 1.0), (1.0, 19.0, 1.0)]]))]
    runs = [read_run(p) for p in find_runs([tmp_path / "runs"])]

    [shared] = comparison_figure(seed_groups(runs[:4]), baseline).axes  # four still share one axes
    assert len(shared.get_lines()) == 5

    fig = comparison_figure(seed_groups(runs), baseline)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [f"{n}_s1 (2 nodes)" for n in names]
    assert len(fig.axes) == 6 and not fig.axes[5].get_visible()  # a grid of 3 columns, its last slot empty
    for i, ax in enumerate(shown):
        run_line, base_line = ax.get_lines()
        assert list(run_line.get_ydata()) == [10.0 + i, 20.0 + i] and list(base_line.get_ydata()) == [9.0, 19.0]
    # epochs are labelled under each column's lowest panel, the third column's in the first row
    fig.canvas.draw()
    labelled = [any(t.get_text() for t in ax.get_xticklabels()) for ax in shown]
    assert labelled == [False, False, True, True, True]


def test_no_run_of_a_many_panel_comparison_takes_the_baselines_grey(tmp_path):
    from matplotlib.colors import to_rgb

    from dml.report import comparison_figure, find_runs, read_run, seed_groups

    for i in range(9):  # the eighth run took matplotlib's eighth colour, its grey
        write_run(tmp_path / "runs", f"r{i}_s1", [[(1.0, 10.0 + i, 1.0), (1.0, 20.0 + i, 1.0)]] * 2, lr=0.1 + i / 100)
    baseline = [read_run(write_run(tmp_path, "alone_s1", [[(1.0, 9.0, 1.0), (1.0, 19.0, 1.0)]]))]
    fig = comparison_figure(seed_groups([read_run(p) for p in find_runs([tmp_path / "runs"])]), baseline)
    colours = [tuple(round(c, 2) for c in to_rgb(ax.get_lines()[0].get_color())) for ax in fig.axes[:9]]
    base = tuple(round(c, 2) for c in to_rgb(fig.axes[0].get_lines()[1].get_color()))
    assert base not in colours and len(set(colours)) == 9


def test_the_gains_figure_draws_each_groups_paired_gain_its_spread_and_its_seeds(tmp_path):
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    from dml.report import find_runs, gains_figure, read_run, seed_groups

    for seed, base, (a, b), ensemble in ((1, 69.0, (70.0, 72.0), 75.0), (2, 71.0, (74.0, 74.0), 76.0)):
        write_run(tmp_path / "base", f"b_s{seed}", [[(1.0, base, 1.0)]], seed=seed)
        write_run(tmp_path / "runs", f"n2_s{seed}", [[(1.0, a, 1.0)], [(1.0, b, 1.0)]], ensemble=[ensemble], seed=seed)
    write_run(tmp_path / "runs", "n1_s1", [[(1.0, 68.0, 1.0)]], seed=1)
    read = lambda folder: [read_run(p) for p in find_runs([folder])]  # noqa: E731
    groups = seed_groups(read(tmp_path / "runs"))
    ax = gains_figure(groups, read(tmp_path / "base")).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["n2", "n1_s1"]  # bottom up: the first group on top
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    # n2: peers' average 71 - 69 and 74 - 71 (mean 2.5), ensemble 75 - 69 and 76 - 71 (mean 5.5); n1: 68 - 69
    assert sorted(round(b.get_width(), 6) for b in bars) == [-1.0, 2.5, 5.5]
    dots = sorted(round(x, 6) for line in ax.lines if line.get_marker() == "o" for x in line.get_xdata())
    assert dots == [-1.0, 2.0, 3.0, 5.0, 6.0]
    whiskers = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    assert sorted(round(abs(s[1][0] - s[0][0]) / 2, 6) for s in whiskers) == [round(math.sqrt(0.5), 6)] * 2


def test_the_gains_figure_adds_the_temporal_means_and_the_learned_teachers_where_a_run_has_them(tmp_path):
    from matplotlib.patches import Rectangle

    from dml.report import find_runs, gains_figure, read_run, seed_groups

    write_run(tmp_path / "base", "b_s1", [[(1.0, 60.0, 1.0)]], seed=1)
    # peers 61 and 63, the mean of peer 0 at 66, a learned teacher at 70, the ensemble at 64
    pcl = write_run(tmp_path / "runs", "pcl_s1", [[(1.0, 61.0, 1.0)], [(1.0, 63.0, 1.0)], [(1.0, 70.0, 1.0)],
                                                  [(1.0, 66.0, 1.0)]], ensemble=[64.0], seed=1)
    record = json.loads((pcl / "config.json").read_text())
    record["config"]["graph_spec"] = {"peers": [{}, {}, {"learned_teacher": True}, {"ema_of": 0, "decay": 0.9}]}
    (pcl / "config.json").write_text(json.dumps(record))
    write_run(tmp_path / "runs", "dml_s1", [[(1.0, 59.0, 1.0)], [(1.0, 61.0, 1.0)]], ensemble=[62.0], seed=1)
    read = lambda folder: [read_run(p) for p in find_runs([folder])]  # noqa: E731
    ax = gains_figure(seed_groups(read(tmp_path / "runs")), read(tmp_path / "base")).axes[0]
    bars = sorted((b for b in ax.patches if isinstance(b, Rectangle)), key=lambda b: -b.get_y())  # top down
    # dml_s1 on top (found first): peers 60 - 60, ensemble 62 - 60; then pcl_s1: peers 62, means, teachers, ensemble
    assert [round(b.get_width(), 6) for b in bars] == [0.0, 2.0, 2.0, 6.0, 10.0, 4.0]
    colors = [b.get_facecolor() for b in bars]
    assert len(set(colors[2:])) == 4 and colors[0] == colors[2] and colors[1] == colors[5]  # a colour per kind
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["peers' average", "temporal means", "learned teachers", "ensemble"]


def test_unfinished_last_line_and_incomplete_epoch_are_ignored(tmp_path):
    run = write_run(tmp_path, "r", [PEER0, PEER1], epochs=10)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 4, "node": 0, "model": "resnet32", "lr": 0.1, "train_loss": 1.0,
                            "train_acc": 99.0, "test_acc": 99.0, "seconds": 1.0}) + "\n")
        f.write('{"epoch": 4, "node": 1, "model": "resn')  # a write cut off mid-line
    parsed = read_run(run)
    assert parsed.epochs_done == 3 and parsed.peers[0].test_acc == [15.0, 40.0, 35.0]
    assert "- Epochs: 3/10 (interrupted)" in report([run])


def test_parent_folders_are_searched_and_sorted(tmp_path):
    write_run(tmp_path / "b" / "deep", "run2", [PEER0])
    write_run(tmp_path / "a", "run1", [PEER0])
    write_run(tmp_path, "run0", [PEER0])
    found = find_runs([tmp_path / "b", tmp_path])
    assert [p.name for p in found] == ["run2", "run1", "run0"]  # each once, in the order found


def test_plots_are_png_files_linked_from_the_report(tmp_path):
    import matplotlib.image

    write_run(tmp_path / "runs", "dml_n2_resnet32_s1", [PEER0, PEER1])
    write_run(tmp_path / "runs", "dml_n3_resnet32_s1", [PEER0, PEER1, PEER0], epochs=200)
    baseline = write_run(tmp_path, "independent_resnet32_s1", [[(50.0, 20.0, 2.5), (60.0, 38.15, 2.0)]])
    out = tmp_path / "report" / "report.md"
    out.parent.mkdir()
    code = main(["report", str(tmp_path / "runs"), "--baseline", str(baseline), "--out", str(out),
                 "--plots", str(tmp_path / "report" / "plots")])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "report" / "plots").iterdir())
    assert names == ["comparison.png", "dml_n2_resnet32_s1.png", "dml_n3_resnet32_s1.png", "gains.png",
                     "independent_resnet32_s1.png"]
    for name in names:
        path = tmp_path / "report" / "plots" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        assert image.std() > 0.05  # not a blank canvas
        assert f"](plots/{name})" in out.read_text()  # linked relative to the report


def test_one_epoch_plots_have_whole_epoch_ticks_and_draw_all_they_name(tmp_path):
    from dml.report import comparison_figure, run_figure, seed_groups

    run = read_run(write_run(tmp_path, "dml_n2_resnet32_s1", [PEER0[:1], PEER1[:1]]))
    baseline = [read_run(write_run(tmp_path, "independent_resnet32_s1", [[(50.0, 20.0, 2.5)]]))]
    for fig in (run_figure(run, baseline), comparison_figure(seed_groups([run]), baseline)):
        fig.canvas.draw()
        for ax in fig.axes:
            low, high = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if low <= t <= high]
            assert ticks == [1.0]  # the one epoch, not 0.945 ... 1.05
            assert all(label.get_text().lstrip("−-").isdigit() for label in ax.get_xticklabels())
            named = [text.get_text() for text in ax.get_legend().get_texts()]
            drawn = [line.get_label() for line in ax.get_lines()
                     if len(line.get_xdata()) > 1 or line.get_marker() not in (None, "None", "")]
            assert named == drawn and any(name.startswith("baseline") for name in named)


def test_the_summary_counts_a_distilled_runs_students_and_teachers(tmp_path):
    kd = write_run(tmp_path, "kd_resnet32_from_wrn28_2_s1", [PEER0, PEER1])
    document = json.loads((kd / "config.json").read_text())
    document["config"]["graph_spec"] = {"peers": [
        {"name": "0_resnet32", "model": "resnet32", "checkpoint": None, "sha256": None},
        {"name": "teacher0", "model": "resnet32", "checkpoint": "/t/best.pt", "sha256": "0" * 64}]}
    (kd / "config.json").write_text(json.dumps(document))
    write_run(tmp_path, "dml_n2_resnet32_s1", [PEER0, PEER1])
    summary = rows(report([tmp_path]), "## Summary")
    assert summary["Run"][0] == "Nodes"
    assert summary["kd_resnet32_from_wrn28_2_s1"][0] == "1 student + 1 teacher"
    assert summary["dml_n2_resnet32_s1"][0] == "2"


def test_report_goes_to_stdout_without_out(tmp_path, capsys):
    write_run(tmp_path, "dml_n2_resnet32_s1", [PEER0, PEER1])
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Training report") and "| **Average** | **31.00** |" in out


@pytest.mark.parametrize("damage, expected", [
    (lambda run: (run / "metrics.jsonl").unlink(), "metrics.jsonl is missing"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1\n{"epoch": 2}\n'), "metrics.jsonl line 1"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1, "node": 0}\n'), "metrics.jsonl line 1"),
    (lambda run: (run / "config.json").write_text("{not json"), "config.json is unreadable"),
])
def test_unreadable_run_is_one_error_line(tmp_path, capsys, damage, expected):
    damage(write_run(tmp_path, "r", [PEER0, PEER1]))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_no_runs_found_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "absent"):
        assert main(["report", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(target) in err and err.count("\n") == 1, err


def test_baseline_folder_with_different_settings_is_refused(tmp_path):
    write_run(tmp_path / "runs", "r", [PEER0])
    write_run(tmp_path / "base", "b1", [PEER0], lr=0.1)
    write_run(tmp_path / "base", "b2", [PEER0], lr=0.2)
    with pytest.raises(UserError, match="different settings"):
        report([tmp_path / "runs"], baseline=tmp_path / "base")


# Validation accuracy peaks at epoch 1 for peer 0 and epoch 2 for peer 1, where test accuracy does not.
VAL0, VAL1 = [50.0, 41.0, 42.0], [20.0, 44.0, 43.0]


def test_validation_columns_show_test_at_the_best_validation_epoch(tmp_path):
    run = write_run(tmp_path, "val_run", [PEER0, PEER1], ensemble=[16.0, 41.0, 46.0],
                    val=[VAL0, VAL1], ensemble_val=[30.0, 47.0, 46.5])
    markdown = report([run])
    table = rows(markdown, "## DML")
    assert table["Model ID"] == [
        "Train Accuracy (%)", "Val Accuracy (%)", "Test Accuracy (%)", "Test at Best Val (%)",
        "Best Test Accuracy (%)", "Train Loss"]
    assert table["0_resnet32"] == ["30.00", "42.00", "35.00", "15.00 (ep 1)", "40.00 (ep 2)", "1.500"]
    assert table["1_resnet32"] == ["32.00", "43.00", "45.00", "30.00 (ep 2)", "45.00 (ep 3)", "1.250"]
    assert table["Average"][1:4] == ["42.50", "40.00", "22.50"]  # test at best val: (15 + 30) / 2
    assert table["Ensemble"] == ["–", "46.50", "46.00", "41.00 (ep 2)", "46.00 (ep 3)", "–"]
    summary = rows(markdown, "## Summary")
    assert summary["val_run"][summary["Run"].index("Avg Test at Best Val (%)")] == "22.50"
    assert "Test at Best Val is the test accuracy at the epoch of highest validation accuracy" in markdown


def test_runs_without_validation_have_no_validation_columns(tmp_path):
    markdown = report([write_run(tmp_path, "plain", [PEER0, PEER1])])
    assert "Val" not in markdown


def test_validation_in_some_epochs_only_is_refused(tmp_path):
    run = write_run(tmp_path, "odd", [PEER0], val=[VAL0])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    del record["val_acc"]
    (run / "metrics.jsonl").write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(UserError, match="val_acc in some epochs only"):
        read_run(run)


def test_the_learning_curves_draw_the_loss_terms_where_the_run_recorded_them(tmp_path):
    from dml.report import run_figure

    terms = [[(2.5, 0.5), (1.5, 0.5), (1.0, 0.5)], [(2.6, 0.5), (1.6, 0.5), (0.75, 0.5)]]
    with_terms = read_run(write_run(tmp_path, "dml_n2_resnet32_s1", [PEER0, PEER1], terms=terms))
    assert with_terms.peers[1].train_kd == [0.5, 0.5, 0.5] and with_terms.peers[0].train_ce == [2.5, 1.5, 1.0]
    fig = run_figure(with_terms)
    assert len(fig.axes) == 3
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[2].get_lines()}
    assert lines == {"0_resnet32 CE": [2.5, 1.5, 1.0], "0_resnet32 KD": [0.5] * 3,
                     "1_resnet32 CE": [2.6, 1.6, 0.75], "1_resnet32 KD": [0.5] * 3}
    without = read_run(write_run(tmp_path, "dml_n2_resnet32_s2", [PEER0, PEER1], seed=2))
    assert len(run_figure(without).axes) == 2  # written before the terms were recorded


def test_runs_written_before_a_setting_existed_group_with_runs_at_its_default(tmp_path):
    from dml.report import seed_groups

    old = write_run(tmp_path, "dml_n2_resnet32_s1", [PEER0, PEER1], seed=1)
    new = write_run(tmp_path, "dml_n2_resnet32_s2", [PEER0, PEER1], seed=2)
    document = json.loads((new / "config.json").read_text())
    document["config"].update(kd_ramp=None, kd_ramp_epochs=None)  # settings the older run did not have
    (new / "config.json").write_text(json.dumps(document))
    ramped = write_run(tmp_path, "dml_n2_resnet32_s3", [PEER0, PEER1], seed=3)
    document = json.loads((ramped / "config.json").read_text())
    document["config"].update(kd_ramp="sigmoid", kd_ramp_epochs=None)
    (ramped / "config.json").write_text(json.dumps(document))
    groups = seed_groups([read_run(old), read_run(new), read_run(ramped)])
    assert [[run.seed for run in group] for group in groups] == [[1, 2], [3]]


def test_published_numbers_stand_beside_the_measured_ones(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, f"one_s{seed}", [[(80.0, 70.0 + seed, 1.0)], [(80.0, 72.0, 1.0)]], seed=seed)
    write_run(tmp_path, "kdcl_s1", [[(80.0, 60.0, 1.0)], [(80.0, 62.0, 1.0)]], lr=0.05)
    markdown = report([tmp_path], published={"source": "PCL, Table 2", "one": 73.79})
    summary = rows(markdown, "## Summary")
    assert summary["one"][-1] == "73.79" and summary["one"][4] == "71.75 ± 0.35"  # seed averages 71.5, 72
    assert summary["kdcl_s1"][-1] == "–"  # no published number for it
    assert "Published: PCL, Table 2." in markdown
    assert "Published" not in report([tmp_path])


def test_headings_name_the_method_a_graph_file_and_a_ramp(tmp_path):
    """Two methods of 2 peers are not both "a graph of 2 nodes": a graph run's heading names its file, and a
    ramped KL term says so."""
    for name, update in (("kdcl_s1", {"graph": "examples/graphs/kdcl.toml", "graph_spec": {"peers": [], "links": []}}),
                         ("ramped_s1", {"kd_ramp": "sigmoid"})):
        run = write_run(tmp_path, name, [PEER0, PEER1])
        document = json.loads((run / "config.json").read_text())
        document["config"].update(update)
        (run / "config.json").write_text(json.dumps(document))
    markdown = report([tmp_path])
    assert "## Graph file kdcl.toml of 2 nodes: kdcl_s1" in markdown
    assert "## DML with 2 nodes, KL term on a sigmoid ramp: ramped_s1" in markdown


def test_default_run_names_tell_the_ramp_apart():
    from dml.config import TrainConfig

    plain = TrainConfig(models=["resnet20"], num_nodes=2)
    ramped = TrainConfig(models=["resnet20"], num_nodes=2, kd_ramp="sigmoid")
    assert (plain.default_name(), ramped.default_name()) == ("dml_n2_resnet20_s42", "dml_n2_sigmoid_ramp_resnet20_s42")
