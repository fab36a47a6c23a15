import copy

import pytest
import torch
import torch.nn.functional as F

from cifar_fixtures import make_cohort
from dml.loss import mutual_loss
from dml.peer import derive_seed
from dml.step import sequential_step, simultaneous_step


def _cohort(num_nodes, seed=0, lr=0.1):
    cohort = make_cohort(num_nodes, seed=seed, lr=lr)
    return cohort, cohort.peers


def _batches(n=3, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def _params(peer):
    return torch.cat([p.detach().flatten() for p in peer.model.parameters()])


def _run(step, cohort, peers, batches):
    cohort.peers = peers
    for x, y in batches:
        step(cohort, x, y)


@pytest.mark.parametrize("step", [simultaneous_step, sequential_step])
def test_single_peer_equals_plain_cross_entropy_training(step):
    cfg, peers = _cohort(1)
    reference = copy.deepcopy(peers[0])
    batches = _batches()
    _run(step, cfg, peers, batches)
    for x, y in batches:
        reference.optimizer.zero_grad()
        F.cross_entropy(reference.model(x), y).backward()
        reference.optimizer.step()
    torch.testing.assert_close(_params(peers[0]), _params(reference), rtol=0, atol=0)


def test_sequential_differs_from_simultaneous_for_two_peers():
    cfg, sim = _cohort(2)
    _, seq = _cohort(2)
    batch = _batches(1)
    _run(simultaneous_step, cfg, sim, batch)
    _run(sequential_step, cfg, seq, batch)
    # Peer 0 steps first in both modes, against the same predictions of peer 1 ...
    torch.testing.assert_close(_params(sim[0]), _params(seq[0]), rtol=0, atol=0)
    # ... but in sequential mode peer 1 learns from peer 0's updated predictions.
    assert not torch.allclose(_params(sim[1]), _params(seq[1]))


def test_sequential_step_by_hand():
    cfg, peers = _cohort(2)
    hand = copy.deepcopy(peers)
    (x, y), = _batches(1)
    _run(sequential_step, cfg, peers, [(x, y)])
    z0, z1 = hand[0].model(x), hand[1].model(x)
    loss0 = mutual_loss(z0, [z1.detach()], y)
    hand[0].optimizer.zero_grad()
    loss0.backward()
    hand[0].optimizer.step()
    with torch.no_grad():
        z0_new = hand[0].model(x)
    loss1 = mutual_loss(z1, [z0_new], y)
    hand[1].optimizer.zero_grad()
    loss1.backward()
    hand[1].optimizer.step()
    for mine, ref in zip(peers, hand):
        torch.testing.assert_close(_params(mine), _params(ref), rtol=1e-6, atol=1e-7)


def test_sequential_recompute_leaves_batchnorm_statistics_alone():
    cfg, peers = _cohort(2)
    hand = copy.deepcopy(peers)
    batch = _batches(1)
    _run(sequential_step, cfg, peers, batch)
    _run(simultaneous_step, cfg, hand, batch)
    # Only the step's first forward moves the running statistics, whatever the update mode.
    for a, b in zip(peers, hand):
        for (name, buf_a), buf_b in zip(a.model.named_buffers(), b.model.buffers()):
            assert torch.equal(buf_a, buf_b), name


def test_simultaneous_step_by_hand():
    cfg, peers = _cohort(3, lr=0.05)
    hand = copy.deepcopy(peers)
    (x, y), = _batches(1)
    _run(simultaneous_step, cfg, peers, [(x, y)])
    logits = [p.model(x) for p in hand]
    for i, p in enumerate(hand):
        others = [z.detach() for j, z in enumerate(logits) if j != i]
        p.optimizer.zero_grad()
        mutual_loss(logits[i], others, y).backward(retain_graph=True)
        p.optimizer.step()
    for mine, ref in zip(peers, hand):
        torch.testing.assert_close(_params(mine), _params(ref), rtol=1e-5, atol=1e-6)


def test_peer_initialisation_depends_on_seed_and_index_only():
    _, two = _cohort(2, seed=3)
    _, four = _cohort(4, seed=3)
    torch.testing.assert_close(_params(two[1]), _params(four[1]), rtol=0, atol=0)
    assert not torch.equal(_params(four[0]), _params(four[1]))
    assert derive_seed(3, "init", 1) != derive_seed(4, "init", 1)
