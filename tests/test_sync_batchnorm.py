"""SyncedBatchNorm over gloo: two replicas, each with half of a batch, compute what one BatchNorm computes
on the whole batch (outputs, input and parameter gradients, running statistics)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dml.sync_batchnorm import synchronise_batchnorm
from ranks import run_ranks  # the tests folder is on sys.path

B, C, H = 8, 3, 4


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, C, H, H, generator=g) * 3 + 1, torch.randn(B, C, H, H, generator=g)


def _reference():
    """One BatchNorm on the whole batch: its output, the gradients of sum(out * dy), running statistics."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(C)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    x, dy = _batch()
    x.requires_grad_()
    out = bn(x)
    (out * dy).sum().backward()
    return out.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _replica():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        torch.manual_seed(1)
        bn = nn.Sequential(nn.BatchNorm2d(C))
        nn.init.uniform_(bn[0].weight)
        nn.init.uniform_(bn[0].bias)
        synchronise_batchnorm(bn, dist.group.WORLD)
        x, dy = _batch()
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        x = x[half].clone().requires_grad_()
        out = bn(x)
        (out * dy[half]).sum().backward()
        grads = torch.cat([bn[0].weight.grad, bn[0].bias.grad])
        dist.all_reduce(grads)  # the replicas' parameter gradients add up to the whole batch's
        return tuple(t.detach().numpy() for t in (out, x.grad, grads, bn[0].running_mean, bn[0].running_var)) + (
            type(bn[0]).__name__,)
    finally:
        dist.destroy_process_group()


