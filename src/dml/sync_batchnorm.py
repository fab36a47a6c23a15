"""BatchNorm whose batch statistics span the replicas of a data-parallel peer, on any device.

``torch.nn.SyncBatchNorm`` computes only on GPU (its forward refuses CPU tensors in torch 2.13), and a
cohort's replicas on CPU talk through gloo. This module computes the same thing from plain tensor
operations and two all-reduces per layer and step (one in forward, one in backward):

    forward:  mean and biased variance over every replica's (N, H, W) positions: each replica's own
              (mean, variance, count) per channel, all-gathered and combined as parallel variance
              algorithms do (Chan et al.), which keeps the precision that E[x^2] - mean^2 loses where
              the mean is large against the spread; running statistics move with the unbiased
              variance, as BatchNorm's do;
    backward: with x_hat = (x - mean) / std and dy the incoming gradient, the all-reduced sums
              S1 = sum dy and S2 = sum dy * x_hat give
              dx = weight / std * (dy - S1 / n - x_hat * S2 / n),
              the gradient of the sum of every replica's loss with respect to this replica's x;
              weight and bias get this replica's own sums (the step averages them over replicas).

In evaluation mode (or without a group) it is plain BatchNorm with the running statistics.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

# torch renamed all_gather_into_tensor; keep working on releases that only have the old name.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _SyncedBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = [0, *range(2, x.dim())]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32 (bf16 input), float64 stays
        local_var, local_mean = torch.var_mean(xf, dims, correction=0)
        mine = torch.cat([local_mean, local_var, xf.new_full((1,), x.numel() / x.shape[1])])
        gathered = mine.new_empty(dist.get_world_size(group) * mine.numel())  # flat: what gloo gathers into
        _all_gather_tensor(gathered, mine, group=group)
        gathered = gathered.view(-1, mine.numel())
        channels = x.shape[1]
        means, variances, counts = gathered[:, :channels], gathered[:, channels:-1], gathered[:, -1:]
        count = counts.sum()
        mean = (means * counts).sum(0) / count
        var = ((variances + (means - mean) ** 2) * counts).sum(0) / count
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var * count / (count - 1).clamp_min(1), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps)
        x_hat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        ctx.group, ctx.shape = group, shape
        out = x_hat * weight.to(xf.dtype).view(shape) + bias.to(xf.dtype).view(shape)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, weight, invstd, count = ctx.saved_tensors
        shape, dims = ctx.shape, [0, *range(2, grad_out.dim())]
        dy = grad_out.to(x_hat.dtype)
        local = torch.cat([dy.sum(dims), (dy * x_hat).sum(dims)])  # this replica's sum dy, sum dy * x_hat
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        channels = shape[1]
        s1, s2 = sums[:channels].view(shape), sums[channels:].view(shape)
        scale = (weight.to(x_hat.dtype) * invstd).view(shape)
        dx = scale * (dy - s1 / count - x_hat * s2 / count)
        return (
            dx.to(grad_out.dtype),
            local[channels:].to(weight.dtype),
            local[:channels].to(weight.dtype),
            None,
            None,
            None,
            None,
            None,
        )


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer (any number of spatial dimensions) whose training statistics span ``group``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def __deepcopy__(self, memo):
        """A copy (an EMA peer, an evaluation copy) shares the process group: a group cannot be copied."""
        memo.setdefault(id(self.group), self.group)
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__dict__.items()})
        return clone

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.group is None or not self.affine:
            return super().forward(x)
        if self.track_running_stats:
            assert self.num_batches_tracked is not None  # a buffer wherever running statistics are tracked
            self.num_batches_tracked.add_(1)
        if self.momentum is not None:
            momentum = self.momentum
        elif self.num_batches_tracked is not None:  # a cumulative average, over the batches tracked
            momentum = 1.0 / float(self.num_batches_tracked)
        else:  # no running statistics to update (track_running_stats=False)
            momentum = 0.0
        return _SyncedBatchNorm.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, momentum, self.group
        )


def synchronise_batchnorm(model: nn.Module, group, replaced: dict | None = None) -> nn.Module:
    """``model`` with every BatchNorm layer replaced by a SyncedBatchNorm over ``group``, keeping its
    parameters and running statistics (the same tensors: an optimizer built on them stays valid). A layer
    that several parents hold (a shared trunk's) becomes one SyncedBatchNorm in all of them."""
    replaced = {} if replaced is None else replaced  # a layer (hashed by identity) -> its replacement
    for name, child in model.named_children():
        if child in replaced:
            setattr(model, name, replaced[child])
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncedBatchNorm):
            synced = SyncedBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats, group
            )
            if child.affine:
                synced.weight, synced.bias = child.weight, child.bias
            if child.track_running_stats:
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
            synced.train(child.training)
            replaced[child] = synced
            setattr(model, name, synced)
        else:
            synchronise_batchnorm(child, group, replaced)
    return model
