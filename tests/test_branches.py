"""Branches on a shared trunk (dml.Branches) in a cohort, against float64 computations written here."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dml
from dml.branches import Branches
from dml.models import create_model

LR = 0.1


def _networks(name="resnet20", m=3, classes=10, seed=0):
    torch.manual_seed(seed)
    return [create_model(name, classes).double() for _ in range(m)]


def _batch(seed=1, n=8, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _step(network, links, x, y):
    """One simultaneous step of a cohort holding only ``network``; its per-peer objectives."""
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    with dml.Cohort([network], [optimizer], links, device="cpu", precision="fp32", plain=True) as cohort:
        out = cohort.step(x, y)
    return [loss.detach() for loss in out.losses]


def _kl(teacher_logits, student_logits, t):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), the mean over the batch, by hand."""
    p = torch.softmax(teacher_logits / t, 1)
    return t * t * (p * (torch.log(p) - torch.log_softmax(student_logits / t, 1))).sum(1).mean()


@pytest.mark.parametrize("name", ["resnet20", "wrn28_2"])
@pytest.mark.parametrize("shared", [1, 2])
def test_a_split_network_computes_what_it_computes_whole(name, shared):
    torch.manual_seed(0)
    net = create_model(name, 10).double().eval()
    x, _ = _batch()
    whole = net(x)
    h = net.trunk(x, shared)
    assert h.shape[1] == net.trunk_channels(shared)
    torch.testing.assert_close(net.fc(F.adaptive_avg_pool2d(net.tail(h, shared), 1).flatten(1)), whole, rtol=0, atol=0)
    names = dict(net.named_modules())
    assert all(n in names for n in net.trunk_modules(shared))


def test_each_branch_is_a_whole_network_that_shares_the_trunk():
    nets = _networks()
    network = Branches(nets)
    first, second = nets[0], nets[1]
    assert second.conv1 is first.conv1 and second.blocks[5] is first.blocks[5]  # stem and stages 1-2 (3 blocks each)
    assert second.blocks[6] is not first.blocks[6] and second.fc is not first.fc
    unique = {id(p) for p in network.parameters()}
    assert len(unique) == sum(1 for _ in network.parameters())  # each shared parameter listed once
    x, _ = _batch()
    network.eval()
    outputs = network(x)
    for k, net in enumerate(nets):
        alone = create_model("resnet20", 10).double().eval()
        alone.load_state_dict(net.state_dict())  # a branch's state is a plain ResNet-20's
        torch.testing.assert_close(alone(x), outputs[k], rtol=1e-12, atol=1e-12)


def one_links(weight=0.7, t=3.0, teacher_gate="through"):
    """ONE with 3 branches (peers 0-2) and its gate's teacher (peer 3): the teacher teaches every branch."""
    return dml.Links([dml.Link(3, 3, gate=teacher_gate)] + [dml.Link(3, k, temperature=t, weight=weight)
                                                            for k in range(3)], num_peers=4, combine="sum")


def test_one_step_of_one_equals_a_float64_computation_by_hand():
    nets = _networks()
    network = Branches(nets, teacher="one")
    by_hand = copy.deepcopy(network)
    x, y = _batch()
    losses = _step(network, one_links(), x, y)

    # the same objective, written out: each branch whole, the gate on the pooled trunk features
    branches = by_hand.branches
    z = [b(x) for b in branches]
    stem = branches[0]
    h = stem.blocks[:6](F.relu(stem.bn1(stem.conv1(x))))
    gate = by_hand.teacher
    g = torch.softmax(F.relu(F.batch_norm(F.linear(h.mean((2, 3)), gate.linear.weight, gate.linear.bias), None, None,
                                          gate.bn.weight, gate.bn.bias, training=True)), 1)
    teacher = sum(g[:, k:k + 1] * z[k] for k in range(3))
    expected = [F.cross_entropy(z[k], y) + 0.7 * _kl(teacher.detach(), z[k], 3.0) for k in range(3)]
    expected.append(F.cross_entropy(teacher, y))
    # the links compute their terms in fp32 (from these float64 logits): fp32's rounding, no more
    torch.testing.assert_close(torch.stack(losses).double(), torch.stack(expected).detach(), rtol=1e-6, atol=1e-6)
    sum(expected).backward()
    for (name, after), (_, before) in zip(network.named_parameters(), by_hand.named_parameters()):
        step = LR * before.grad  # a bias before BatchNorm gets none (the batch mean takes it): rounding only
        assert (after - (before - step)).norm().item() <= 1e-5 * step.norm().item() + 1e-12, name


