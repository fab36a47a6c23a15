"""``dml report``: Markdown tables and learning-curve plots from run directories.

A run directory is read through its ``config.json`` and ``metrics.jsonl`` only, so finished,
interrupted and still-running runs can all be reported. The tables follow the hand-written ones
of the seed's CIFAR-100 README (Model ID, Train Accuracy, Test Accuracy, Train Loss, Improvement
vs Baseline, an Average row) and add the best-epoch test accuracy and the cohort's ensemble.

Runs whose configurations differ only in the seed form one group, reported as mean ± sample
standard deviation over the n seeds.

runs.py reads run directories, stats.py groups them and computes over seeds, document.py writes the
Markdown, plots.py draws the figures, command.py is ``dml report`` itself.
"""

from .command import report
from .document import build_markdown, group_section, results_table, summary_table
from .plots import comparison_figure, gains_figure, plot_comparison, plot_gains, plot_run, run_figure
from .runs import PeerHistory, Run, find_runs, read_run
from .stats import Stat, baseline_accuracy, group_name, seed_groups

__all__ = [
    "PeerHistory",
    "Run",
    "Stat",
    "baseline_accuracy",
    "build_markdown",
    "comparison_figure",
    "find_runs",
    "gains_figure",
    "group_name",
    "group_section",
    "plot_comparison",
    "plot_gains",
    "plot_run",
    "read_run",
    "report",
    "results_table",
    "run_figure",
    "seed_groups",
    "summary_table",
]