@pytest.mark.processes
def test_two_replicas_compute_what_one_batchnorm_computes_on_the_whole_batch():
    got = run_ranks(2, _replica)
    out, x_grad, w_grad, b_grad, running_mean, running_var = _reference()
    for rank in (0, 1):
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        *arrays, kind = got[rank]
        r_out, r_xgrad, r_grads, r_mean, r_var = (torch.from_numpy(a) for a in arrays)
        assert kind == "SyncedBatchNorm"
        torch.testing.assert_close(r_out, out[half], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r_xgrad, x_grad[half], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r_grads, torch.cat([w_grad, b_grad]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r_mean, running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r_var, running_var, rtol=1e-6, atol=1e-6)


# Harder cases, all computed in one pair of processes (each case: what each replica returns, against one
# BatchNorm on the whole batch).
CASES = ("uneven", "large_mean", "bf16", "cumulative", "steps", "eval", "copy")


def _case_batch(case):
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(B, C, H, H, generator=g), torch.randn(B, C, H, H, generator=g)
    if case == "large_mean":  # E[x^2] - mean^2 in fp32 loses about 3e-3 of the variance here
        x = x + 300.0
    if case == "bf16":
        x, dy = x.bfloat16(), dy.bfloat16()
    return x, dy


def _rows(case, rank):
    cut = 3 if case == "uneven" else B // 2  # uneven: 3 rows and 5 rows
    return slice(0, cut) if rank == 0 else slice(cut, B)


def _case_reference(case):
    """One BatchNorm (float64 for the large mean, fp32 on the bf16 values for bf16) on the whole batch."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(C, momentum=None if case == "cumulative" else 0.1)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    x, dy = _case_batch(case)
    if case in ("large_mean", "bf16"):
        bn, x, dy = bn.double(), x.double(), dy.double()
    outputs = []
    for _ in range(3 if case in ("cumulative", "steps") else 1):
        bn.zero_grad()
        xg = x.clone().requires_grad_()
        out = bn(xg)
        (out * dy).sum().backward()
        outputs.append((out.detach(), xg.grad, torch.cat([bn.weight.grad, bn.bias.grad])))
    bn.eval()
    evaluated = bn(x).detach()
    return outputs, bn.running_mean, bn.running_var, evaluated


def _case_replica(case, rank):
    import copy

    torch.manual_seed(1)
    model = nn.Sequential(nn.BatchNorm2d(C, momentum=None if case == "cumulative" else 0.1))
    nn.init.uniform_(model[0].weight)
    nn.init.uniform_(model[0].bias)
    synchronise_batchnorm(model, dist.group.WORLD)
    if case == "copy":  # a temporal mean's deep copy computes like its source and shares the process group
        source, model = model, copy.deepcopy(model)
        assert model[0].group is source[0].group and model[0].weight is not source[0].weight
    x, dy = _case_batch(case)
    rows = _rows(case, rank)
    outputs = []
    for _ in range(3 if case in ("cumulative", "steps") else 1):
        model.zero_grad()
        xg = x[rows].clone().requires_grad_()
        out = model(xg)
        (out * dy[rows]).sum().backward()
        grads = torch.cat([model[0].weight.grad, model[0].bias.grad]).float()
        dist.all_reduce(grads)
        outputs.append((out.detach(), xg.grad, grads))
    model.eval()
    evaluated = model(x[rows]).detach()
    return outputs, model[0].running_mean, model[0].running_var, evaluated


def _all_cases():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        got = {}
        for case in CASES:
            outputs, mean, var, evaluated = _case_replica(case, rank)
            got[case] = ([[t.float().numpy() for t in step] for step in outputs], mean.float().numpy(),
                         var.float().numpy(), evaluated.float().numpy(), str(outputs[0][0].dtype))
        return got
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas():
    return run_ranks(2, _all_cases)


@pytest.mark.processes
@pytest.mark.parametrize("case", CASES)
def test_hard_cases_compute_what_one_batchnorm_computes(replicas, case):
    """Unequal shards (3 and 5 rows), a mean 300 times the spread, bf16 input to fp32 parameters (as under
    autocast; statistics in fp32: within bf16's rounding of the output, 2^-8 relative), momentum None (a cumulative average of the statistics),
    three steps, evaluation mode after them, and a deep copy (a temporal mean's)."""
    outputs, mean, var, evaluated = _case_reference(case)
    # fp32 rounding except where the input is bf16: there the output is rounded to bf16 (8 bits)
    tol = dict(rtol=2 ** -8, atol=2 ** -8) if case == "bf16" else dict(rtol=1e-5, atol=2e-5)
    for rank in (0, 1):
        steps, r_mean, r_var, r_eval, dtype = replicas[rank][case]
        rows = _rows(case, rank)
        assert dtype == ("torch.bfloat16" if case == "bf16" else "torch.float32")
        assert len(steps) == len(outputs)
        for (r_out, r_xgrad, r_grads), (out, x_grad, grads) in zip(steps, outputs):
            torch.testing.assert_close(torch.from_numpy(r_out).double(), out[rows].double(), **tol)
            torch.testing.assert_close(torch.from_numpy(r_xgrad).double(), x_grad[rows].double(), **tol)
            torch.testing.assert_close(torch.from_numpy(r_grads).double(), grads.double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(r_mean).double(), mean.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(r_var).double(), var.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(r_eval).double(), evaluated[rows].double(), **tol)


def _untracked_with_cumulative_momentum():
    """A BatchNorm that keeps no running statistics, with momentum None, trains as torch's does (two replicas
    of one row each against one BatchNorm on both rows)."""
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(3)
        reference = nn.Sequential(nn.BatchNorm2d(C, momentum=None, track_running_stats=False))
        model = synchronise_batchnorm(copy.deepcopy(reference), dist.group.WORLD)
        x = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(4))
        rank = dist.get_rank()
        return (model(x[rank : rank + 1]) - reference(x)[rank : rank + 1]).abs().max().item()
    finally:
        dist.destroy_process_group()


@pytest.mark.processes
def test_a_batchnorm_without_running_statistics_and_momentum_none_trains():
    assert max(run_ranks(2, _untracked_with_cumulative_momentum).values()) < 1e-5

