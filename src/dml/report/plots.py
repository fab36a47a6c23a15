"""The report's figures (matplotlib on the Agg canvas): a run's learning curves, the runs compared."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from .document import epochs_text, models_text, peers_text
from .runs import Run
from .stats import Baseline, Stat, final_accuracy, group_band, group_curve, group_name


def _figure(width: float, height: float, columns: int = 1, rows: int = 1, **shared):
    """A matplotlib figure on the Agg canvas, without pyplot's global state; its axes in reading order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported late: slow, and only plots need it
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(rows, columns, squeeze=False, **shared).flat)


def plot_run(run: Run, path: Path, baseline: list[Run] | None = None) -> Path:
    """Test accuracy and train loss per epoch for every peer; the ensemble dotted, the baseline
    (its peer average, and mean over its seeds if several) dashed."""
    run_figure(run, baseline).savefig(path, dpi=110)
    return Path(path)


def run_figure(run: Run, baseline: list[Run] | None = None):
    """The figure of :func:`plot_run`; a third panel with the objective's two terms (cross-entropy
    solid, distillation dashed, in each peer's colour) where the run recorded them."""
    with_terms = [peer for peer in run.peers if len(peer.train_ce) == len(peer.epochs) > 0]
    fig, axes = _figure(18 if with_terms else 12, 4.5, 3 if with_terms else 2)
    acc_ax, loss_ax = axes[:2]
    style = _line_style(run.epochs_done)
    for peer in run.peers:
        acc_ax.plot(peer.epochs, peer.test_acc, label=peer.label, **style)
        (line,) = loss_ax.plot(peer.epochs, peer.train_loss, label=peer.label, **style)
        if peer in with_terms:
            axes[2].plot(peer.epochs, peer.train_ce, color=line.get_color(), label=f"{peer.label} CE", **style)
            axes[2].plot(peer.epochs, peer.train_kd, "--", color=line.get_color(), label=f"{peer.label} KD", **style)
    if len(run.students) > 1 and run.ensemble:
        epochs = sorted(run.ensemble)
        acc_ax.plot(epochs, [run.ensemble[e] for e in epochs], ":", color="black", label="ensemble", **style)
    if baseline:
        label = f"baseline: {group_name(baseline)}" + (" (peer average)" if baseline[0].num_peers > 1 else "")
        for ax, key in ((acc_ax, "test_acc"), (loss_ax, "train_loss")):
            _plot_baseline(ax, group_curve(baseline, key), label)
    _decorate(acc_ax, "Test accuracy", "test accuracy (%)")
    _decorate(loss_ax, "Train loss", "train loss")
    if with_terms:
        _decorate(axes[2], "Train loss terms: cross-entropy (solid) and distillation (dashed)", "term of the loss")
    fig.suptitle(
        f"{run.name}: {models_text(run.config['models'])} on {run.config.get('dataset', 'cifar100')}, "
        f"epochs {epochs_text(run)}"
    )
    return fig


# Past this many runs the bands of one shared axes hide each other (five 3-seed groups already cross
# at every epoch): each run gets a panel of its own, against the baseline, on shared axes.
MOST_GROUPS_ON_ONE_AXES = 4
PANEL_COLUMNS = 3


def plot_comparison(groups: list[list[Run]], path: Path, baseline: list[Run] | None = None) -> Path:
    """Average test accuracy of the peers against epoch, one line per run (seed groups averaged
    over their seeds, their spread a band), ordered by node count; the baseline dashed. More than
    MOST_GROUPS_ON_ONE_AXES runs: a panel each."""
    comparison_figure(groups, baseline).savefig(path, dpi=110)
    return Path(path)


# a run's colour in its panel: matplotlib's cycle less its grey (C7), which is the baseline's
RUN_COLOURS = tuple(f"C{i}" for i in range(10) if i != 7)
BASELINE_COLOUR = "gray"


