"""Experiment plans: a TOML file of ``dml train`` runs, read into named runs with their settings.

A plan::

    baseline = "independent"          # optional: the runs dml experiment's report compares with

    [defaults]                        # dml train settings, named as in config.json
    epochs = 200
    data_dir = "./data"

    [grid]                            # lists: every combination is one run
    seed = [0, 1, 2]

    [[run]]                           # optional rows, each crossed with the grid
    label = "independent"
    models = ["resnet32"]

    [[run]]
    label = "kd"
    teacher = "{run:teacher}/0_wrn28_2/best.pt"   # placeholders: {run:LABEL}, {out_dir}, {seed}...

    [published]                       # optional: a row's published accuracy (%), printed beside it
    source = "PCL (Wu & Gong, AAAI 2021), Table 2"
    kd = 73.1

    [search]                          # dml tune: ranges to search
    lr = { low = 0.01, high = 0.2, log = true }
    temperature = { choices = [1.0, 2.0, 4.0] }

Overrides (``dml experiment --set KEY=VALUE``) replace a setting in every run: in [defaults], every
[[run]] row and [grid] (one value then).

A run's name is its row's label (or the row settings that differ between rows) followed by the grid
settings that vary, e.g. ``kd_s1`` or ``lr0.05_s0``. Paths are relative to the working directory, as
on the command line.
"""

from __future__ import annotations

import itertools
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from .config import TrainConfig, field_default, joined_models
from .errors import UserError
from .models import folder_name
from .tomlfile import read_toml, toml_value

PLAN_KEYS = {"defaults", "grid", "run", "search", "baseline", "published"}
# Settings a plan does not give: the plan names its runs and places them in its output directory.
DECIDED_BY_PLAN = {"name", "out_dir", "graph_spec"}
SETTINGS = {f.name: f for f in fields(TrainConfig) if f.name not in DECIDED_BY_PLAN}
# Settings whose change between two versions of a plan does not change what its runs compute (the
# output directory continues). Unlike --resume, a run's teacher or graph path counts: it names what the
# run learns from (dml train then compares their contents).
PLAN_MAY_CHANGE = frozenset(
    {
        "device",
        "data_dir",
        "out_dir",
        "name",
        "download",
        "download_url",
        "skip_checksum",
        "progress",
        "check_batches",
        "teacher_model",
        "threads",
        "workers",
    }
)
LABEL = re.compile(r"[A-Za-z0-9._+-]+")
PLACEHOLDER = re.compile(r"\{((?:run:)?[A-Za-z0-9._+-]+)\}")
# Names a run folder cannot take: the output directory's own files.
RESERVED = {".", "..", "logs", "plots", "report.md", "plan.json", "plan.toml", ".lock", "study.db", "tune.md"}


@dataclass
class PlannedRun:
    name: str
    label: str | None  # its row's label
    settings: dict  # TrainConfig field -> value, placeholders filled in
    after: list[str] = field(default_factory=list)  # planned runs whose checkpoints it reads (teachers)
    peers: int = 1  # the peers it trains (teachers are not trained)

    @property
    def epochs(self) -> int:
        return self.settings.get("epochs", field_default(SETTINGS["epochs"]))


@dataclass
class Plan:
    path: Path
    runs: list[PlannedRun]
    baseline: str | None  # a row label
    search: dict  # setting -> {"low", "high", "log"} or {"choices"}
    overrides: dict = field(default_factory=dict)  # --set: setting -> value, in every run
    published: dict = field(default_factory=dict)  # [published]: row label -> accuracy (%), and its "source"

    def baseline_runs(self) -> list[PlannedRun]:
        return [run for run in self.runs if run.label == self.baseline]


