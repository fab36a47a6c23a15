"""Links: every peer's objective against hand computations, for each combination of link and gate."""

import copy

import pytest
import torch

import dml
from dml.links import Link, Links, linear_ramp
from dml.loss import mutual_loss

B, C = 8, 5


def _batch(num_peers=3, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B, C, generator=g, dtype=torch.float64) * scale for _ in range(num_peers)]
    labels = torch.randint(0, C, (B,), generator=g)
    return logits, labels


def close(got, expected):
    """Equal up to float32 rounding (the objective computes in float32)."""
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-5, atol=1e-6)


def _p(z, t=1.0):
    """softmax by hand."""
    e = torch.exp(z / t - (z / t).max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def _ce(z, y):
    """per-sample cross-entropy by hand."""
    return -torch.log(_p(z)[torch.arange(len(y)), y])


def _kl(src, z, t=1.0):
    """per-sample KL(p_src || p_z) at temperature t, by hand."""
    p, q = _p(src, t), _p(z, t)
    return (p * (torch.log(p) - torch.log(q))).sum(1)


def test_plain_dml_as_links_is_bit_identical_to_mutual_loss():
    for temperature, weight in ((1.0, 1.0), (2.0, 0.5), (4.0, 3.0)):
        logits, y = _batch(3)
        logits = [z.float() for z in logits]
        links = Links.mutual(3, temperature, weight)
        for i in range(3):
            others = [z for j, z in enumerate(logits) if j != i]
            expected = mutual_loss(logits[i], others, y, temperature, weight)
            assert torch.equal(links.objective(i, logits[i], logits, y), expected)


def test_independent_training_is_cross_entropy():
    logits, y = _batch(1)
    links = Links([], 1)
    assert links.links == [Link(0, 0)]  # the self link a trainable peer always has
    close(links.objective(0, logits[0], logits, y), _ce(logits[0], y).mean())


def test_kd_link_from_a_frozen_teacher_by_hand():
    (student, teacher), y = _batch(2)
    links = Links([Link(1, 0, temperature=2.0, weight=0.7)], 2, frozen=[1])
    expected = _ce(student, y).mean() + 0.7 * 4.0 * _kl(teacher, student, 2.0).mean()
    close(links.objective(0, student, [student, teacher], y), expected)


@pytest.mark.parametrize("combine, divisor", [("mean", 2.0), ("sum", 1.0)])
def test_links_with_their_own_temperatures_and_weights_combine_by_mean_or_sum(combine, divisor):
    logits, y = _batch(3)
    links = Links([Link(0, 0, weight=0.5), Link(1, 0, 3.0, 2.0), Link(2, 0, 1.5, 0.25)], 3, combine)
    expected = 0.5 * _ce(logits[0], y).mean() + (
        2.0 * 9.0 * _kl(logits[1], logits[0], 3.0).mean() + 0.25 * 2.25 * _kl(logits[2], logits[0], 1.5).mean()
    ) / divisor
    close(links.objective(0, logits[0], logits, y), expected)


def test_a_peer_learns_only_from_its_sources():
    logits, y = _batch(3)
    links = Links([Link(2, 0)], 3)  # 0 learns from 2 only; 1 and 2 train alone
    close(links.objective(0, logits[0], logits, y),
                               _ce(logits[0], y).mean() + _kl(logits[2], logits[0]).mean())
    close(links.objective(1, logits[1], logits, y), _ce(logits[1], y).mean())


def test_cutoff_gate_removes_the_term_but_counts_in_the_mean():
    logits, y = _batch(3)
    links = Links([Link(1, 0, gate="cutoff"), Link(2, 0)], 3)
    expected = _ce(logits[0], y).mean() + _kl(logits[2], logits[0]).mean() / 2
    close(links.objective(0, logits[0], logits, y), expected)


def test_linear_gate_ramps_from_zero_at_the_first_epoch_to_one_at_the_last():
    assert [linear_ramp(e, 5) for e in range(1, 6)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert linear_ramp(1, 1) == 1.0
    logits, y = _batch(2)
    links = Links([Link(1, 0, temperature=2.0, gate="linear")], 2)
    ce, kl = _ce(logits[0], y).mean(), 4.0 * _kl(logits[1], logits[0], 2.0).mean()
    for epoch, epochs in ((1, 4), (2, 4), (4, 4)):
        got = links.objective(0, logits[0], logits, y, progress=linear_ramp(epoch, epochs))
        close(got, ce + (epoch - 1) / 3 * kl)
    with pytest.raises(ValueError, match="set_epoch"):
        links.objective(0, logits[0], logits, y)


def test_correct_gate_counts_only_samples_the_source_gets_right():
    logits, y = _batch(2, seed=3)
    y = logits[1].argmax(1).clone()
    y[::2] = (y[::2] + 1) % C  # the source is wrong on every other sample
    mask = (logits[1].argmax(1) == y).double()
    assert 0 < mask.sum() < B
    links = Links([Link(1, 0, gate="correct")], 2)
    expected = _ce(logits[0], y).mean() + (_kl(logits[1], logits[0]) * mask).sum() / B
    close(links.objective(0, logits[0], logits, y), expected)
    # on the self link, the peer's own correct samples
    self_gated = Links([Link(0, 0, gate="correct")], 1)
    own = (logits[0].argmax(1) == y).double()
    close(self_gated.objective(0, logits[0], logits[:1], y), (_ce(logits[0], y) * own).sum() / B)


def test_gradients_flow_into_the_target_only():
    logits, y = _batch(2)
    z0 = logits[0].clone().requires_grad_()
    Links.mutual(2).objective(0, z0, [z0.detach(), logits[1]], y).backward()
    p0 = _p(logits[0])
    onehot = torch.nn.functional.one_hot(y, C).double()
    # d/dz0 of CE + KL(p1 || p0), averaged over the batch: (p0 - onehot + p0 - p1) / B
    close(z0.grad, (2 * p0 - onehot - _p(logits[1])) / B)


@pytest.mark.parametrize("links, message", [
    (lambda: Links([Link(0, 1)], 2, frozen=[1]), "frozen"),
    (lambda: Links([Link(0, 3)], 2), "no peer 3"),
    (lambda: Links([Link(0, 1), Link(0, 1)], 2), "twice"),
    (lambda: Links([], 1, combine="max"), "combine"),
    (lambda: Link(0, 1, gate="sometimes"), "gate"),
    (lambda: Link(0, 1, temperature=0.0), "temperature"),
    (lambda: Link(0, 1, weight=-1.0), "weight"),
])
def test_bad_links_are_refused(links, message):
    with pytest.raises(ValueError, match=message):
        links()


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, C))


