"""``dml report`` itself: read the runs, draw the plots, write report.md."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError
from .document import build_markdown
from .plots import plot_comparison, plot_gains, plot_run
from .runs import Run, find_runs, read_run
from .stats import group_name, seed_groups, without, without_seed


def _file_stem(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"
    unique, n = stem, 2
    while unique in taken:
        unique, n = f"{stem}-{n}", n + 1
    taken.add(unique)
    return unique


def _baseline_runs(baseline, runs: list[Run]) -> list[Run]:
    """The runs ``baseline`` names: run directories or folders of them, or else the name of a run or seed group
    among ``runs`` as the summary names it (``independent_resnet20`` for the seeds of a plan's row)."""
    paths = baseline if isinstance(baseline, list) else [baseline]
    if len(paths) == 1 and not Path(paths[0]).exists():
        named = [run for run in runs if str(paths[0]) in (run.name, without_seed(run.name))]
        if not named:
            names = sorted({group_name(group) for group in seed_groups(runs)})
            raise UserError(
                f"--baseline {paths[0]} is neither a run directory nor the name of a run among the runs read "
                f"({', '.join(names)})"
            )
        return named
    return [read_run(p) for p in find_runs(paths)]


def report(
    run_paths,
    baseline: str | os.PathLike | list | None = None,
    out: str | os.PathLike | None = None,
    plots: str | os.PathLike | None = None,
    published: dict | None = None,
) -> str:
    """Read the runs, draw the plots (when ``plots`` names a folder) and return the Markdown;
    with ``out`` it is also written there, with image links relative to it. ``published``: a plan's
    [published] table (row label -> accuracy, and its "source"), printed beside the measured numbers."""
    runs = [read_run(p) for p in find_runs(run_paths)]
    baseline_runs = None
    if baseline is not None:
        baseline_runs = _baseline_runs(baseline, runs)
        if len(seed_groups(baseline_runs)) > 1:
            raise UserError(
                f"--baseline {baseline} holds runs with different settings; name one run, "
                "or a folder whose runs differ only in seed"
            )
    images: dict[str, str] = {}
    figures: dict[str, str] = {}
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
        shown = without(runs, baseline_runs or [])
        for run in baseline_runs or []:
            target = folder / f"{_file_stem(run.name, taken)}.png"
            images[str(run.path)] = link(plot_run(run, target))
        for run in shown:
            target = folder / f"{_file_stem(run.name, taken)}.png"
            images[str(run.path)] = link(plot_run(run, target, baseline_runs))
        comparison_path = folder / f"{_file_stem('comparison', taken)}.png"
        plot_comparison(seed_groups(shown), comparison_path, baseline_runs)
        figures = {"comparison": link(comparison_path)}
        if baseline_runs and shown:
            gains_path = folder / f"{_file_stem('gains', taken)}.png"
            figures["gains"] = link(plot_gains(seed_groups(shown), baseline_runs, gains_path))
    markdown = build_markdown(runs, baseline_runs, images, figures, published)
    if out is not None:
        try:
            Path(out).write_text(markdown)
        except OSError as exc:
            raise UserError(f"cannot write the report to {out} ({exc})") from None
    return markdown
