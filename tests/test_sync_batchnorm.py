"""SyncedBatchNorm over gloo: two replicas, each with half of a batch, compute what one BatchNorm computes
on the whole batch (outputs, input and parameter gradients, running statistics)."""

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
