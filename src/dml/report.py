"""``dml report``: Markdown tables and learning-curve plots from run directories.

A run directory is read through its ``config.json`` and ``metrics.jsonl`` only, so finished,
interrupted and still-running runs can all be reported. The tables follow the hand-written ones
of the seed's CIFAR-100 README (Model ID, Train Accuracy, Test Accuracy, Train Loss, Improvement
vs Baseline, an Average row) and add the best-epoch test accuracy and the cohort's ensemble.

Runs whose configurations differ only in the seed form one group, reported as mean ± sample
standard deviation over the n seeds.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import RESUMABLE_CHANGES
from .errors import UserError
from .runlog import CONFIG_FILE, ENSEMBLE, METRICS_FILE, RunDir, peer_dir_name

DASH = "–"  # an empty cell: the value does not exist for this row


# --- reading runs ---------------------------------------------------------------------------------
@dataclass
class PeerHistory:
    """One peer's per-epoch metrics, in epoch order."""

    index: int
    model: str
    teacher: bool = False  # frozen: shown, but not averaged with the peers that train
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)  # empty without a validation split

    @property
    def label(self) -> str:
        return peer_dir_name(self.index, self.model) + (" (teacher)" if self.teacher else "")

    def best(self) -> tuple[float, int]:
        """Highest test accuracy and the first epoch that reached it."""
        acc = max(self.test_acc)
        return acc, self.epochs[self.test_acc.index(acc)]

    def at_best_val(self) -> tuple[float, int]:
        """Test accuracy at the first epoch of highest validation accuracy (the epoch of best.pt), and that epoch."""
        k = self.val_acc.index(max(self.val_acc))
        return self.test_acc[k], self.epochs[k]


@dataclass
class Run:
    """What ``dml report`` needs of one run directory."""

    path: Path
    config: dict
    peers: list[PeerHistory]
    ensemble: dict[int, float]  # epoch -> ensemble test accuracy
    ensemble_val: dict[int, float] = field(default_factory=dict)  # epoch -> ensemble validation accuracy

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    @property
    def num_nodes(self) -> int:
        return len(self.peers)

    @property
    def students(self) -> list[PeerHistory]:
        """The peers that train (all but the teachers)."""
        return [p for p in self.peers if not p.teacher]

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def epochs_planned(self) -> int:
        return int(self.config["epochs"])

    @property
    def epochs_done(self) -> int:
        return self.peers[0].epochs[-1]

    @property
    def has_val(self) -> bool:
        """Whether the run held out a validation split (its metrics carry val_acc)."""
        return bool(self.peers[0].val_acc)

    @property
    def interrupted(self) -> bool:
        return self.epochs_done < self.epochs_planned

    def average_curve(self, key: str) -> tuple[list[int], list[float]]:
        """Per epoch, the mean over the training peers of ``key`` (test_acc or train_loss)."""
        values = [getattr(p, key) for p in self.students]
        return list(self.peers[0].epochs), [statistics.fmean(v) for v in zip(*values)]


