"""What must hold on every device present: the CPU always, a CUDA GPU where there is one.

Marked ``device``: CI runs them on the CPU, and ``scripts/gpu-check.sh`` runs them where a GPU is
(``pytest -m device``), so that a GPU's short time goes to what cannot be checked without one.
Tolerances: one fp32 step on a GPU against the CPU differs by summation order only (TF32 off: about
1e-6 relative per operation); bf16 and fp16 against fp32 on the same device are test_numerics.py's.
"""

import contextlib
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import dml
from dml.cli import main
from dml.models import create_model
from dml.peer_threads import SerialPeers, ThreadedPeers
from tiny_run import metrics, tiny_flags, train

pytestmark = pytest.mark.device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# fp16 autocast with its gradient scaler is CUDA's (dml refuses it elsewhere): it runs where a GPU is
PRECISIONS = [pytest.param(d, "bf16", id=f"{d}-bf16") for d in DEVICES] + [
    pytest.param(d, "fp16", id=f"{d}-fp16") for d in DEVICES if d == "cuda"]


@pytest.fixture(params=DEVICES)
def device(request):
    with _exact_fp32(request.param):
        yield request.param


@contextlib.contextmanager
def _exact_fp32(device):
    """fp32 as fp32 on a GPU: no TF32 matmuls or convolutions, deterministic convolution kernels."""
    if device != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


def _step(device, precision, models=None, plain=True):
    """One DML step of 2 x ResNet-20 from the same weights on the same batch; (parameter updates, losses)."""
    torch.manual_seed(0)
    models = models or [create_model("resnet20", 100) for _ in range(2)]
    start = [copy.deepcopy(m.state_dict()) for m in models]
    cohort = dml.Cohort(models, [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models],
                        precision=precision, device=device, plain=plain)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 100, (32,), generator=g)
    try:
        losses = torch.stack(cohort.step(x.to(device), y.to(device)).losses).detach().cpu().float()
        updates = torch.cat([(p.model.state_dict()[k].float().cpu() - s[k].float()).flatten()
                             for p, s in zip(cohort.peers, start) for k in s
                             if s[k].is_floating_point() and "running" not in k])
        scaler = cohort.runtime.precision.scaler
    finally:
        cohort.close()
    return updates, losses, scaler


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_a_step_on_the_device_is_the_step_on_the_cpu_in_fp32(device):
    updates, losses, _ = _step(device, "fp32")
    reference, reference_losses, _ = _step("cpu", "fp32")
    if device == "cpu":
        assert torch.equal(updates, reference) and torch.equal(losses, reference_losses)
    torch.testing.assert_close(losses, reference_losses, rtol=1e-5, atol=1e-6)
    assert _relative(updates, reference) < 1e-4


@pytest.mark.parametrize("device, precision", PRECISIONS)
def test_autocast_and_its_scaler_stay_close_to_fp32_on_the_device(device, precision):
    with _exact_fp32(device):
        reference, reference_losses, _ = _step(device, "fp32", plain=False)
        updates, losses, scaler = _step(device, precision, plain=False)
    assert scaler.is_enabled() == (precision == "fp16")  # fp16's gradients need scaling; bf16's do not
    if scaler.is_enabled():
        assert torch.isfinite(torch.tensor(scaler.get_scale())) and scaler.get_scale() > 1
    assert updates.norm() > 0  # the step was taken, not skipped for an overflow
    assert F.cosine_similarity(updates, reference, dim=0).item() >= 0.99
    assert abs(updates.norm().item() / reference.norm().item() - 1) < 0.02
    torch.testing.assert_close(losses, reference_losses, rtol=0.005, atol=0.0)


def test_peers_side_by_side_compute_what_peers_in_turn_compute(device):
    """dml's default runner (worker threads per peer on CPU; in turn on a GPU) against the plain path's
    peers in turn, on the same memory format and precision."""
    torch.manual_seed(0)
    models = [create_model("resnet20", 100) for _ in range(2)]
    in_turn = copy.deepcopy(models)
    cohorts = [dml.Cohort(m, [torch.optim.SGD(p.parameters(), lr=0.1) for p in m], precision="fp32", device=device,
                          threads=1) for m in (models, in_turn)]
    if device == "cpu" and torch.get_num_threads() >= 2:
        assert isinstance(cohorts[0].runtime.runner, ThreadedPeers)  # what is compared: threads against in turn
    cohorts[1].runtime.runner.close()
    cohorts[1].runtime.runner = SerialPeers(threads=1)
    g = torch.Generator().manual_seed(5)
    try:
        for _ in range(2):
            x, y = torch.randn(16, 3, 32, 32, generator=g).to(device), torch.randint(0, 100, (16,), generator=g)
            a, b = (c.step(x, y.to(device)) for c in cohorts)
            assert torch.equal(torch.stack(a.losses), torch.stack(b.losses))
    finally:
        for c in reversed(cohorts):  # the last made first: each gives back torch's settings as it found them
            c.close()
    for m, n in zip(models, in_turn):
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), n.parameters()))


TINY = tiny_flags("--precision", "fp32", "--models", "resnet20", "--num-nodes", "2")


def test_resume_on_the_device_ends_as_the_uninterrupted_run(device, cifar_root, tmp_path):
    args = ["--device", device, "--epochs", "2"]
    assert train(cifar_root, tmp_path / "straight", *args, tiny=TINY) == 0
    assert train(cifar_root, tmp_path / "resumed", *args, "--stop-after", "1", tiny=TINY) == 0
    assert train(cifar_root, tmp_path / "resumed", *args, "--resume", tiny=TINY) == 0
    a, b = (metrics(tmp_path / out / "dml_n2_resnet20_s42") for out in ("straight", "resumed"))
    assert a == b
    for peer in ("0_resnet20", "1_resnet20"):
        wa, wb = (torch.load(tmp_path / out / "dml_n2_resnet20_s42" / peer / "last.pt", weights_only=True)["model"]
                  for out in ("straight", "resumed"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), peer


def test_a_checkpoint_trained_on_the_device_evaluates_on_the_cpu(device, cifar_root, tmp_path, capsys):
    assert train(cifar_root, tmp_path, "--device", device, "--epochs", "1", tiny=TINY) == 0
    run = tmp_path / "dml_n2_resnet20_s42"
    logged = [r["test_acc"] for r in metrics(run) if r["node"] in (0, 1)]
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run / "0_resnet20" / "best.pt"), str(run / "1_resnet20" / "best.pt"),
                 "--device", "cpu", "--json", str(out), "--data-dir", str(cifar_root), "--skip-checksum",
                 "--no-download", "--test-samples", "100"]) == 0, capsys.readouterr().err
    evaluated = [c["top1"] for c in json.loads(out.read_text())["checkpoints"]]
    if device == "cpu":
        assert evaluated == logged
    else:  # another device's rounding may flip the argmax of a near tie: one image in 100 at most
        assert all(abs(e - g) <= 1.0 for e, g in zip(evaluated, logged)), (evaluated, logged)
