"""A run's state on disk: refusing to overwrite or mis-resume a run, the resume point, the RNG state,
and each epoch's checkpoints (best.pt where a peer improved on validation accuracy, or on test
accuracy without a validation split; last.pt committed in two phases so that a crash between peers
or processes never leaves a cohort that cannot resume)."""

from __future__ import annotations

import os

import torch

from .cohort import Cohort
from .config import TrainConfig
from .errors import RunStopped, UserError
from .peer import RESUME_ADVICE, load_checkpoint
from .runlog import CONFIG_FILE, LAST_NEXT, RunDir


def check_run_dir(cfg: TrainConfig, resume: bool, run: RunDir) -> None:
    """Refuse to overwrite a run, to resume nothing, or to resume with another configuration. A folder
    holding only the start of a run that never completed an epoch is no run: it is started over."""
    _check_not_a_file(run)
    if resume:
        if not (run.path / CONFIG_FILE).exists():
            raise UserError(f"nothing to resume in {run.path}: it holds no run (no {CONFIG_FILE}); "
                            "run without --resume")
        differences = cfg.differences(run.read_config())
        if differences:
            raise UserError(
                f"--resume with a configuration that differs from the run in {run.path} "
                f"({'; '.join(differences)}); repeat the original command with --resume"
            )
    elif ((run.path / CONFIG_FILE).exists() or run.has_checkpoints()) and not run.holds_no_epoch():
        # A run stopped before its first epoch was complete holds nothing to lose: it starts over
        # (with this configuration, which may differ: "lower --lr and start again").
        raise UserError(
            f"{run.path} already holds a run; pass --resume to continue it, or --name for a new run"
        )


def what_is_saved(run: RunDir) -> str:
    """What a run that stopped somewhere unknown holds, and how to go on (the end of an error line)."""
    try:
        epoch = run.resume_point({i: set(run.checkpoint_epochs(i)) for i in run.peer_names})
    except UserError:  # a damaged checkpoint: --resume says which
        return "the last complete epoch is saved: continue with the same command and --resume"
    if epoch:
        return f"epoch {epoch} is saved: continue with the same command and --resume"
    if not (run.path / CONFIG_FILE).exists() or run.holds_no_epoch():
        return "nothing was saved; run the same command again"
    return "no epoch was saved; run the same command with --resume to start over"  # epoch 1 logged, not saved


def _check_not_a_file(run: RunDir) -> None:
    """A file where the run directory or its --out-dir should be: said before anything is loaded
    (writing would fail later with advice meant for a full disk)."""
    out_dir = run.path.parent
    existing = next((p for p in (run.path, *run.path.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return
    if existing == run.path:
        raise UserError(f"{run.path} is a file, not a run directory; pass another --name or --out-dir "
                        "(nothing was written)")
    where = "" if existing == out_dir else f" cannot be created: {existing}"
    raise UserError(f"--out-dir {out_dir}{where} is a file, not a directory; pass a folder as --out-dir "
                    "(nothing was written)")


def restore(run: RunDir, cohort: Cohort) -> dict | None:
    """Load every local peer at the newest epoch the whole cohort reached; return the run state,
    or None where the cohort never completed an epoch (its staged first epoch is discarded)."""
    peers, exchange, device = cohort.trainable, cohort.exchange, cohort.device
    local_epochs = {p.index: run.checkpoint_epochs(p.index) for p in peers}
    shared = {}
    for part in exchange.gather_objects({i: set(e) for i, e in local_epochs.items()}):
        shared.update(part)
    epoch = run.resume_point(shared)
    if epoch == 0:
        for p in peers:
            (run.peer_path(p.index) / LAST_NEXT).unlink(missing_ok=True)
        return None
    run_state = {}
    for p in peers:
        path = local_epochs[p.index][epoch]
        state = load_checkpoint(path, map_location=device, advice=RESUME_ADVICE)
        if state.get("model_name") != p.model_name:
            raise UserError(f"checkpoint {path} holds a {state.get('model_name')!r}, but peer {p.index} is a "
                            f"{p.model_name!r}; resume with the run's own --models")
        try:
            p.load_state_dict(state)
            run_state = state["run"]
            _check_rng_state(run_state, device)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"checkpoint {path} does not fit peer {p.label} ({type(exc).__name__}): it is damaged "
                            "or from another configuration; start a new run with another --name") from None
        staged = run.peer_path(p.index) / LAST_NEXT
        if path == staged:
            run.publish_last(p.index)  # finish the commit a crash interrupted
        else:
            staged.unlink(missing_ok=True)  # staged past what every peer reached: discard
    return run_state


def _rng_state(generator: torch.Generator) -> dict:
    state = {"data_generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _check_rng_state(state: dict, device: torch.device) -> None:
    """Setting a state of the wrong size fails; try it on throw-away generators first."""
    for key, generator in (("data_generator", torch.Generator(device=device)), ("torch_rng", torch.Generator())):
        if not isinstance(state.get(key), torch.Tensor) or state[key].dtype != torch.uint8:
            raise ValueError(f"no {key} state")
        generator.set_state(state[key].cpu())


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["data_generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


def save_epoch(run: RunDir, epoch: int, cohort: Cohort, records: list[dict], generator: torch.Generator,
               cfg: TrainConfig, num_classes: int) -> None:
    """best.pt where a peer improved, then every peer's last.pt committed in two phases."""
    peers = cohort.trainable  # teachers are never saved
    for p in peers:
        if not all(torch.isfinite(t).all() for t in p.model.state_dict().values() if t.is_floating_point()):
            raise RunStopped(f"peer {p.label} diverged: its parameters are not finite after epoch {epoch}; "
                             "the checkpoint of the last complete epoch is kept; lower --lr and start again")
    # threads: the count the next epoch computes with (it orders floating-point sums): a resumed run
    # continues with it, exactly as the run would have
    run_state = {"epoch": epoch, "threads": cohort.runtime.threads, **_rng_state(generator)}
    by_peer = {r["node"]: r for r in records}
    # working_dir: the run's relative paths (its --data-dir) are relative to it; dml evaluate resolves them
    meta = {"config": cfg.to_dict(), "num_classes": num_classes, "dataset": cfg.dataset, "working_dir": os.getcwd()}
    for p in peers:
        record = by_peer[p.index]
        # Chosen on validation accuracy where the run holds a validation split: choosing on the test
        # set would make the test accuracy of best.pt an optimistic estimate.
        selected_on = "val_acc" if "val_acc" in record else "test_acc"
        if record[selected_on] > p.best_acc:
            p.best_acc, p.best_epoch = record[selected_on], epoch
            run.save_best(p.index, {"model": p.model.state_dict(), "model_name": p.model_name, "index": p.index,
                                    "epoch": epoch, "selected_on": selected_on,
                                    **{k: record[k] for k in ("val_acc", "test_acc") if k in record}, **meta})
    for p in peers:
        run.stage_last(p.index, {**p.state_dict(), "run": run_state, **meta})
    cohort.exchange.barrier()
    for p in peers:
        run.publish_last(p.index)
