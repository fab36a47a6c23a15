import math

import pytest
import torch
import torch.nn.functional as F

from dml.loss import kl_from_peer, mutual_loss


def _hand_kl(p_logits, q_logits, T):
    """KL(softmax(p/T) || softmax(q/T)) per sample, written out with sums."""
    out = []
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist()):
        p = [math.exp(v / T) for v in p_row]
        q = [math.exp(v / T) for v in q_row]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        out.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    return out


def _hand_ce(logits, labels):
    out = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        out.append(-row[y] + math.log(sum(math.exp(v) for v in row)))
    return out


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("w", [1.0, 0.5])
def test_mutual_loss_matches_hand_computation(T, w):
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 3, 6, 2, 2])
    got = mutual_loss(z[0], [z[1], z[2]], y, temperature=T, kl_weight=w).item()
    ce = sum(_hand_ce(z[0], y)) / 5
    kls = [sum(_hand_kl(z[j], z[0], T)) / 5 for j in (1, 2)]
    expected = ce + w * T * T * (kls[0] + kls[1]) / 2
    assert got == pytest.approx(expected, rel=1e-5)


def test_kl_direction_peer_is_the_target():
    # KL is asymmetric: swapping the arguments must change the value for these distributions.
    peer = torch.tensor([[4.0, 0.0, 0.0]])
    own = torch.tensor([[1.0, 1.0, -2.0]])
    assert kl_from_peer(peer, own).item() == pytest.approx(_hand_kl(peer, own, 1.0)[0], rel=1e-5)
    assert kl_from_peer(peer, own).item() != pytest.approx(_hand_kl(own, peer, 1.0)[0], rel=1e-2)


def test_kl_gradient_flows_only_into_own_logits():
    peer = torch.randn(4, 10, requires_grad=True)
    own = torch.randn(4, 10, requires_grad=True)
    mutual_loss(own, [peer], torch.zeros(4, dtype=torch.long)).backward()  # the peer's logits have a graph
    assert own.grad is not None and own.grad.abs().sum() > 0
    assert peer.grad is None


def test_temperature_squared_scaling_keeps_gradient_scale():
    # d/dz KL(p_T || q_T) = (q_T - p_T) / T, so with the T^2 factor the gradient is T (q_T - p_T).
    g = torch.Generator().manual_seed(1)
    peer = torch.randn(8, 10, generator=g)
    own = torch.randn(8, 10, generator=g, requires_grad=True)
    y = torch.zeros(8, dtype=torch.long)
    T = 4.0
    kl_part = mutual_loss(own, [peer], y, temperature=T) - F.cross_entropy(own, y)
    (grad,) = torch.autograd.grad(kl_part, own)
    expected = T * (F.softmax(own / T, 1) - F.softmax(peer / T, 1)) / 8  # batchmean over 8 samples
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-4, atol=1e-6)


def test_independent_training_is_plain_cross_entropy():
    z = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert mutual_loss(z, [], y).item() == pytest.approx(F.cross_entropy(z, y).item())


def test_identical_peers_add_no_kl():
    z = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert mutual_loss(z, [z.clone()], y).item() == pytest.approx(F.cross_entropy(z, y).item(), abs=1e-6)