def find_runs(paths) -> list[Path]:
    """Run directories named by ``paths``: a folder holding config.json is a run, any other folder
    is searched for runs below it (sorted). Each run is listed once, in the order found."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / CONFIG_FILE).is_file():
            below = [path]
        elif path.is_dir():
            below = sorted(p.parent for p in path.rglob(CONFIG_FILE) if p.is_file())
            if not below:
                raise UserError(f"no runs found under {path}: no folder below it holds a {CONFIG_FILE}")
        else:
            raise UserError(f"{path} does not exist or is not a folder; pass a run directory or a folder of runs")
        for run in below:
            if run.resolve() not in {f.resolve() for f in found}:
                found.append(run)
    return found


def read_run(path: Path) -> Run:
    """Read one run directory; every missing or malformed file is a UserError naming it."""
    path = Path(path)
    config = _read_config(path / CONFIG_FILE)
    models = config["models"]
    teachers = {k for k, peer in enumerate((config.get("graph_spec") or {}).get("peers", []))
                if isinstance(peer, dict) and peer.get("checkpoint")}
    peers = [PeerHistory(i, name, i in teachers) for i, name in enumerate(models)]
    run_dir = RunDir(path, {p.index: p.model for p in peers if not p.teacher}, writer=False)
    records = run_dir.records()
    for record in records:
        try:
            if record.node == ENSEMBLE:
                float(record.data["test_acc"])
            elif 0 <= record.node < len(models):
                for key in ("train_loss", "train_acc", "test_acc"):
                    float(record.data[key])
            else:
                raise ValueError(f"node {record.node!r} is not one of the {len(models)} peers in {CONFIG_FILE}")
            if "val_acc" in record.data:
                float(record.data["val_acc"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path / METRICS_FILE} line {record.line} is not a dml metrics record ({exc})") from None
    ensemble, ensemble_val = {}, {}
    for epoch, entry in run_dir.completed_epochs(records).items():
        missing = [i for i in range(len(models)) if i not in entry]
        if missing:
            raise UserError(f"{path / METRICS_FILE} has no record of peer {missing[0]} in epoch {epoch}, which is "
                            "complete; it was not written by dml train")
        for peer in peers:
            record = entry[peer.index].data
            peer.epochs.append(epoch)
            peer.train_loss.append(float(record["train_loss"]))
            peer.train_acc.append(float(record["train_acc"]))
            peer.test_acc.append(float(record["test_acc"]))
            if "val_acc" in record:
                peer.val_acc.append(float(record["val_acc"]))
        record = entry[ENSEMBLE].data
        ensemble[epoch] = float(record["test_acc"])
        if "val_acc" in record:
            ensemble_val[epoch] = float(record["val_acc"])
    if not peers[0].epochs:
        raise UserError(f"{path / METRICS_FILE} holds no epoch completed by every peer; report the run after its "
                        "first epoch")
    if any(len(p.val_acc) not in (0, len(p.epochs)) for p in peers) or \
            (peers[0].val_acc and ensemble and len(ensemble_val) != len(ensemble)):
        raise UserError(f"{path / METRICS_FILE} has val_acc in some epochs only; it was not written by one dml train run")
    return Run(path, config, peers, ensemble, ensemble_val)


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())["config"]
        if not isinstance(config["models"], list) or not config["models"] or int(config["epochs"]) < 1:
            raise ValueError("no models or no planned epochs")
        return config
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {path.parent} is not a dml run directory") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is unreadable ({type(exc).__name__}: {exc}); it was not written by dml train") \
            from None


# --- grouping and statistics ---------------------------------------------------------------------
def seed_groups(runs: list[Run]) -> list[list[Run]]:
    """Runs that differ only in seed (and settings that do not change results), in first-seen order.

    Runs that stopped at different epochs are kept apart: their final numbers are not comparable.
    """
    ignored = set(RESUMABLE_CHANGES) | {"seed"}
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = {k: v for k, v in run.config.items() if k not in ignored}
        key["__epochs_done"] = run.epochs_done
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(run)
    return list(groups.values())


def group_name(group: list[Run]) -> str:
    """The common name of a group's runs: their name without the ``_s<seed>`` suffix."""
    if len(group) == 1:
        return group[0].name
    stripped = {re.sub(r"_s-?\d+$", "", run.name) for run in group}
    return stripped.pop() if len(stripped) == 1 else ", ".join(run.name for run in group)


def baseline_accuracy(group: list[Run]) -> float:
    """The baseline's final test accuracy: mean over its peers (and over its seeds, if several)."""
    return statistics.fmean(statistics.fmean(p.test_acc[-1] for p in run.students) for run in group)


@dataclass
class Stat:
    """A value over a group's seeds: shown plain for one seed, as mean ± std for several."""

    values: list[float]
    epoch: int | None = None  # for the best test accuracy of a single run

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def format(self, digits: int = 2, signed: bool = False) -> str:
        text = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
        if len(self.values) > 1:
            text += f" ± {self.std:.{digits}f}"
        elif self.epoch is not None:
            text += f" (ep {self.epoch})"
        return text


def _stat(values: list[float], epochs: list[int] | None = None) -> Stat:
    return Stat(values, epochs[0] if epochs and len(values) == 1 else None)


