"""``dml tune``: search the ranges of a plan's ``[search]`` table with optuna, on the validation split.

Each trial is one ``dml train`` run (``<out-dir>/trial007``) of the plan's settings with the trial's
values. Its objective is the highest validation accuracy over its epochs (the peers' mean, the epoch
best.pt would hold); after every epoch the value so far goes to optuna's pruner, which may stop the
trial. The study lives in ``<out-dir>/study.db`` (SQLite): a search killed at any moment resumes with
the same command, its interrupted trial continuing from its last complete epoch. The search ends with
``<out-dir>/tune.md``: every trial and the best settings as a ready ``dml train`` command.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from .config import TrainConfig, field_default
from .errors import RunStopped, UserError
from .markdown import table
from .orchestrate import (
    LOGS,
    POLL_SECONDS,
    claim_out_dir,
    epochs_saved,
    is_finished,
    last_line,
    signals_to,
    start_run,
    stopped_by,
    train_command,
)
from .plan import SETTINGS, Plan, PlannedRun, read_plan, setting_kind, setting_value
from .runlog import RunDir, trained_peers

STUDY = "study.db"
STUDY_NAME = "dml-tune"


def _optuna():
    try:
        import optuna
    except ImportError:
        # the package is not on PyPI: name what installs it from here
        raise UserError(
            "dml tune needs optuna: pip install optuna (or, in the project's checkout, pip install -e '.[tune]')"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search prints its own lines
    return optuna


def base_run(plan: Plan) -> PlannedRun:
    """The one configuration a search varies; it must hold out a validation split."""
    if len(plan.runs) != 1:
        raise UserError(
            f"plan {plan.path}: dml tune searches around one configuration, but the plan has "
            f"{len(plan.runs)} runs; leave out [grid] and all but one [[run]]"
        )
    if not plan.search:
        raise UserError(
            f"plan {plan.path} has no [search] table: give the ranges to search, e.g. "
            "lr = { low = 0.01, high = 0.2, log = true }"
        )
    for key in plan.overrides.keys() & plan.search.keys():
        raise UserError(f"--set {key}: the plan's [search] varies {key}; drop it from --set or from [search]")
    run = plan.runs[0]
    if not run.settings.get("val_samples"):
        raise UserError(
            f"plan {plan.path}: dml tune chooses on validation accuracy, never on the test set; set "
            "val_samples in [defaults] (e.g. 5000)"
        )
    return run


def suggest(trial, search: dict) -> dict:
    """The trial's values for the [search] settings (whole numbers where the setting is an integer)."""
    params = {}
    for key, spec in search.items():
        if "choices" in spec:
            params[key] = setting_value(key, trial.suggest_categorical(key, spec["choices"]))
        elif setting_kind(key) is int:
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    return params


def validation_curve(run_dir: Path) -> dict[int, float]:
    """Epoch -> the mean validation accuracy of the run's training peers, for its complete epochs in
    metrics.jsonl (none before its config.json is written)."""
    try:
        run = RunDir.open(run_dir)
    except UserError:
        return {}  # not started yet
    peers = trained_peers(run.read_config())  # not the teachers, not the temporal means
    return {
        epoch: sum(entry[i].data["val_acc"] for i in peers) / len(peers)
        for epoch, entry in run.completed_epochs().items()
    }


