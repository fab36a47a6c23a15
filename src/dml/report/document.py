"""report.md: the summary table, a section per run or seed group, its results table and legend."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import cast

from ..markdown import escape, table
from .runs import Run
from .stats import Baseline, best_epoch, final_accuracy, group_name, seed_groups, stat, without, without_seed

DASH = "–"  # an empty cell: the value does not exist for this row

HEADER = ["Model ID", "Train Accuracy (%)", "Test Accuracy (%)", "Best Test Accuracy (%)", "Train Loss"]
VAL_HEADER = [
    "Model ID",
    "Train Accuracy (%)",
    "Val Accuracy (%)",
    "Test Accuracy (%)",
    "Test at Best Val (%)",
    "Best Test Accuracy (%)",
    "Train Loss",
]
IMPROVEMENT = "Improvement vs Baseline (pp)"
ENSEMBLE_IMPROVEMENT = "Ensemble Improvement (pp)"


def results_table(group: list[Run], baseline: Baseline | None = None) -> str:
    """The seed-style table of one run (or seed group): a row per peer, then Average and Ensemble.

    Train/Test Accuracy and Train Loss are those of the last epoch; Best Test Accuracy is the
    highest test accuracy over the epochs run. With a validation split, Val Accuracy (last epoch)
    and Test at Best Val (test accuracy at the epoch of highest validation accuracy, the epoch of
    best.pt) are added. With one peer the Average and Ensemble rows would repeat its row, so they
    are left out (as in the seed's baseline table).
    """
    with_val = group[0].has_val
    header = (VAL_HEADER if with_val else HEADER) + ([IMPROVEMENT] if baseline is not None else [])
    rows = []

    def row(label, train_acc, val_acc, test_acc, at_best_val, best, loss, bold=False, teacher=False, mean=False):
        # a temporal mean does not train: its numbers on the training batches are left out
        cells = (
            [label, DASH if mean else train_acc.format()]
            + ([val_acc.format(), test_acc.format(), at_best_val.format()] if with_val else [test_acc.format()])
            + [best.format(), DASH if mean else loss.format(3)]
        )
        if baseline is not None:
            cells.append(DASH if teacher else baseline.gain(group, test_acc.values).format(signed=True))
        if bold:
            cells = [f"**{c}**" if c != DASH else c for c in cells]
        rows.append(cells)

    for i in range(group[0].num_peers):
        history = [run.peers[i] for run in group]
        best = [h.best() for h in history]
        chosen = [h.at_best_val() for h in history] if with_val else []
        row(
            escape(history[0].label),
            stat([h.train_acc[-1] for h in history]),
            with_val and stat([h.val_acc[-1] for h in history]),
            stat([h.test_acc[-1] for h in history]),
            with_val and stat([c[0] for c in chosen], [c[1] for c in chosen]),
            stat([b[0] for b in best], [b[1] for b in best]),
            stat([h.train_loss[-1] for h in history]),
            teacher=history[0].teacher,
            mean=history[0].mean_of is not None,
        )
    if len(group[0].students) > 1:

        def mean_over_peers(value):
            return stat([statistics.fmean(value(p) for p in run.students) for run in group])

        row(
            "Average",
            mean_over_peers(lambda p: p.train_acc[-1]),
            with_val and mean_over_peers(lambda p: p.val_acc[-1]),
            mean_over_peers(lambda p: p.test_acc[-1]),
            with_val and mean_over_peers(lambda p: p.at_best_val()[0]),
            mean_over_peers(lambda p: p.best()[0]),
            mean_over_peers(lambda p: p.train_loss[-1]),
            bold=True,
        )
        rows.append(_ensemble_row(group, baseline is not None))
    return table(header, rows)


def _ensemble_row(group: list[Run], with_improvement: bool) -> list[str]:
    """Ensemble (mean softmax of the training peers): only test (and validation) accuracies exist for it."""
    with_val = group[0].has_val
    final = [run.ensemble.get(run.epochs_done) for run in group]
    if any(v is None for v in final):
        cells = [DASH] * (3 if with_val else 1) + [DASH]
    else:
        best_epochs = [best_epoch(run.ensemble) for run in group]
        best = stat([run.ensemble[e] for run, e in zip(group, best_epochs)], best_epochs).format()
        cells = [stat(cast("list[float]", final)).format(), best]  # no None: checked above
        if with_val:
            chosen = [best_epoch(run.ensemble_val) for run in group]
            at_best_val = stat([run.ensemble[e] for run, e in zip(group, chosen)], chosen).format()
            val = stat([run.ensemble_val[run.epochs_done] for run in group]).format()
            cells = [val, cells[0], at_best_val, best]
    cells = ["Ensemble", DASH] + cells + [DASH] + ([DASH] if with_improvement else [])
    return [f"*{c}*" if c != DASH else c for c in cells]


def models_text(models: list[str]) -> str:
    unique = list(dict.fromkeys(models))
    if len(models) == 1:
        return models[0]
    return f"{len(models)}×{unique[0]}" if len(unique) == 1 else " + ".join(models)


def epochs_text(run: Run) -> str:
    text = f"{run.epochs_done}/{run.epochs_planned}"
    return text + " (interrupted)" if run.interrupted else text


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def peers_text(run: Run, long: bool = False) -> str:
    """The run's peers: ``2`` (``2 nodes`` when ``long``), or with teachers ``1 student + 1 teacher``
    (a frozen teacher is a node of the graph but learns nothing, so it is not counted as a peer), or
    with temporal means ``2 + 2 means``."""
    peers, students, means = run.num_peers, len(run.students), len(run.means)
    teachers = peers - students - means
    with_means = f" + {plural(means, 'mean')}" if means else ""
    if teachers:
        return f"{plural(students, 'student')} + {plural(teachers, 'teacher')}{with_means}"
    if means:
        return f"{students}{with_means}"
    return plural(peers, "node") if long else str(peers)


def _title(group: list[Run], is_baseline: bool = False) -> str:
    peers, students = group[0].num_peers - len(group[0].means), len(group[0].students)
    if is_baseline:
        kind = "Baseline"
    elif students < peers:
        kind = f"Knowledge distillation into {plural(students, 'peer')} from {plural(peers - students, 'teacher')}"
    elif group[0].config.get("graph_spec"):
        means, graph = len(group[0].means), group[0].config.get("graph")
        named = f"Graph file {Path(graph).name}" if graph else "Knowledge-transfer graph"
        kind = f"{named} of {plural(peers, 'node')}" + (f" and {plural(means, 'temporal mean')}" if means else "")
    else:
        kind = "Independent training" if peers == 1 else f"DML with {peers} nodes"
    ramp = group[0].config.get("kd_ramp")
    kind += f", KL term on a {ramp} ramp" if ramp else ""
    seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
    return f"{kind}: {escape(group_name(group))}{seeds}"


def group_section(
    group: list[Run], baseline: Baseline | None, images: dict[str, str] | None = None, is_baseline: bool = False
) -> str:
    """One run's (or seed group's) section: configuration bullets, the table, its legend, plots.

    ``baseline`` is what the runs are compared with; ``images`` maps run paths to plots.
    """
    first = group[0]
    cfg = first.config
    seeds = ", ".join(str(run.seed) for run in group)
    lines = [f"## {_title(group, is_baseline)}", ""]
    if len(group) == 1:
        lines.append(f"- Run: `{first.path}`")
    else:
        lines.append("- Runs: " + ", ".join(f"`{run.path}`" for run in group))
    lines += [
        f"- Models: {models_text(cfg['models'])} on {cfg.get('dataset', 'cifar100')}"
        + (f", {cfg.get('update', 'simultaneous')} updates" if first.num_peers > 1 else ""),
        f"- Epochs: {epochs_text(first)}",
        f"- Seed{'s' if len(group) > 1 else ''}: {seeds}" + (f" (n = {len(group)})" if len(group) > 1 else ""),
        "",
        "**Results**:",
        "",
        results_table(group, baseline),
        "",
    ]
    note = (
        f"Train Accuracy, Test Accuracy and Train Loss at the last epoch ({first.epochs_done}); "
        f"Best Test Accuracy is the highest over the {plural(first.epochs_done, 'epoch')} run"
    )
    note += " (its epoch in parentheses)." if len(group) == 1 else "."
    if first.has_val:
        note += (
            f" Val Accuracy is on the {cfg.get('val_samples')} training images held out for validation; "
            "Test at Best Val is the test accuracy at the epoch of highest validation accuracy (the epoch "
            "best.pt holds), an unbiased choice, unlike Best Test."
        )
    if len(group) > 1:
        note += f" Values are mean ± sample standard deviation over n = {len(group)} seeds."
    if first.num_peers > 1:
        note += " Ensemble: the peers' mean softmax."
    if any(p.learned_teacher for p in first.peers):
        note += (
            " A row marked (learned teacher) is made of the branches of a multi-branch network (ONE's gate): not "
            "part of the Average or the Ensemble."
        )
    if first.means:
        note += (
            " A row marked (mean of i) is the temporal mean (moving average of the weights) of peer i, not "
            "part of the Average or the Ensemble; the model to deploy is often this one: its folder's best.pt. "
            "It does not train, so its train columns are empty (metrics.jsonl keeps its cross-entropy and "
            "accuracy on the training batches, computed in evaluation mode)."
        )
    if baseline:
        note += (
            f" Improvement: final test accuracy minus the baseline's ({escape(baseline.name)}: "
            f"{baseline.accuracy:.2f}% at its last epoch), in percentage points"
            + (f", {baseline.paired_note}" if len(group) > 1 else "")
        )
        # An interrupted run is compared with a baseline that may have trained far longer: say so.
        note += f", although this run stopped at epoch {first.epochs_done}." if first.interrupted else "."
    lines += [note, ""]
    links = [(run.name, images[str(run.path)]) for run in group if images and str(run.path) in images]
    lines += [f"![Learning curves of {escape(name)}]({link})" for name, link in links]
    if links:
        lines.append("")
    return "\n".join(lines)


def summary_table(
    groups: list[list[Run]], baseline_group: list[Run] | None, baseline: Baseline | None, published: dict | None = None
) -> str:
    """One line per run or seed group: the averages that compare methods at a glance -- test accuracy, train
    accuracy beside it (a regulariser lowers it), the temporal means and the learned teachers (ONE's gate, a
    fusion head) where a run has them, the ensemble of the peers and,
    against a baseline, the gains of the peers' average and of the ensemble (and, where a plan gives them, the
    published numbers beside)."""
    everything = ([baseline_group] if baseline_group else []) + groups
    with_val = any(group[0].has_val for group in everything)
    with_means = any(group[0].means for group in everything)
    with_learned = any(group[0].learned_teachers for group in everything)
    published = {k: v for k, v in (published or {}).items() if k != "source"}
    header = (
        ["Run", "Nodes", "Epochs", "Seeds", "Avg Test Accuracy (%)"]
        + (["Avg Test at Best Val (%)"] if with_val else [])
        + ["Avg Best Test Accuracy (%)", "Avg Train Accuracy (%)"]
        + (["Temporal Means' Test Accuracy (%)"] if with_means else [])
        + (["Learned Teachers' Test Accuracy (%)"] if with_learned else [])
        + ["Ensemble Test Accuracy (%)"]
        + ([IMPROVEMENT, ENSEMBLE_IMPROVEMENT] if baseline is not None else [])
        + (["Published (%)"] if published else [])
    )
    rows = []
    for group in everything:
        avg_test = stat([final_accuracy(run) for run in group])
        at_best_val = (
            stat([statistics.fmean(p.at_best_val()[0] for p in run.students) for run in group]).format()
            if group[0].has_val
            else DASH
        )
        avg_best = stat([statistics.fmean(p.best()[0] for p in run.students) for run in group])
        avg_train = stat([statistics.fmean(p.train_acc[-1] for p in run.students) for run in group])
        means, learned = (_final_test_accuracy(group, outputs) for outputs in ("means", "learned_teachers"))
        final = [run.ensemble.get(run.epochs_done) for run in group]
        name = escape(group_name(group)) + (" (baseline)" if group is baseline_group else "")
        cells = (
            [
                name,
                peers_text(group[0]),
                epochs_text(group[0]),
                ", ".join(str(r.seed) for r in group),
                avg_test.format(),
            ]
            + ([at_best_val] if with_val else [])
            + [avg_best.format(), avg_train.format()]
            + ([means] if with_means else [])
            + ([learned] if with_learned else [])
            + [DASH if None in final else stat(cast("list[float]", final)).format()]
        )
        if baseline is not None:
            if group is baseline_group:
                cells += [DASH, DASH]
            else:
                cells.append(baseline.gain(group, avg_test.values).format(signed=True))
                ensemble = DASH if None in final else baseline.gain(group, cast("list[float]", final))
                cells.append(ensemble if isinstance(ensemble, str) else ensemble.format(signed=True))
        if published:
            label = without_seed(group[0].name)  # a plan's run is its row's label and its seed
            cells.append(f"{published[label]:.2f}" if label in published else DASH)
        rows.append(cells)
    return table(header, rows)


def _final_test_accuracy(group: list[Run], outputs: str) -> str:
    """The final test accuracy of a group's runs' ``outputs`` ("means", "learned_teachers"), averaged over
    those of a run, as mean ± std over the seeds; a dash where the runs have none."""
    if not getattr(group[0], outputs):
        return DASH
    return stat([final_accuracy(run, outputs) for run in group]).format()


def build_markdown(
    runs: list[Run],
    baseline_runs: list[Run] | None = None,
    images: dict[str, str] | None = None,
    figures: dict[str, str] | None = None,
    published: dict | None = None,
) -> str:
    """The whole report. ``images`` maps a run's path (str) to the link of its plot, ``figures`` the
    figures of all runs ("comparison", "gains") to theirs; ``published`` a plan's [published] table."""
    images = images or {}
    baseline_group = None
    baseline = None
    if baseline_runs:
        baseline_group = baseline_runs
        baseline = Baseline.of(baseline_group)
        runs = without(runs, baseline_runs)  # the baseline is shown once, in its own section
    groups = seed_groups(runs)
    parts = [
        "# Training report",
        "",
        "Accuracies in %. Test accuracy is given at the last epoch run and, as Best, at the epoch "
        "where it was highest: publications report either, so both are shown.",
        "",
        "## Summary",
        "",
        summary_table(groups, baseline_group, baseline, published),
        "",
    ]
    if baseline is not None:
        parts += [
            f"Improvements: final test accuracy (the peers' average, or the ensemble's) minus the baseline's, in "
            f"percentage points, {baseline.paired_note}. Avg Train Accuracy: the peers' accuracy on the augmented "
            "training batches of the last epoch.",
            "",
        ]
    if published and published.get("source"):
        parts += [f"Published: {escape(published['source'])}.", ""]
    figures = figures or {}
    if "gains" in figures:
        parts += [f"![Each run's gain over the baseline, per seed]({figures['gains']})", ""]
    if "comparison" in figures:
        parts += [f"![Average test accuracy by number of nodes]({figures['comparison']})", ""]
    if baseline_group:
        parts.append(group_section(baseline_group, None, images, is_baseline=True))
    for group in groups:
        parts.append(group_section(group, baseline, images))
    return "\n".join(parts).rstrip("\n") + "\n"