# --- Markdown -------------------------------------------------------------------------------------
HEADER = ["Model ID", "Train Accuracy (%)", "Test Accuracy (%)", "Best Test Accuracy (%)", "Train Loss"]
VAL_HEADER = ["Model ID", "Train Accuracy (%)", "Val Accuracy (%)", "Test Accuracy (%)", "Test at Best Val (%)",
              "Best Test Accuracy (%)", "Train Loss"]
IMPROVEMENT = "Improvement vs Baseline (pp)"


def results_table(group: list[Run], baseline: float | None = None) -> str:
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

    def row(label, train_acc, val_acc, test_acc, at_best_val, best, loss, bold=False, teacher=False):
        cells = [label, train_acc.format()] + ([val_acc.format(), test_acc.format(), at_best_val.format()]
                                               if with_val else [test_acc.format()]) + [best.format(), loss.format(3)]
        if baseline is not None:
            cells.append(DASH if teacher else Stat([v - baseline for v in test_acc.values]).format(signed=True))
        if bold:
            cells = [f"**{c}**" if c != DASH else c for c in cells]
        rows.append(cells)

    for i in range(group[0].num_nodes):
        history = [run.peers[i] for run in group]
        best = [h.best() for h in history]
        chosen = [h.at_best_val() for h in history] if with_val else []
        row(_escape(history[0].label), _stat([h.train_acc[-1] for h in history]),
            with_val and _stat([h.val_acc[-1] for h in history]), _stat([h.test_acc[-1] for h in history]),
            with_val and _stat([c[0] for c in chosen], [c[1] for c in chosen]),
            _stat([b[0] for b in best], [b[1] for b in best]), _stat([h.train_loss[-1] for h in history]),
            teacher=history[0].teacher)
    if len(group[0].students) > 1:
        def mean_over_peers(value):
            return _stat([statistics.fmean(value(p) for p in run.students) for run in group])

        row("Average", mean_over_peers(lambda p: p.train_acc[-1]), with_val and mean_over_peers(lambda p: p.val_acc[-1]),
            mean_over_peers(lambda p: p.test_acc[-1]), with_val and mean_over_peers(lambda p: p.at_best_val()[0]),
            mean_over_peers(lambda p: p.best()[0]), mean_over_peers(lambda p: p.train_loss[-1]), bold=True)
        rows.append(_ensemble_row(group, baseline is not None))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _best_epoch(curve: dict[int, float]) -> int:
    """The first epoch of the highest value."""
    return -max((value, -epoch) for epoch, value in curve.items())[1]


def _ensemble_row(group: list[Run], with_improvement: bool) -> list[str]:
    """Ensemble (mean softmax of the training peers): only test (and validation) accuracies exist for it."""
    with_val = group[0].has_val
    final = [run.ensemble.get(run.epochs_done) for run in group]
    if any(v is None for v in final):
        cells = [DASH] * (3 if with_val else 1) + [DASH]
    else:
        best_epochs = [_best_epoch(run.ensemble) for run in group]
        best = _stat([run.ensemble[e] for run, e in zip(group, best_epochs)], best_epochs).format()
        cells = [_stat(final).format(), best]
        if with_val:
            chosen = [_best_epoch(run.ensemble_val) for run in group]
            at_best_val = _stat([run.ensemble[e] for run, e in zip(group, chosen)], chosen).format()
            val = _stat([run.ensemble_val[run.epochs_done] for run in group]).format()
            cells = [val, cells[0], at_best_val, best]
    cells = ["Ensemble", DASH] + cells + [DASH] + ([DASH] if with_improvement else [])
    return [f"*{c}*" if c != DASH else c for c in cells]


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _models_text(models: list[str]) -> str:
    unique = list(dict.fromkeys(models))
    if len(models) == 1:
        return models[0]
    return f"{len(models)}×{unique[0]}" if len(unique) == 1 else " + ".join(models)