def test_ones_gate_learns_only_through_its_own_cross_entropy():
    x, y = _batch()
    moved = {}
    for teacher_gate in ("through", "cutoff"):
        network = Branches(_networks(), teacher="one")
        before = copy.deepcopy(network.state_dict())
        _step(network, one_links(teacher_gate=teacher_gate), x, y)
        after = network.state_dict()
        moved[teacher_gate] = {k for k in before if not torch.equal(before[k], after[k])}
    gate = {"teacher.linear.weight", "teacher.linear.bias", "teacher.bn.weight", "teacher.bn.bias"}
    assert gate <= moved["through"]
    assert not gate & moved["cutoff"]  # the branches' distillation terms read the teacher detached
    assert "branches.0.fc.weight" in moved["cutoff"] and "branches.0.conv1.weight" in moved["cutoff"]


def test_the_trunk_gradient_is_the_sum_over_branches_or_one_mth_of_it():
    x, y = _batch()
    deltas = {}
    for trunk_gradient in ("sum", "mean"):
        network = Branches(_networks(), trunk_gradient=trunk_gradient)
        before = {k: v.clone() for k, v in network.named_parameters()}
        _step(network, dml.Links([], num_peers=3), x, y)  # cross-entropy only
        deltas[trunk_gradient] = {k: v.detach() - before[k] for k, v in network.named_parameters()}
    trunk = "branches.0.blocks.2.conv1.weight"
    branch = "branches.1.blocks.7.conv2.weight"
    assert deltas["sum"][trunk].abs().sum() > 0
    torch.testing.assert_close(deltas["mean"][trunk], deltas["sum"][trunk] / 3, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(deltas["mean"][branch], deltas["sum"][branch], rtol=0, atol=0)


def test_the_trunk_is_computed_once_per_step():
    network = Branches(_networks(), teacher="one")
    calls = []
    network.branches[0].conv1.register_forward_hook(lambda *args: calls.append(1))
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    x, y = _batch()
    with dml.Cohort([network], [optimizer], one_links(), device="cpu", precision="fp32") as cohort:
        cohort.step(x, y)  # the first step also checks each peer's output once
        calls.clear()
        cohort.step(x, y)
    assert len(calls) == 1


@pytest.mark.parametrize("make, message", [
    (lambda: Branches(_networks(m=1)), "at least 2 networks"),
    (lambda: Branches([create_model("resnet20", 10), create_model("wrn28_2", 10)]), "one architecture"),
    (lambda: Branches([nn.Linear(3, 3), nn.Linear(3, 3)]), "Linear cannot be split into a trunk and branches"),
    (lambda: Branches(_networks(), shared=3), "1 to 2 for CifarResNet, got 3"),
    (lambda: Branches(_networks(), teacher="oracle"), "teacher 'oracle' is not one of: one"),
    (lambda: Branches(_networks(), trunk_gradient="max"), "trunk_gradient 'max' is not one of: sum, mean"),
])
def test_a_network_that_cannot_be_branched_is_a_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_branches_in_a_cohort_step_together_or_are_refused():
    network = Branches(_networks())
    with pytest.raises(ValueError, match="it trains, with one optimizer"):
        dml.Cohort([network], [None], device="cpu")
    with pytest.raises(ValueError, match="update='simultaneous'"):
        dml.Cohort([network], [torch.optim.SGD(network.parameters(), lr=LR)], update="sequential", device="cpu")


def test_one_step_of_cl_ilr_equals_a_float64_computation_by_hand():
    """CL-ILR: each branch learns from the mean of the other branches' logits (beta 0.5, T = 2), and the
    trunk's gradient is the branches' sum times 1/m."""
    nets = _networks()
    network = Branches(nets, trunk_gradient="mean")
    by_hand = copy.deepcopy(network)
    links = dml.Links([dml.Link(k, k, weight=0.5) for k in range(3)]
                      + [dml.Link(dml.OTHERS, k, temperature=2.0, weight=0.5) for k in range(3)], num_peers=3)
    x, y = _batch()
    losses = _step(network, links, x, y)

    z = [b(x) for b in by_hand.branches]
    expected = [0.5 * F.cross_entropy(z[k], y)
                + 0.5 * _kl(sum(z[j].detach() for j in range(3) if j != k) / 2, z[k], 2.0) for k in range(3)]
    torch.testing.assert_close(torch.stack(losses).double(), torch.stack(expected).detach(), rtol=1e-6, atol=1e-6)
    sum(expected).backward()
    trunk = {id(p) for name in nets[0].trunk_modules(2) for p in by_hand.branches[0].get_submodule(name).parameters()}
    assert trunk
    for (name, after), (_, before) in zip(network.named_parameters(), by_hand.named_parameters()):
        step = LR * before.grad / (3 if id(before) in trunk else 1)
        assert (after - (before - step)).norm().item() <= 1e-5 * step.norm().item() + 1e-12, name
