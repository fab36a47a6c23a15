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


def _kl_live(target_logits, student_logits, t):
    """T^2 KL(softmax(target / T) || softmax(student / T)) with the gradient flowing into both sides."""
    log_p = torch.log_softmax(target_logits / t, 1)
    return t * t * (log_p.exp() * (log_p - torch.log_softmax(student_logits / t, 1))).sum(1).mean()


def okddip_links(t=3.0, weight=0.8):
    """OKDDip with 3 auxiliary branches (0-2), the leader (3) and the targets (4-6, no cross-entropy)."""
    return dml.Links([dml.Link(4 + k, 4 + k, weight=0.0) for k in range(3)]
                     + [dml.Link(4 + k, k, temperature=t, weight=weight, detach=False) for k in range(3)]
                     + [dml.Link((0, 1, 2), 3, temperature=t, weight=weight, detach=False)], num_peers=7, combine="sum")


def test_one_step_of_okddip_equals_a_float64_computation_by_hand():
    network = Branches(_networks(m=4), teacher="okddip")
    by_hand = copy.deepcopy(network)
    x, y = _batch()
    losses = _step(network, okddip_links(), x, y)

    # written out: each branch whole; attention over the auxiliary branches' pooled stage-3 features
    branches = by_hand.branches
    z = [b(x) for b in branches]
    f = [b.blocks(F.relu(b.bn1(b.conv1(x)))).mean((2, 3)) for b in branches[:3]]
    q = [by_hand.teacher.query.weight @ fi.T for fi in f]  # (8, batch) each
    k_ = [by_hand.teacher.key.weight @ fi.T for fi in f]
    targets = []
    for i in range(3):
        energy = torch.stack([(q[i] * k_[j]).sum(0) for j in range(3)], 1)  # (batch, j)
        a = torch.softmax(energy, 1)
        targets.append(sum(a[:, j:j + 1] * z[j] for j in range(3)))
    leader_target = (z[0] + z[1] + z[2]) / 3
    expected = [F.cross_entropy(z[i], y) + 0.8 * _kl_live(targets[i], z[i], 3.0) for i in range(3)]
    expected.append(F.cross_entropy(z[3], y) + 0.8 * _kl_live(leader_target, z[3], 3.0))
    expected += [0.0 * F.cross_entropy(t_, y) for t_ in targets]
    torch.testing.assert_close(torch.stack(losses).double(), torch.stack(expected).detach(), rtol=1e-6, atol=1e-6)
    sum(expected).backward()
    for (name, after), (_, before) in zip(network.named_parameters(), by_hand.named_parameters()):
        step = LR * before.grad
        assert (after - (before - step)).norm().item() <= 1e-5 * step.norm().item() + 1e-12, name


def test_okddips_attention_learns_through_its_targets_and_the_leader_reaches_the_auxiliary_branches():
    x, y = _batch()
    grads = {}
    for detach in (False, True):
        network = Branches(_networks(m=4), teacher="okddip")
        links = dml.Links([dml.Link(4 + k, 4 + k, weight=0.0) for k in range(3)]
                          + [dml.Link(4 + k, k, temperature=3.0, detach=detach) for k in range(3)], num_peers=7)
        with dml.Cohort([network], [torch.optim.SGD(network.parameters(), lr=0.0)], links, device="cpu",
                        precision="fp32", plain=True) as cohort:
            cohort.step(x, y)  # lr 0: the gradients stay for us to read
        grads[detach] = {n: p.grad for n, p in network.named_parameters()}
    assert grads[False]["teacher.query.weight"].abs().sum() > 0 and grads[False]["teacher.key.weight"].abs().sum() > 0
    detached = grads[True]["teacher.query.weight"]  # detached, the projections would never learn
    assert detached is None or not detached.abs().sum()
    # the leader's link from the auxiliary branches' mean, not detached: its gradient reaches their classifiers
    network = Branches(_networks(m=4), teacher="okddip")
    links = dml.Links([dml.Link(4 + k, 4 + k, weight=0.0) for k in range(3)] + [dml.Link(k, k, weight=0.0)
                      for k in range(3)] + [dml.Link((0, 1, 2), 3, temperature=3.0, detach=False)], num_peers=7)
    with dml.Cohort([network], [torch.optim.SGD(network.parameters(), lr=0.0)], links, device="cpu",
                    precision="fp32", plain=True) as cohort:
        cohort.step(x, y)
    assert network.branches[0].fc.weight.grad.abs().sum() > 0


