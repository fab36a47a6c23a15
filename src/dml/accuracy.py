"""Top-1 and top-5 accuracy of peers and of their ensemble: the one evaluation path.

``evaluate_models`` is what training logs every epoch, what ``Cohort.evaluate`` returns and what
``dml evaluate`` (evaluate.py) prints for checkpoints, computed the same way: on a runtime (precision,
BatchNorm folding), over the processes of an exchange. The ensemble averages the softmax outputs of
the peers it holds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .distributed import LocalExchange
from .runtime import Runtime

TOP_K = (1, 5)


@dataclass
class Evaluation:
    """Accuracies in percent: ``top1[k]`` / ``top5[k]`` of local peer k, and of the ensemble of all peers."""

    top1: list[float]
    top5: list[float]
    ensemble_top1: float
    ensemble_top5: float
    samples: int


def _correct_top_k(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many labels are the highest score (argmax: the first of tied scores, as training counts),
    and how many are among the 5 highest."""
    top1 = (scores.argmax(1) == labels).sum()
    top5 = (scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]).any(1).sum()
    return torch.stack([top1, top5])


def _predict(model: torch.nn.Module, x: torch.Tensor, precision) -> torch.Tensor:
    with torch.inference_mode(), precision.autocast():  # both are per thread: entered where the model runs
        return model(x)


def evaluate_models(
    models: list[torch.nn.Module],
    batches: Iterable,
    runtime: Runtime,
    exchange=None,
    ensemble_excludes: Iterable[int] = (),
    local_rows: bool = False,
) -> Evaluation:
    """Accuracy of every model on ``batches`` of (inputs, labels), and of the ensemble (mean softmax). Each
    replica of a peer computes its rows of every batch (``local_rows``: the batches hold only those).

    The models run in evaluation mode (through BatchNorm-folded copies where the runtime folds) and
    are left in the mode they were in. With an exchange over processes, the ensemble holds every
    process's peers, except the cohort indices in ``ensemble_excludes`` (teachers).
    """
    exchange = exchange or LocalExchange(len(models))
    modes = [m.training for m in models]
    inference = [runtime.inference_model(m) for m in models]
    correct = torch.zeros(len(models), len(TOP_K), device=runtime.device, dtype=torch.int64)
    ensemble = torch.zeros(len(TOP_K), device=runtime.device, dtype=torch.int64)
    samples = 0
    with torch.inference_mode():
        for x, y in batches:
            if not local_rows:
                x, y = exchange.shard(x), exchange.shard(y)  # replicas of a peer share the batches out
            x, y = runtime.to_device(x), y.to(runtime.device, non_blocking=True)
            logits = runtime.runner.map(functools.partial(_predict, x=x, precision=runtime.precision), inference)
            for k, z in enumerate(logits):
                correct[k] += _correct_top_k(z, y)
            members = [z for j, z in enumerate(exchange.gather_logits(logits)) if j not in ensemble_excludes]
            mean_probs = torch.stack([z.float().softmax(1) for z in members]).mean(0)
            ensemble += _correct_top_k(mean_probs, y)
            samples += y.shape[0]
    for m, mode in zip(models, modes):
        m.train(mode)
    counts = exchange.sum_over_replicas(
        torch.cat([correct.flatten(), ensemble, torch.tensor([samples], device=correct.device)])
    )
    correct, ensemble, samples = (
        counts[: correct.numel()].view_as(correct),
        counts[correct.numel() : -1],
        int(counts[-1]),
    )
    if samples == 0:
        raise ValueError("no batches to evaluate on")
    per_peer = [[100.0 * c / samples for c in row] for row in correct.tolist()]  # Python floats: exact percent
    top1, top5 = ([acc[i] for acc in per_peer] for i in range(len(TOP_K)))
    ensemble_top1, ensemble_top5 = (100.0 * c / samples for c in ensemble.tolist())
    return Evaluation(top1, top5, ensemble_top1, ensemble_top5, samples)