def comparison_figure(groups: list[list[Run]], baseline: list[Run] | None = None):
    """The figure of :func:`plot_comparison`."""
    ordered = sorted(groups, key=lambda g: (g[0].num_peers, group_name(g)))
    base_curve = group_curve(baseline, "test_acc") if baseline else None
    base_label = f"baseline: {group_name(baseline)}" if baseline else ""
    if len(ordered) <= MOST_GROUPS_ON_ONE_AXES:
        fig, (ax,) = _figure(8, 5)
        for group in ordered:
            _plot_group(ax, group, f"{peers_text(group[0], long=True)}: {group_name(group)}")
        if base_curve:
            _plot_baseline(ax, base_curve, base_label)
        _decorate(ax, "Average test accuracy of the peers by number of nodes", "average test accuracy (%)")
        return fig
    rows = -(-len(ordered) // PANEL_COLUMNS)
    fig, axes = _figure(4.2 * PANEL_COLUMNS, 3.2 * rows, PANEL_COLUMNS, rows, sharex=True, sharey=True)
    for index, (ax, group) in enumerate(zip(axes, ordered)):
        _plot_group(ax, group, "peers' average", color=RUN_COLOURS[index % len(RUN_COLOURS)])
        if base_curve:
            _plot_baseline(ax, base_curve, base_label)
        ylabel = "average test accuracy (%)" if index % PANEL_COLUMNS == 0 else ""
        _decorate(ax, f"{group_name(group)} ({peers_text(group[0], long=True)})", ylabel)
        lowest_in_column = index + PANEL_COLUMNS >= len(ordered)
        ax.xaxis.set_tick_params(labelbottom=lowest_in_column)  # sharex labels only the grid's last row
        ax.set_xlabel("epoch" if lowest_in_column else "")
    for ax in axes[len(ordered) :]:
        ax.set_visible(False)  # the grid's last row, where runs do not fill it
    fig.suptitle("Average test accuracy of the peers, each run against the baseline")
    return fig


def _plot_group(ax, group: list[Run], label: str, **style) -> None:
    """A run's peers' average test accuracy; a seed group's mean with a band of ± one std."""
    epochs, mean, std = group_band(group, "test_acc")
    seeds = f" (mean ± std of {len(group)} seeds)" if len(group) > 1 else ""
    (line,) = ax.plot(epochs, mean, label=label + seeds, **style, **_line_style(len(epochs)))
    if len(group) > 1:  # the seeds' spread as a band around their mean
        ax.fill_between(
            epochs,
            [m - d for m, d in zip(mean, std)],
            [m + d for m, d in zip(mean, std)],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )


def plot_gains(groups: list[list[Run]], baseline: list[Run], path: Path) -> Path:
    """Each run's gain over the baseline at the last epoch: the peers' average, the temporal means' and the
    learned teachers' where a run has them, and the ensemble."""
    gains_figure(groups, baseline).savefig(path, dpi=110)
    return Path(path)


# the outputs a gains figure compares, top to bottom within a row: what a run's record calls them, and colour
GAIN_BARS = (
    ("peers' average", "students", "tab:blue"),
    ("temporal means", "means", "tab:green"),
    ("learned teachers", "learned_teachers", "tab:purple"),
)


def gains_figure(groups: list[list[Run]], baseline: list[Run]):
    """The figure of :func:`plot_gains`: per run or seed group, a bar at the mean gain of each of its outputs
    (the peers' average, the temporal means', the learned teachers', the ensemble's) with a ± std whisker
    and a dot per seed, paired by seed as in the tables. The means and teachers are often what a method
    deploys (PCL's mean, ONE's gate), so their gain is the one a user weighs."""
    reference = Baseline.of(baseline)
    shown = [_gain_bars(group, reference) for group in reversed(groups)]  # bottom up: the first group on top
    fig, (ax,) = _figure(8, 1.6 + 0.25 * sum(len(bars) for bars in shown) + 0.15 * len(groups))
    for row, bars in enumerate(shown):
        height = 0.8 / len(bars)
        for k, (label, gain, color) in enumerate(bars):
            y = row + height * ((len(bars) - 1) / 2 - k)
            ax.barh(y, gain.mean, height=0.9 * height, color=color, alpha=0.6, label=label)
            if len(gain.values) > 1:
                ax.errorbar(gain.mean, y, xerr=gain.std, color="black", capsize=3, linewidth=1)
            ax.plot(gain.values, [y] * len(gain.values), "o", color="black", markersize=3)
    ax.axvline(0.0, color="gray", linewidth=1)
    ax.set_yticks(range(len(groups)), [group_name(group) for group in reversed(groups)])
    ax.set_xlabel(f"gain over {reference.name} (pp): bar the mean, whisker ± std, dot a seed")
    ax.set_title("Final test accuracy minus the baseline's, paired by seed")
    ax.grid(True, axis="x", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per kind of bar
    ax.legend(list(unique.values()), list(unique.keys()), fontsize="small")
    return fig


def _gain_bars(group: list[Run], reference: Baseline) -> list[tuple[str, Stat, str]]:
    """A group's bars: (label, gain, colour) for each kind of output its runs have."""
    bars = []
    for label, outputs, color in GAIN_BARS:
        if getattr(group[0], outputs):
            finals = [final_accuracy(run, outputs) for run in group]
            bars.append((label, reference.gain(group, finals), color))
    ensembles = [run.ensemble.get(run.epochs_done) for run in group]
    if None not in ensembles and len(group[0].students) > 1:
        bars.append(("ensemble", reference.gain(group, cast("list[float]", ensembles)), "tab:orange"))
    return bars


def _plot_baseline(ax, curve: tuple[list[int], list[float]], label: str) -> None:
    """The baseline dashed, with markers where its curve is short: a dashed line through one point
    draws nothing, and the legend would name a line that is not there."""
    epochs, values = curve
    if epochs:  # no epoch in common between the baseline's seeds: nothing to draw, nothing to name
        ax.plot(epochs, values, "--", color=BASELINE_COLOUR, label=label, **_line_style(len(epochs)))


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