def read_plan(path: str | Path, out_dir: Path, overrides: dict | None = None) -> Plan:
    """The runs of the plan file ``path`` placed in ``out_dir``, with the settings ``overrides`` (``--set``)
    in every run in place of the plan's; one UserError line per mistake."""
    path = Path(path)
    data = read_toml(path, "plan")
    where = f"plan {path}"
    unknown = set(data) - PLAN_KEYS
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a plan has [defaults], [grid], "
            "[[run]], [search], [published] and baseline"
        )
    defaults = _settings(_table(data, "defaults", where), f"{where} [defaults]")
    grid = _table(data, "grid", where)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where} [grid]: {key} must be a non-empty list of values, got {values!r}")
        grid[key] = [_settings({key: v}, f"{where} [grid]")[key] for v in values]
    rows = data.get("run", [{}])
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{where}: run must be a non-empty array of tables ([[run]])")
    labels = [row.get("label") for row in rows]
    for k, label in enumerate(labels):
        if label is not None and (not isinstance(label, str) or not LABEL.fullmatch(label)):
            raise UserError(
                f"{where} [[run]] {k + 1}: label must be a name of letters, digits and . _ + -, got {label!r}"
            )
    rows = [
        _settings({k: v for k, v in row.items() if k != "label"}, f"{where} [[run]] {k + 1}")
        for k, row in enumerate(rows)
    ]
    overrides = _settings(overrides or {}, "--set")
    defaults.update(overrides)
    for key in overrides:
        grid.pop(key, None)
    rows = [{k: v for k, v in row.items() if k not in overrides} for row in rows]
    for key in set(grid) & (set(defaults) | {k for row in rows for k in row}):
        raise UserError(f"{where}: {key} is both in [grid] and in [defaults] or a [[run]]; give it in one place")

    def value(settings: dict, key: str):
        return settings.get(key, defaults.get(key, field_default(SETTINGS[key])))

    varying_row_keys = [
        k for k in dict.fromkeys(k for row in rows for k in row) if len({repr(value(row, k)) for row in rows}) > 1
    ]
    varying_grid_keys = [k for k, values in grid.items() if len(values) > 1]
    combinations = list(itertools.product(*grid.values()))
    planned = {}  # (row, combination number) -> (name, settings)
    for (k, row), (c, combination) in itertools.product(enumerate(rows), enumerate(combinations)):
        settings = {**defaults, **row, **dict(zip(grid, combination))}
        head = [labels[k]] if labels[k] is not None else [_part(key, value(settings, key)) for key in varying_row_keys]
        planned[k, c] = "_".join(head + [_part(key, settings[key]) for key in varying_grid_keys]) or path.stem, settings
    runs = []
    for (k, c), (name, settings) in planned.items():
        folders = {label: out_dir / planned[j, c][0] for j, label in enumerate(labels) if label is not None}
        runs.append(PlannedRun(name, labels[k], _fill(settings, out_dir, folders, where)))
    _check_names(runs, where)
    _find_dependencies(runs, out_dir, where)
    for run in runs:
        _check_settings(run, where)
    baseline = data.get("baseline")
    if baseline is not None and baseline not in labels:
        raise UserError(f"{where}: baseline {baseline!r} is not the label of a [[run]]")
    if baseline is not None and set(varying_grid_keys) - {"seed"}:
        raise UserError(
            f"{where}: a baseline compares with one configuration over seeds, but the grid also varies "
            f"{', '.join(k for k in varying_grid_keys if k != 'seed')}; drop baseline or make those rows"
        )
    search = _search(_table(data, "search", where), where)
    _check_search_ends(runs, search, where)
    return Plan(path, runs, baseline, search, overrides, _published(_table(data, "published", where), labels, where))


def _published(table: dict, labels: list, where: str) -> dict:
    """[published]: each key a row's label with its published accuracy (%), and an optional source text."""
    for key, value in table.items():
        if key == "source":
            if not isinstance(value, str):
                raise UserError(f"{where} [published]: source is a text naming where the numbers are published")
        elif key not in labels:
            raise UserError(f"{where} [published]: {key!r} is not the label of a [[run]]")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise UserError(f"{where} [published]: {key} = {value!r} is not an accuracy in percent")
    return dict(table)


def _table(data: dict, key: str, where: str) -> dict:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise UserError(f"{where}: {key} must be a table ([{key}])")
    return table