def _epochs_text(run: Run) -> str:
    text = f"{run.epochs_done}/{run.epochs_planned}"
    return text + " (interrupted)" if run.interrupted else text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _nodes_text(run: Run, long: bool = False) -> str:
    """The run's peers: ``2`` (``2 nodes`` when ``long``), or with teachers ``1 student + 1 teacher``: a
    frozen teacher is a node of the graph but learns nothing, so it is not counted as a peer."""
    nodes, students = run.num_nodes, len(run.students)
    if students < nodes:
        return f"{_plural(students, 'student')} + {_plural(nodes - students, 'teacher')}"
    return _plural(nodes, "node") if long else str(nodes)


def _title(group: list[Run], is_baseline: bool = False) -> str:
    nodes, students = group[0].num_nodes, len(group[0].students)
    if is_baseline:
        kind = "Baseline"
    elif students < nodes:
        kind = f"Knowledge distillation into {_plural(students, 'peer')} from {_plural(nodes - students, 'teacher')}"
    elif group[0].config.get("graph_spec"):
        kind = f"Knowledge-transfer graph of {nodes} nodes"
    else:
        kind = "Independent training" if nodes == 1 else f"DML with {nodes} nodes"
    seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
    return f"{kind}: {_escape(group_name(group))}{seeds}"


def group_section(group: list[Run], baseline: tuple[str, float] | None, images: dict[str, str] | None = None,
                  is_baseline: bool = False) -> str:
    """One run's (or seed group's) section: configuration bullets, the table, its legend, plots.

    ``baseline`` is (name, final test accuracy) of the baseline; ``images`` maps run paths to plots.
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
        f"- Models: {_models_text(cfg['models'])} on {cfg.get('dataset', 'cifar100')}"
        + (f", {cfg.get('update', 'simultaneous')} updates" if first.num_nodes > 1 else ""),
        f"- Epochs: {_epochs_text(first)}",
        f"- Seed{'s' if len(group) > 1 else ''}: {seeds}" + (f" (n = {len(group)})" if len(group) > 1 else ""),
        "", "**Results**:", "", results_table(group, baseline[1] if baseline else None), "",
    ]
    note = (f"Train Accuracy, Test Accuracy and Train Loss at the last epoch ({first.epochs_done}); "
            f"Best Test Accuracy is the highest over the {_plural(first.epochs_done, 'epoch')} run")
    note += " (its epoch in parentheses)." if len(group) == 1 else "."
    if first.has_val:
        note += (f" Val Accuracy is on the {cfg.get('val_samples')} training images held out for validation; "
                 "Test at Best Val is the test accuracy at the epoch of highest validation accuracy (the epoch "
                 "best.pt holds), an unbiased choice, unlike Best Test.")
    if len(group) > 1:
        note += f" Values are mean ± sample standard deviation over n = {len(group)} seeds."
    if first.num_nodes > 1:
        note += " Ensemble: the peers' mean softmax."
    if baseline:
        note += (f" Improvement: final test accuracy minus the baseline's ({_escape(baseline[0])}: "
                 f"{baseline[1]:.2f}% at its last epoch), in percentage points")
        # An interrupted run is compared with a baseline that may have trained far longer: say so.
        note += f", although this run stopped at epoch {first.epochs_done}." if first.interrupted else "."
    lines += [note, ""]
    links = [(run.name, images[str(run.path)]) for run in group if images and str(run.path) in images]
    lines += [f"![Learning curves of {_escape(name)}]({link})" for name, link in links]
    if links:
        lines.append("")
    return "\n".join(lines)


def summary_table(groups: list[list[Run]], baseline_group: list[Run] | None, baseline: float | None) -> str:
    """One line per run or seed group: the averages that compare node counts at a glance."""
    everything = ([baseline_group] if baseline_group else []) + groups
    with_val = any(group[0].has_val for group in everything)
    header = ["Run", "Nodes", "Epochs", "Seeds", "Avg Test Accuracy (%)"] + \
        (["Avg Test at Best Val (%)"] if with_val else []) + \
        ["Avg Best Test Accuracy (%)", "Ensemble Test Accuracy (%)"] + ([IMPROVEMENT] if baseline is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    for group in everything:
        avg_test = _stat([statistics.fmean(p.test_acc[-1] for p in run.students) for run in group])
        at_best_val = (_stat([statistics.fmean(p.at_best_val()[0] for p in run.students) for run in group]).format()
                       if group[0].has_val else DASH)
        avg_best = _stat([statistics.fmean(p.best()[0] for p in run.students) for run in group])
        final = [run.ensemble.get(run.epochs_done) for run in group]
        name = _escape(group_name(group)) + (" (baseline)" if group is baseline_group else "")
        cells = [name, _nodes_text(group[0]), _epochs_text(group[0]), ", ".join(str(r.seed) for r in group),
                 avg_test.format()] + ([at_best_val] if with_val else []) + \
                [avg_best.format(), DASH if None in final else _stat(final).format()]
        if baseline is not None:
            cells.append(DASH if group is baseline_group else
                         Stat([v - baseline for v in avg_test.values]).format(signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_markdown(runs: list[Run], baseline_runs: list[Run] | None = None,
                   images: dict[str, str] | None = None, comparison_image: str | None = None) -> str:
    """The whole report. ``images`` maps a run's path (str) to the link of its plot."""
    images = images or {}
    baseline_group = None
    baseline = None
    if baseline_runs:
        baseline_group = baseline_runs
        baseline = (group_name(baseline_group), baseline_accuracy(baseline_group))
        runs = _without(runs, baseline_runs)  # the baseline is shown once, in its own section
    groups = seed_groups(runs)
    parts = ["# Training report", "",
             "Accuracies in %. Test accuracy is given at the last epoch run and, as Best, at the epoch "
             "where it was highest: publications report either, so both are shown.", "",
             "## Summary", "", summary_table(groups, baseline_group, baseline[1] if baseline else None), ""]
    if comparison_image:
        parts += [f"![Average test accuracy by number of nodes]({comparison_image})", ""]
    if baseline_group:
        parts.append(group_section(baseline_group, None, images, is_baseline=True))
    for group in groups:
        parts.append(group_section(group, baseline, images))
    return "\n".join(parts).rstrip("\n") + "\n"