class Search:
    def __init__(self, plan: Plan, out_dir: Path, trials: int, lock_fd: int, progress: bool):
        optuna = _optuna()
        self.optuna, self.plan, self.out_dir, self.trials, self.lock_fd = optuna, plan, out_dir, trials, lock_fd
        self.base = base_run(plan)
        self.study = optuna.create_study(
            storage=f"sqlite:///{out_dir / STUDY}",
            study_name=STUDY_NAME,
            direction="maximize",
            load_if_exists=True,
            # judged from epoch 2 on: a first epoch says little, least of all in DML's slow start
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
        )
        # The sampler's random state is not stored with the study: seeding it with the plan's seed plus
        # the trials so far keeps a resumed search reproducible without repeating its first trials' values.
        seed = self.base.settings.get("seed", field_default(SETTINGS["seed"]))
        self.study.sampler = optuna.samplers.TPESampler(seed=seed + len(self.study.trials))
        self.bar = tqdm(
            total=trials,
            initial=min(self.finished(), trials),
            unit="trial",
            desc="tune",
            disable=None if progress else True,
            dynamic_ncols=True,
            leave=False,
        )
        self.stop_signal: int | None = None
        self.child: subprocess.Popen | None = None

    def finished(self) -> int:
        states = self.optuna.trial.TrialState
        return sum(t.state in (states.COMPLETE, states.PRUNED, states.FAIL) for t in self.study.trials)

    def log(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()  # a log file reads each line as it happens

    def run(self) -> None:
        with signals_to(self._handle):
            try:
                running = self.optuna.trial.TrialState.RUNNING
                # trials a killed search left running continue first, from their last complete epoch
                # (optuna offers no public handle on a trial that a killed process left running: Trial by its id)
                for frozen in [t for t in self.study.trials if t.state == running]:
                    if self.stop_signal is None:
                        self.run_trial(self.optuna.trial.Trial(self.study, frozen._trial_id))
                while self.finished() < self.trials and self.stop_signal is None:
                    self.run_trial(self.study.ask())
            except KeyboardInterrupt:  # a second signal
                raise RunStopped(
                    "interrupted; the study is saved: run the same command again to continue", exit_code=130
                ) from None
            finally:
                self.bar.close()
        if self.stop_signal is not None:
            raise stopped_by(self.stop_signal, "the study and the trial's last complete epoch are saved")

    def trial_run(self, trial) -> PlannedRun:
        settings = {**self.base.settings, **suggest(trial, self.plan.search)}
        return replace(self.base, name=f"trial{trial.number:03d}", settings=settings)

    def run_trial(self, trial) -> None:
        states = self.optuna.trial.TrialState
        run = self.trial_run(trial)
        folder = self.out_dir / run.name
        try:
            TrainConfig(**run.settings, name=run.name)  # settings dml train would refuse: the trial fails here
        except UserError as exc:
            self.study.tell(trial, state=states.FAIL)
            self.log(f"trial {trial.number} failed: {exc}")
            return
        self.child = start_run(run, self.out_dir, epochs_saved(folder) is not None, self.lock_fd)
        if self.stop_signal is not None:  # a signal that came while it started
            self.child.send_signal(signal.SIGTERM)
        reported = set(next(t for t in self.study.trials if t.number == trial.number).intermediate_values)

        def report(curve: dict[int, float]) -> None:
            for epoch, value in curve.items():
                if epoch not in reported:
                    trial.report(value, epoch)
                    reported.add(epoch)

        pruned = False
        while self.child.poll() is None:
            time.sleep(POLL_SECONDS)
            curve = validation_curve(folder)
            report(curve)
            if curve:
                best = f", best {self.study.best_value:.2f}%" if self._any_complete() else ""
                self.bar.set_postfix_str(
                    f"trial {trial.number} epoch {max(curve)}/{run.epochs}, val {curve[max(curve)]:.2f}%{best}"
                )
            # after its last epoch a trial has nothing left to save by stopping it: it completes
            if not pruned and self.stop_signal is None and curve and max(curve) < run.epochs and trial.should_prune():
                pruned = True
                self.child.send_signal(signal.SIGTERM)
        code, self.child = self.child.returncode, None
        curve = validation_curve(folder)
        finished = is_finished(run, epochs_saved(folder))
        if self.stop_signal is not None and not pruned:
            return  # the trial stays running in the study and continues next time
        if finished and (code == 0 or pruned):  # a stop that came after its last epoch: it completed all the same
            report(curve)
            self.study.tell(trial, max(curve.values()))
            self.log(
                f"trial {trial.number}: best val {max(curve.values()):.2f}% "
                f"(best trial so far: {self.study.best_trial.number}, {self.study.best_value:.2f}%)"
            )
        elif pruned:
            self.study.tell(trial, state=states.PRUNED)
            self.log(
                f"trial {trial.number} pruned after epoch {max(curve)} of {run.epochs}: val {curve[max(curve)]:.2f}%"
            )
        else:
            self.study.tell(trial, state=states.FAIL)
            self.log(
                f"trial {trial.number} failed (exit status {code}: "
                f"{last_line(self.out_dir / LOGS / f'{run.name}.log')})"
            )
        self.bar.update()

    def _any_complete(self) -> bool:
        return any(t.state == self.optuna.trial.TrialState.COMPLETE for t in self.study.trials)

    def _handle(self, signum, frame) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.child is not None:
            self.child.send_signal(signal.SIGTERM)

    def summary(self) -> str:
        """Markdown: every trial, and the best settings as a dml train command."""
        keys = list(self.plan.search)
        header = ["Trial", "State", *keys, "Epochs", "Best Val Accuracy (%)"]
        lines = [
            f"# Search: {self.plan.path}",
            "",
            f"{len(self.study.trials)} trials in `{self.out_dir / STUDY}`, chosen on validation accuracy "
            f"({self.base.settings['val_samples']} held-out training images), never on the test set.",
            "",
        ]
        rows = []
        for t in self.study.trials:
            curve = t.intermediate_values
            value = f"{t.value:.2f}" if t.value is not None else (f"{max(curve.values()):.2f}" if curve else "–")
            cells = [
                str(t.number),
                t.state.name.lower(),
                *(_short(t.params.get(k, "–")) for k in keys),
                str(max(curve) if curve else 0),
                value,
            ]
            rows.append(cells)
        lines.append(table(header, rows))
        if self._any_complete():
            best = self.study.best_trial
            best_settings = {k: setting_value(k, v) for k, v in best.params.items()}
            command = train_command(
                replace(self.base, settings={**self.base.settings, **best_settings}), Path("runs"), resume=False
            )
            command[command.index("--name") + 1] = "tuned"
            command.remove("--no-progress")  # trials run without bars; a command for a person keeps them
            lines += [
                "",
                f"Best: trial {best.number}, validation accuracy {best.value:.2f}% "
                f"({', '.join(f'{k} = {_short(v)}' for k, v in best.params.items())}). Its settings:",
                "",
                "```bash",
                shlex.join(command),
                "```",
            ]
        return "\n".join(lines) + "\n"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def tune(
    plan_path: str, trials: int, out_dir: str | None = None, progress: bool = True, overrides: dict | None = None
) -> int:
    """Run the search until the study holds ``trials`` finished trials, with the settings ``overrides``
    (``--set``) in place of the plan's; returns the exit status."""
    if trials < 1:
        raise UserError(f"--trials must be a positive integer, got {trials}")
    _optuna()
    folder = Path(out_dir if out_dir is not None else Path("runs") / f"{Path(plan_path).stem}-tune").resolve()
    plan = read_plan(plan_path, folder, overrides)
    base_run(plan)
    lock_fd = claim_out_dir(plan, folder)
    try:
        search = Search(plan, folder, trials, lock_fd, progress)
        search.log(f"{plan.path}: {search.finished()} of {trials} trials done in {folder}")  # above the bar
        search.run()
        summary = search.summary()
        (folder / "tune.md").write_text(summary)
        print(summary, end="")
    finally:
        os.close(lock_fd)
    return 0