def test_one_step_of_ffl_equals_a_float64_computation_by_hand():
    network = Branches(_networks(m=2), teacher="ffl")
    by_hand = copy.deepcopy(network)
    x, y = _batch()
    links = dml.Links([dml.Link(2, k, temperature=3.0, weight=0.6) for k in range(2)]
                      + [dml.Link((0, 1), 2, temperature=3.0, weight=0.6)], num_peers=3, combine="sum")
    losses = _step(network, links, x, y)

    branches, head = by_hand.branches, by_hand.teacher
    z = [b(x) for b in branches]
    maps = torch.cat([b.blocks(F.relu(b.bn1(b.conv1(x)))) for b in branches], 1)  # (batch, 128, 8, 8)

    def bn(v, layer):  # training-mode batch statistics, biased variance
        mean, var = v.mean((0, 2, 3), keepdim=True), v.var((0, 2, 3), unbiased=False, keepdim=True)
        return (v - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)

    fused = F.relu(bn(F.conv2d(maps, head.depthwise.weight, padding=1, groups=128), head.bn1))
    fused = F.relu(bn(torch.einsum("oc,bchw->bohw", head.pointwise.weight[:, :, 0, 0], fused), head.bn2))
    fused = fused.mean((2, 3)) @ head.fc.weight.T + head.fc.bias
    expected = [F.cross_entropy(z[k], y) + 0.6 * _kl(fused.detach(), z[k], 3.0) for k in range(2)]
    expected.append(F.cross_entropy(fused, y) + 0.6 * _kl(((z[0] + z[1]) / 2).detach(), fused, 3.0))
    torch.testing.assert_close(torch.stack(losses).double(), torch.stack(expected).detach(), rtol=1e-6, atol=1e-6)
    sum(expected).backward()
    for (name, after), (_, before) in zip(network.named_parameters(), by_hand.named_parameters()):
        step = LR * before.grad
        assert (after - (before - step)).norm().item() <= 1e-5 * step.norm().item() + 1e-12, name


def test_a_link_that_is_not_detached_reads_its_own_network_or_is_refused():
    nets = _networks(m=2)
    other = create_model("resnet20", 10).double()
    links = dml.Links([dml.Link(2, 0, detach=False)], num_peers=3)
    with pytest.raises(ValueError, match="not detached: its source must be peers of the target's own multi-branch"):
        dml.Cohort([Branches(nets), other], [torch.optim.SGD(p, lr=0.1) for p in
                                              (Branches(_networks(m=2)).parameters(), other.parameters())],
                   links, device="cpu", precision="fp32")
    with pytest.raises(ValueError, match="detach applies to a link from another source"):
        dml.Link(0, 0, detach=False)