# --- plots ----------------------------------------------------------------------------------------
def _figure(width: float, height: float, columns: int = 1):
    """A matplotlib figure on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported late: slow, and only plots need it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def plot_run(run: Run, path: Path, baseline: list[Run] | None = None) -> Path:
    """Test accuracy and train loss per epoch for every peer; the ensemble dotted, the baseline
    (its peer average, and mean over its seeds if several) dashed."""
    run_figure(run, baseline).savefig(path, dpi=110)
    return Path(path)


def run_figure(run: Run, baseline: list[Run] | None = None):
    """The figure of :func:`plot_run`."""
    fig, (acc_ax, loss_ax) = _figure(12, 4.5, 2)
    style = _line_style(run.epochs_done)
    for peer in run.peers:
        acc_ax.plot(peer.epochs, peer.test_acc, label=peer.label, **style)
        loss_ax.plot(peer.epochs, peer.train_loss, label=peer.label, **style)
    if len(run.students) > 1 and run.ensemble:
        epochs = sorted(run.ensemble)
        acc_ax.plot(epochs, [run.ensemble[e] for e in epochs], ":", color="black", label="ensemble", **style)
    if baseline:
        label = f"baseline: {group_name(baseline)}" + (" (peer average)" if baseline[0].num_nodes > 1 else "")
        for ax, key in ((acc_ax, "test_acc"), (loss_ax, "train_loss")):
            _plot_baseline(ax, _group_curve(baseline, key), label)
    _decorate(acc_ax, "Test accuracy", "test accuracy (%)")
    _decorate(loss_ax, "Train loss", "train loss")
    fig.suptitle(f"{run.name}: {_models_text(run.config['models'])} on {run.config.get('dataset', 'cifar100')}, "
                 f"epochs {_epochs_text(run)}")
    return fig


def plot_comparison(groups: list[list[Run]], path: Path, baseline: list[Run] | None = None) -> Path:
    """Average test accuracy of the peers against epoch, one line per run (seed groups averaged
    over their seeds), ordered by node count; the baseline dashed."""
    comparison_figure(groups, baseline).savefig(path, dpi=110)
    return Path(path)


def comparison_figure(groups: list[list[Run]], baseline: list[Run] | None = None):
    """The figure of :func:`plot_comparison`."""
    fig, (ax,) = _figure(8, 5)
    for group in sorted(groups, key=lambda g: (g[0].num_nodes, group_name(g))):
        epochs, mean = _group_curve(group, "test_acc")
        label = f"{_nodes_text(group[0], long=True)}: {group_name(group)}"
        ax.plot(epochs, mean, label=label + (f" (mean of {len(group)} seeds)" if len(group) > 1 else ""),
                **_line_style(len(epochs)))
    if baseline:
        _plot_baseline(ax, _group_curve(baseline, "test_acc"), f"baseline: {group_name(baseline)}")
    _decorate(ax, "Average test accuracy of the peers by number of nodes", "average test accuracy (%)")
    return fig


def _plot_baseline(ax, curve: tuple[list[int], list[float]], label: str) -> None:
    """The baseline dashed, with markers where its curve is short: a dashed line through one point
    draws nothing, and the legend would name a line that is not there."""
    epochs, values = curve
    if epochs:  # no epoch in common between the baseline's seeds: nothing to draw, nothing to name
        ax.plot(epochs, values, "--", color="gray", label=label, **_line_style(len(epochs)))


def _line_style(points: int) -> dict:
    """Markers on short curves, so that a run of one or a few epochs still shows its points."""
    return {"marker": "o", "markersize": 3} if points <= 30 else {}


def _decorate(ax, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    # epochs are whole numbers; min_n_ticks=1: one epoch spans too few integers for the default 2, and
    # the locator would then fall back to fractional ticks
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _group_curve(group: list[Run], key: str) -> tuple[list[int], list[float]]:
    """Per epoch, the peer average of ``key``, averaged over the group's runs (common epochs)."""
    curves = [dict(zip(*run.average_curve(key))) for run in group]
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    return epochs, [statistics.fmean(c[e] for c in curves) for e in epochs]