def test_a_frozen_teacher_never_changes_and_the_student_steps_on_the_kd_objective():
    teacher, student = _net(1), _net(2)
    for _ in range(3):  # some BatchNorm statistics, so that eval mode differs from training mode
        teacher(torch.randn(32, 3, 2, 2))
    expected_teacher = copy.deepcopy(teacher).eval()
    reference = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    links = Links([Link(1, 0, temperature=2.0)], 2, frozen=[1])
    g = torch.Generator().manual_seed(0)
    with dml.Cohort([student, teacher], [opt, None], loss=links, precision="fp32", device="cpu", plain=True) as cohort:
        for _ in range(3):
            x, y = torch.randn(16, 3, 2, 2, generator=g), torch.randint(0, C, (16,), generator=g)
            out = cohort.step(x, y)
            with torch.no_grad():
                z_teacher = expected_teacher(x)
            close(out.logits[1], z_teacher)  # evaluation mode: running statistics
            z = reference(x)
            loss = _ce(z.double(), y).mean() + 4.0 * _kl(z_teacher.double(), z.double(), 2.0).mean()
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()
            close(out.losses[0], loss)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        result = cohort.evaluate([(x, y)])
        assert not teacher.training  # evaluation leaves the teacher in evaluation mode
        assert len(cohort.state_dict()["peers"]) == 1  # teachers are not saved
    for a, b in zip(teacher.state_dict().values(), expected_teacher.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(student.parameters(), reference.parameters()):
        close(a, b)
    # the ensemble is the student's alone: the teacher is not part of it
    assert result.ensemble_top1 == result.top1[0]


def test_the_cohort_checks_links_against_its_frozen_peers():
    nets = [_net(1), _net(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    with pytest.raises(ValueError, match="frozen"):
        dml.Cohort(nets, [opts[0], None], loss=Links([Link(1, 0)], 2), device="cpu")
    with pytest.raises(ValueError, match="frozen"):
        dml.Cohort(nets, [opts[0], None], loss=Links([Link(0, 1)], 2, frozen=[1]), device="cpu")


def test_linear_gates_in_a_cohort_need_set_epoch_and_start_as_cross_entropy():
    nets = [_net(1), _net(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    x, y = torch.randn(16, 3, 2, 2), torch.randint(0, C, (16,))
    with dml.Cohort(nets, opts, loss=Links.mutual(2, gate="linear"), device="cpu", precision="fp32",
                    plain=True) as cohort:
        with pytest.raises(ValueError, match="set_epoch"):
            cohort.step(x, y)
        cohort.set_epoch(1, 10)
        out = cohort.step(x, y)
    close(out.losses[0], torch.nn.functional.cross_entropy(out.logits[0], y))


def test_a_cohort_that_cannot_be_built_leaves_torchs_settings_alone():
    threads = torch.get_num_threads()
    nets = [_net(1), _net(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]

    class Broken(torch.nn.Module):
        def to(self, *args, **kwargs):
            raise RuntimeError("cannot move")

    with pytest.raises(ValueError):
        dml.Cohort(nets, [opts[0], None], loss=Links([Link(1, 0)], 2), device="cpu")
    with pytest.raises(RuntimeError, match="cannot move"):
        dml.Cohort([nets[0], Broken()], opts, device="cpu")
    assert torch.get_num_threads() == threads
