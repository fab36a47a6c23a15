"""Deep Mutual Learning: a cohort of peers that learn from each other's predictions.

The library in one screen::

    import dml
    cohort = dml.Cohort(models=[net_a, net_b], optimizers=[opt_a, opt_b],
                        loss=dml.MutualLoss(temperature=1.0, kl_weight=1.0))
    for x, y in loader:
        out = cohort.step(x, y)        # out.losses, out.logits: one per local peer
    print(cohort.evaluate(test_loader))

Knowledge distillation from a frozen teacher (no optimizer), or any graph of links::

    kd = dml.Links([dml.Link(source=1, target=0, temperature=2.0)], num_peers=2, frozen=[1])
    cohort = dml.Cohort([student, teacher], [opt, None], loss=kd)

Online distillation: a link from ``dml.ENSEMBLE`` (the peers' mean logits), ramp gates, standardised
links, and temporal means (a peer whose optimizer is ``dml.MeanOf(i, decay)``) -- see links.py.
Branches on a shared trunk (ONE's gated teacher, CL-ILR's rescaled trunk gradient): ``dml.Branches``,
one model of the cohort whose outputs are peers -- see branches.py.
"""

__version__ = "0.2.0"

# Loaded on first use, so that `import dml` does not import torch until a name is used; the command
# line imports it only for the work itself, not for --help or a mistyped setting (tests/test_cli.py).
_PUBLIC = {
    "Cohort": "cohort",
    "StepOutput": "cohort",
    "MutualLoss": "loss",
    "mutual_loss": "loss",
    "Evaluation": "accuracy",
    "create_model": "models",
    "Link": "links",
    "Links": "links",
    "load_model": "evaluate",
    "load_image_folder": "data.folder",
    "MeanOf": "peer",
    "ENSEMBLE": "links",
    "Branches": "branches",
    "OTHERS": "links",
}
__all__ = list(_PUBLIC)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dml' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