def _without(runs: list[Run], excluded: list[Run]) -> list[Run]:
    known = {run.path.resolve() for run in excluded}
    return [run for run in runs if run.path.resolve() not in known]


def _file_stem(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"
    unique, n = stem, 2
    while unique in taken:
        unique, n = f"{stem}-{n}", n + 1
    taken.add(unique)
    return unique


# --- the command ----------------------------------------------------------------------------------
def report(run_paths, baseline: str | os.PathLike | list | None = None, out: str | os.PathLike | None = None,
           plots: str | os.PathLike | None = None) -> str:
    """Read the runs, draw the plots (when ``plots`` names a folder) and return the Markdown;
    with ``out`` it is also written there, with image links relative to it."""
    runs = [read_run(p) for p in find_runs(run_paths)]
    baseline_runs = None
    if baseline is not None:
        baseline_runs = [read_run(p) for p in find_runs(baseline if isinstance(baseline, list) else [baseline])]
        if len(seed_groups(baseline_runs)) > 1:
            raise UserError(f"--baseline {baseline} holds runs with different settings; name one run, "
                            "or a folder whose runs differ only in seed")
    images: dict[str, str] = {}
    comparison = None
    if plots is not None:
        folder = Path(plots)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the plot folder {folder} ({exc})") from None
        link_base = Path(out).parent if out is not None else Path.cwd()

        def link(path: Path) -> str:
            return Path(os.path.relpath(path, link_base)).as_posix()

        taken: set[str] = set()
        shown = _without(runs, baseline_runs or [])
        for run in baseline_runs or []:
            target = folder / f"{_file_stem(run.name, taken)}.png"
            images[str(run.path)] = link(plot_run(run, target))
        for run in shown:
            target = folder / f"{_file_stem(run.name, taken)}.png"
            images[str(run.path)] = link(plot_run(run, target, baseline_runs))
        comparison_path = folder / f"{_file_stem('comparison', taken)}.png"
        plot_comparison(seed_groups(shown), comparison_path, baseline_runs)
        comparison = link(comparison_path)
    markdown = build_markdown(runs, baseline_runs, images, comparison)
    if out is not None:
        try:
            Path(out).write_text(markdown)
        except OSError as exc:
            raise UserError(f"cannot write the report to {out} ({exc})") from None
    return markdown