def _settings(table: dict, where: str) -> dict:
    """``table`` checked against TrainConfig's fields and types; a single name becomes a list where a
    list is expected (models = "resnet32")."""
    out = {}
    for key, value in table.items():
        if key not in SETTINGS:
            hint = " (the plan names its runs and places them in --out-dir)" if key in DECIDED_BY_PLAN else ""
            raise UserError(
                f"{where}: {key!r} is not a dml train setting{hint}; settings are named as in "
                f"config.json: {', '.join(SETTINGS)}"
            )
        kind = setting_kind(key)
        if kind is list and isinstance(value, str):
            value = [value]
        if kind is list and value == []:
            raise UserError(f"{where}: {key} must name at least one; leave it out instead")
        item = _list_item_kind(key) if kind is list else None
        ok = (
            (isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value))
            if item is not None  # kind is list
            else (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                if kind is float
                else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            )
        )
        if not ok:
            what = f"a list of {'integers' if item is int else 'strings'}" if kind is list else _kind_name(kind)
            raise UserError(f"{where}: {key} must be {what}, got {value!r}")
        out[key] = float(value) if kind is float else value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` arguments as settings: each value read as in a plan's TOML (``0.05``, ``true``,
    ``["a", "b"]``), or as text where it is not TOML or where the setting holds text (``data_dir=2024``).
    The settings are checked by ``read_plan``."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise UserError(
                f"--set takes KEY=VALUE with a dml train setting as named in config.json, e.g. "
                f"--set data_dir=/data/cifar; got {item!r}"
            )
        if key in out:
            raise UserError(f"--set {key} is given twice; give it once")
        value = toml_value(text)
        if key in SETTINGS and setting_kind(key) in (str, list) and not isinstance(value, (str, list)):
            value = text
        out[key] = value
    return out


def setting_kind(key: str) -> type:
    """The kind of value the setting ``key`` holds: int, float, bool, str or list (of strings or integers);
    optional settings (``X | None``) hold X."""
    hint = typing.get_type_hints(TrainConfig)[key]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(k for k in typing.get_args(hint) if k is not type(None))
    return typing.get_origin(hint) or hint


def _list_item_kind(key: str) -> type:
    """What a list setting holds: strings (models, teacher) or integers (lr_milestones)."""
    hint = typing.get_type_hints(TrainConfig)[key]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(k for k in typing.get_args(hint) if k is not type(None))
    return typing.get_args(hint)[0]


def setting_value(key: str, value):
    """``value`` as the setting ``key`` holds it (a single name becomes a list where a list is expected)."""
    return _settings({key: value}, f"setting {key}")[key]


def _kind_name(kind) -> str:
    return {list: "a list of strings", float: "a number", int: "an integer", bool: "true or false", str: "a string"}[
        kind
    ]


def _part(key: str, value) -> str:
    """A setting as part of a run name: s0, n2, resnet32-wrn28_2, lr0.05, no_nesterov."""
    if key == "seed":
        return f"s{value}"
    if key == "num_nodes":
        return f"n{value}"
    if key == "models":
        return joined_models(value)
    if isinstance(value, bool):
        return key if value else f"no_{key}"
    if key in ("teacher", "graph"):
        value = [value] if isinstance(value, str) else value or ["none"]
        return f"{key}-" + "-".join(folder_name(Path(v).stem) for v in value)
    if isinstance(value, float):
        return f"{key}{value:g}"
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"{key}{re.sub(r'[^A-Za-z0-9.+-]+', '-', text)}"


def _fill(settings: dict, out_dir: Path, folders: dict[str, Path], where: str) -> dict:
    """Placeholders in string settings: {out_dir}, {<setting>} (e.g. {seed}) and {run:<label>}, the
    folder of that row's run with the same grid values."""
    values = {
        "out_dir": str(out_dir),
        **{k: str(v) for k, v in settings.items() if not isinstance(v, list)},
        **{f"run:{label}": str(folder) for label, folder in folders.items()},
    }

    def fill(text: str) -> str:
        def replace(match):
            if match.group(1) not in values:
                raise UserError(
                    f"{where}: unknown placeholder {{{match.group(1)}}} in {text!r}; use {{out_dir}}, "
                    "{run:LABEL} or a setting of the run such as {seed}"
                )
            return values[match.group(1)]

        filled = PLACEHOLDER.sub(replace, text)
        if "{run:" in filled:
            raise UserError(f"{where}: {text!r} holds a {{run:...}} that is not a label of a [[run]]")
        return filled

    def fill_any(value):
        return fill(value) if isinstance(value, str) else value

    return {
        k: [fill_any(v) for v in value] if isinstance(value, list) else fill_any(value) for k, value in settings.items()
    }


def _check_names(runs: list[PlannedRun], where: str) -> None:
    seen: dict[str, PlannedRun] = {}
    for run in runs:
        if run.name in seen:
            raise UserError(f"{where}: two runs are both named {run.name!r}; give each [[run]] its own label")
        if "/" in run.name or run.name in RESERVED:
            raise UserError(f"{where}: {run.name!r} cannot name a run folder; choose another label")
        seen[run.name] = run


def _find_dependencies(runs: list[PlannedRun], out_dir: Path, where: str) -> None:
    """A run whose teacher checkpoint lies in another planned run's folder starts after that run."""
    folders = {(out_dir / run.name).resolve(): run.name for run in runs}
    for run in runs:
        for teacher in run.settings.get("teacher") or []:
            parents = Path(teacher).resolve().parents
            run.after += [name for folder, name in folders.items() if folder in parents and name != run.name]
    done: set[str] = set()
    remaining = list(runs)
    while remaining:  # a run that waits for itself, through others, would never start
        ready = [run for run in remaining if set(run.after) <= done]
        if not ready:
            raise UserError(f"{where}: runs {', '.join(r.name for r in remaining)} wait for each other's teachers")
        done.update(run.name for run in ready)
        remaining = [run for run in remaining if run not in ready]


def _check_settings(run: PlannedRun, where: str) -> None:
    """Build the run's TrainConfig so that a bad value fails now, not hours into the plan (teachers
    that earlier runs of the plan will train are left out: they do not exist yet); count its trained
    peers. Its graph file is read and its teacher checkpoints checked to exist, none opened: dml train
    loads and checks them."""
    settings = dict(run.settings)
    if run.after:
        settings.pop("teacher", None)
    if settings.get("data_parallel", 1) != 1:
        # a plan's runs are single dml train processes, each given its share of the cores or one GPU
        raise UserError(
            f"{where}, run {run.name}: data_parallel needs several processes per run, which plans do not "
            "start; run it with dml train --procs or torchrun"
        )
    try:
        run.peers = TrainConfig(**settings, name=run.name).count_trained_peers()
    except UserError as exc:
        raise UserError(f"{where}, run {run.name}: {exc}") from None


def _check_search_ends(runs: list[PlannedRun], search: dict, where: str) -> None:
    """Every choice and both ends of every range must make a valid run, so that a bad end (a ramp of
    0 epochs, say) fails now and not in the trial that draws it."""
    for run, (key, spec) in itertools.product(runs, search.items()):
        for value in spec.get("choices", [spec.get("low"), spec.get("high")]):
            value = _settings({key: value}, f"{where} [search]")[key]
            trial = PlannedRun(run.name, run.label, {**run.settings, key: value}, run.after)
            try:
                _check_settings(trial, where)
            except UserError as exc:
                raise UserError(f"{exc} ([search] {key} = {value!r})") from None


def differences(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """What changed between two plans (run name -> settings) in ways that change what runs compute. A run
    the new plan adds changes nothing that ran: a plan may grow (a method that joins a table later)."""
    out = [f"run {name} is not in the new plan" for name in old if name not in new]
    compared = set(SETTINGS) - PLAN_MAY_CHANGE
    for name in old.keys() & new.keys():
        before, after = ({k: v.get(k, field_default(SETTINGS[k])) for k in compared} for v in (old[name], new[name]))
        out += [f"run {name}: {k} {before[k]!r} -> {after[k]!r}" for k in sorted(compared) if before[k] != after[k]]
    return out


SEARCH_KINDS = ({"low", "high"}, {"low", "high", "log"}, {"choices"})


def _search(table: dict, where: str) -> dict:
    """[search]: setting = {low, high[, log]} (a number range) or {choices = [...]}."""
    for key, spec in table.items():
        if key not in SETTINGS:
            raise UserError(f"{where} [search]: {key!r} is not a dml train setting")
        if not isinstance(spec, dict) or set(spec) not in SEARCH_KINDS:
            raise UserError(
                f"{where} [search]: {key} must be {{ low = ..., high = ... [, log = true] }} or {{ choices = [...] }}"
            )
        if "choices" in spec:
            if (
                not isinstance(spec["choices"], list)
                or not spec["choices"]
                or any(isinstance(v, (list, dict)) for v in spec["choices"])
            ):
                raise UserError(f"{where} [search]: {key}.choices must be a non-empty list of single values")
            for value in spec["choices"]:
                _settings({key: value}, f"{where} [search]")
        else:
            if setting_kind(key) not in (int, float):
                raise UserError(f"{where} [search]: {key} is not a number; give it as {{ choices = [...] }}")
            _settings({key: spec["low"]}, f"{where} [search]")
            _settings({key: spec["high"]}, f"{where} [search]")
            if not isinstance(spec.get("log", False), bool):
                raise UserError(f"{where} [search]: {key}.log must be true or false")
            if not spec["low"] < spec["high"] or (spec.get("log") and spec["low"] <= 0):
                raise UserError(f"{where} [search]: {key} needs low < high (and low > 0 with log = true)")
    return table