def test_one_step_of_pcl_on_a_shared_trunk_equals_a_float64_computation_by_hand():
    """Branches 0-2, the ensemble teacher 3 (linear on the concatenated pooled features), means 4-6 of the
    branches; branch i learns from the teacher and, 1/2 each, from the other branches' means."""
    network = Branches(_networks(), teacher="pcl")
    by_hand = copy.deepcopy(network)
    x, y = _batch()
    links = dml.Links([dml.Link(3, i, temperature=3.0) for i in range(3)]
                      + [dml.Link(4 + j, i, temperature=3.0, weight=0.5) for i in range(3) for j in range(3) if j != i],
                      num_peers=7, combine="sum", frozen=[4, 5, 6])
    optimizer = torch.optim.SGD(network.parameters(), lr=LR)
    with dml.Cohort([network, None, None, None], [optimizer, *(dml.MeanOf(k) for k in range(3))], links,
                    device="cpu", precision="fp32", plain=True) as cohort:
        losses = cohort.step(x, y).losses
        means = [cohort.peers[4 + k].model for k in range(3)]

    branches = by_hand.branches
    with torch.no_grad():  # the means before the step: the branches as they were, with the batch's statistics
        m = [copy.deepcopy(b).train()(x) for b in branches]
    z = [b(x) for b in branches]
    pooled = torch.cat([b.blocks(F.relu(b.bn1(b.conv1(x)))).mean((2, 3)) for b in branches], 1)
    fused = pooled @ by_hand.teacher.fc.weight.T + by_hand.teacher.fc.bias
    expected = [F.cross_entropy(z[i], y) + _kl(fused.detach(), z[i], 3.0)
                + 0.5 * sum(_kl(m[j], z[i], 3.0) for j in range(3) if j != i) for i in range(3)]
    expected.append(F.cross_entropy(fused, y))
    torch.testing.assert_close(torch.stack(losses[:4]).detach().double(), torch.stack(expected).detach(),
                               rtol=1e-6, atol=1e-6)
    sum(expected).backward()
    for (name, after), (_, before) in zip(network.named_parameters(), by_hand.named_parameters()):
        step = LR * before.grad
        assert (after - (before - step)).norm().item() <= 1e-5 * step.norm().item() + 1e-12, name
    # after the first step each mean is its branch (the warm-up's first weight is 1), a standalone network
    for k in range(3):
        torch.testing.assert_close(dict(means[k].named_parameters())["blocks.0.conv1.weight"],
                                   dict(network.branches[k].named_parameters())["blocks.0.conv1.weight"])
        assert means[k].blocks[0].conv1.weight is not network.branches[k].blocks[0].conv1.weight


def test_with_views_each_branch_and_its_mean_see_their_own_augmentation():
    """PCL's views: branch k computes the trunk and its stage on view k; the mean of branch k reads view k."""
    network = Branches(_networks(), teacher="pcl", views=True)
    by_hand = copy.deepcopy(network)
    _, y = _batch()
    views = torch.stack([_batch(seed=10 + k)[0] for k in range(3)])  # (3, batch, 3, 32, 32)
    links = dml.Links([dml.Link(4 + j, i, temperature=2.0) for i in range(3) for j in range(3) if j != i],
                      num_peers=7, combine="sum", frozen=[4, 5, 6])
    with dml.Cohort([network, None, None, None], [torch.optim.SGD(network.parameters(), lr=LR),
                                                   *(dml.MeanOf(k) for k in range(3))], links,
                    device="cpu", precision="fp32", plain=True) as cohort:
        out = cohort.step(views, y)
    branches = by_hand.branches
    with torch.no_grad():
        m = [copy.deepcopy(b).train()(views[k]) for k, b in enumerate(branches)]  # the batch's statistics
    z = [b(views[k]) for k, b in enumerate(branches)]
    expected = [F.cross_entropy(z[i], y) + sum(_kl(m[j], z[i], 2.0) for j in range(3) if j != i) for i in range(3)]
    torch.testing.assert_close(torch.stack(out.losses[:3]).detach().double(), torch.stack(expected).detach(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits[5].double(), m[1], rtol=1e-6, atol=1e-6)  # the mean of branch 1, view 1
    with pytest.raises(ValueError, match="2 views of the batch for 3 branches"):
        network(views[:2])


def test_views_are_augmentations_of_the_same_images_and_one_view_is_the_plain_batch():
    from dml.data.augment import Normalise
    from dml.data.batches import TrainBatches

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(16)
    normalise = Normalise((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"), channels_last=False)

    def first(views):
        return next(iter(TrainBatches(images, labels, 8, torch.Generator().manual_seed(1), normalise, views)))

    plain, (stacked, y) = first(1), first(3)
    assert stacked.shape == (3, 8, 3, 32, 32) and torch.equal(y, plain[1])
    assert not torch.equal(stacked[0], stacked[1])  # each view its own crop and flip
    # every view of a sample is a crop of the same image: its pixels' values are the image's
    for view in stacked:
        raw = (view * 0.25 + 0.5) * 255.0
        for k in range(8):
            assert set(raw[k].round().int().unique().tolist()) <= set(images[y[k]].int().unique().tolist()) | {0}
