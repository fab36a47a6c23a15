"""Links: every peer's objective against hand computations, for each combination of link and gate."""

import copy
import math

import pytest
import torch

import dml
from dml.links import ENSEMBLE, Link, Links, Progress, linear_ramp
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
        got = links.objective(0, logits[0], logits, y, progress=Progress(epoch, epochs, fraction=0.5))
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
    z1 = logits[1].clone().requires_grad_()  # a source with a graph: the link reads it detached all the same
    Links.mutual(2).objective(0, z0, [z0.detach(), z1], y).backward()
    p0 = _p(logits[0])
    onehot = torch.nn.functional.one_hot(y, C).double()
    # d/dz0 of CE + KL(p1 || p0), averaged over the batch: (p0 - onehot + p0 - p1) / B
    close(z0.grad, (2 * p0 - onehot - _p(logits[1])) / B)
    assert z1.grad is None
    # the ensemble and a group too
    z1 = logits[1].clone().requires_grad_()
    Links([Link(ENSEMBLE, 0), Link((1,), 0)], 2).objective(0, z0, [z0, z1], y).backward()
    assert z1.grad is None


@pytest.mark.parametrize("links, message", [
    (lambda: Links([Link(0, 1)], 2, frozen=[1]), "frozen"),
    (lambda: Links([Link(0, 3)], 2), "no peer 3"),
    (lambda: Links([Link(0, 1), Link(0, 1)], 2), "twice"),
    (lambda: Links([], 1, combine="max"), "combine"),
    (lambda: Link(0, 1, gate="sometimes"), "gate"),
    (lambda: Link(0, 1, temperature=0.0), "temperature"),
    (lambda: Link(0, 1, weight=-1.0), "weight"),
    (lambda: Link(0, 1, gate="cosine_ramp"), "gate 'cosine_ramp' is not one of"),
    (lambda: Link(0, 1, gate="sigmoid_ramp", ramp_epochs=0.0), "ramp_epochs must be a positive"),
    (lambda: Link(0, 1, gate="linear_ramp", ramp_epochs=-2.0), "ramp_epochs must be a positive"),
    (lambda: Link(0, 1, ramp_epochs=5.0), "length of a ramp gate"),
    (lambda: Link(0, 0, standardize=True), "not to the self link"),
    (lambda: Link("mean", 0), "not 'mean'"),
    (lambda: Link(0, ENSEMBLE), "a link's target is a peer's index"),
    (lambda: Links([Link(ENSEMBLE, 0)], 1, frozen=[0]), "at least one trainable peer"),
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


# --- online distillation: step-wise ramps, the ensemble, standardised logits, the two terms ----------
def _z(z):
    """Logits z-scored per sample by hand: mean 0, sample standard deviation (n - 1) 1."""
    centred = z - z.mean(1, keepdim=True)
    return centred / torch.sqrt((centred**2).sum(1, keepdim=True) / (z.shape[1] - 1))


# (progress, ramp_epochs, t): t = min(1, epochs done / ramp length), the epoch's steps counting as a fraction
RAMP_POINTS = [(Progress(1, 10, 0.0), None, 0.0), (Progress(3, 10, 0.25), None, 0.225),
               (Progress(2, 10, 0.5), 4.0, 0.375), (Progress(7, 10, 0.0), 4.0, 1.0), (Progress(1, 3, 0.5), 0.25, 1.0)]


@pytest.mark.parametrize("gate, factor", [("linear_ramp", lambda t: t),
                                          ("sigmoid_ramp", lambda t: math.exp(-5.0 * (1.0 - t) ** 2))])
@pytest.mark.parametrize("progress, ramp_epochs, t", RAMP_POINTS)
def test_ramp_gates_scale_the_term_by_their_curve_at_the_fraction_of_training_done(gate, factor, progress,
                                                                                 ramp_epochs, t):
    logits, y = _batch(2)
    links = Links([Link(1, 0, temperature=2.0, gate=gate, ramp_epochs=ramp_epochs)], 2)
    expected = _ce(logits[0], y).mean() + factor(t) * 4.0 * _kl(logits[1], logits[0], 2.0).mean()
    close(links.objective(0, logits[0], logits, y, progress), expected)


def test_sigmoid_ramp_values_by_hand():
    links = Links([Link(1, 0, gate="sigmoid_ramp", ramp_epochs=2.0)], 2)
    logits, y = _batch(2)
    kl = _kl(logits[1], logits[0]).mean()
    # exp(-5 (1 - t)^2) at t = 0, 0.5, 1: 0.006738, 0.286505, 1
    for progress, value in ((Progress(1, 9), 0.006737947), (Progress(2, 9), 0.286504797), (Progress(3, 9), 1.0)):
        _, kd = links.terms(0, logits[0], logits, y, progress)
        close(kd, value * kl)


def test_the_ensemble_is_the_mean_of_the_trainable_peers_logits():
    logits, y = _batch(3, scale=4.0)
    links = Links([Link(ENSEMBLE, 0, temperature=3.0), Link(ENSEMBLE, 1, temperature=3.0)], 3, frozen=[2])
    sources = links.sources(logits)
    mean = (logits[0] + logits[1]) / 2  # the frozen peer 2 is not part of it
    for i in (0, 1):
        expected = _ce(logits[i], y).mean() + 9.0 * _kl(mean, logits[i], 3.0).mean()
        close(links.objective(i, logits[i], sources, y), expected)
        close(links.objective(i, logits[i], logits, y), expected)  # the peers' logits alone: it makes the mean
    with pytest.raises(ValueError, match="2 sets of logits for a cohort of 3"):
        links.objective(0, logits[0], logits[:2], y)
    # what other readings of "the ensemble" would give differs from it by far more than the tolerance
    of_probabilities = torch.log((_p(logits[0], 3.0) + _p(logits[1], 3.0)) / 2) * 3.0
    with_the_teacher = (logits[0] + logits[1] + logits[2]) / 3
    for other in (of_probabilities, with_the_teacher):
        assert (_kl(other, logits[0], 3.0).mean() - _kl(mean, logits[0], 3.0).mean()).abs() > 1e-3


def test_kdcl_with_dml_links_averages_the_ensemble_with_the_peer():
    logits, y = _batch(2, seed=5)
    links = Links([Link(1, 0), Link(ENSEMBLE, 0, temperature=2.0, weight=0.5)], 2)
    mean = (logits[0] + logits[1]) / 2
    expected = _ce(logits[0], y).mean() + (_kl(logits[1], logits[0]).mean()
                                           + 0.5 * 4.0 * _kl(mean, logits[0], 2.0).mean()) / 2
    close(links.objective(0, logits[0], links.sources(logits), y), expected)
    assert [link.source for link in links.links if link.target == 0] == [0, 1, ENSEMBLE]  # the stored order


def test_a_standardised_link_compares_z_scored_logits():
    logits, y = _batch(2, seed=7)
    logits[1] = logits[1] * 6.0 + 2.0  # another scale and offset: z-scoring takes both away
    links = Links([Link(1, 0, temperature=2.0, standardize=True)], 2)
    expected = _ce(logits[0], y).mean() + 4.0 * _kl(_z(logits[1]), _z(logits[0]), 2.0).mean()
    close(links.objective(0, logits[0], logits, y), expected)
    rescaled = [logits[0], logits[1] / 6.0 - 5.0]
    close(links.objective(0, logits[0], rescaled, y), expected)
    # the population standard deviation (n) or no standardisation would give other values
    biased = _z(logits[1]) * math.sqrt((C - 1) / C), _z(logits[0]) * math.sqrt((C - 1) / C)
    assert (_kl(*biased, 2.0).mean() - _kl(_z(logits[1]), _z(logits[0]), 2.0).mean()).abs() > 1e-3
    assert (_kl(logits[1], logits[0], 2.0).mean() - _kl(_z(logits[1]), _z(logits[0]), 2.0).mean()).abs() > 1e-3


def test_the_two_terms_are_the_weighted_cross_entropy_and_the_combined_distillation():
    logits, y = _batch(3)
    links = Links([Link(0, 0, weight=0.5), Link(1, 0, 2.0, 3.0), Link(2, 0, gate="cutoff")], 3)
    ce, kd = links.terms(0, logits[0], logits, y)
    close(ce, 0.5 * _ce(logits[0], y).mean())
    close(kd, 3.0 * 4.0 * _kl(logits[1], logits[0], 2.0).mean() / 2)
    assert links.terms(1, logits[1], logits, y)[1] is None  # no link into peer 1 from another


def test_a_cohort_moves_its_ramp_with_every_step():
    nets = [_net(1), _net(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    links = Links.mutual(2, temperature=2.0, gate="sigmoid_ramp", ramp_epochs=1.0)
    g = torch.Generator().manual_seed(0)
    with dml.Cohort(nets, opts, loss=links, device="cpu", precision="fp32", plain=True) as cohort:
        with pytest.raises(ValueError, match="steps_per_epoch"):
            cohort.set_epoch(1, 3)
        for epoch in (1, 2):
            cohort.set_epoch(epoch, 3, steps_per_epoch=4)
            for step in range(4):
                x, y = torch.randn(16, 3, 2, 2, generator=g), torch.randint(0, C, (16,), generator=g)
                out = cohort.step(x, y)
                t = min(1.0, (epoch - 1 + step / 4) / 1.0)
                z = [zi.detach().double() for zi in out.logits]
                close(out.ce[0], _ce(z[0], y).mean())
                close(out.kd[0], math.exp(-5.0 * (1.0 - t) ** 2) * 4.0 * _kl(z[1], z[0], 2.0).mean())
                close(out.losses[0], out.ce[0] + out.kd[0])


# --- temporal means (MeanOf) ----------------------------------------------------------------------------
def test_a_temporal_mean_teaches_as_it_was_and_follows_its_source_after_every_step():
    """The t-th step moves the mean's weights by a_t = max(1/t, 1 - decay) toward its source's: with decay 0.9
    the plain average for 10 steps (a copy after the first), then 0.1 per step. It teaches in training mode
    (the batch's statistics), and its running statistics are its own, moved by that forward pass."""
    nets = [_net(1), _net(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.5, momentum=0.9) for n in nets]
    links = Links([Link(2, 0, temperature=2.0), Link(ENSEMBLE, 1)], 3, frozen=[2])
    expected = {k: v.detach().double().clone() for k, v in nets[0].named_parameters()}  # a copy at the start
    g = torch.Generator().manual_seed(0)
    with dml.Cohort([nets[0], nets[1], None], [opts[0], opts[1], dml.MeanOf(0, decay=0.9)], loss=links,
                    device="cpu", precision="fp32", plain=True) as cohort:
        mean = cohort.peers[2].model
        assert mean is not nets[0] and mean.training and not any(q.requires_grad for q in mean.parameters())
        for t in range(1, 13):
            x, y = torch.randn(16, 3, 2, 2, generator=g), torch.randint(0, C, (16,), generator=g)
            shadow = copy.deepcopy(mean)
            with torch.no_grad():
                before = shadow(x)
            out = cohort.step(x, y)
            close(out.logits[2], before)  # it teaches as it was before the step, with the batch's statistics
            z = [zi.detach().double() for zi in out.logits]
            close(out.kd[0], 4.0 * _kl(z[2], z[0], 2.0).mean())
            close(out.kd[1], _kl((z[0] + z[1]) / 2, z[1]).mean())  # the ensemble: peers 0 and 1, not the mean
            source = dict(nets[0].named_parameters())
            for name, value in mean.named_parameters():
                a = max(1.0 / t, 0.1)
                expected[name] = (1.0 - a) * expected[name] + a * source[name].double()
                close(value, expected[name])
            for (name, own), (_, moved) in zip(mean.named_buffers(), shadow.named_buffers()):
                assert torch.equal(own, moved), name  # what its own forward pass left, not its source's
        assert not torch.allclose(mean[2].running_mean, nets[0][2].running_mean)
        states = cohort.state_dict()["peers"]
        assert [(s["index"], s.get("mean_of"), s.get("decay"), s.get("updates")) for s in states] == [
            (0, None, None, None), (1, None, None, None), (2, 0, 0.9, 12)]
        assert states[2].keys() >= {"model", "best_acc"} and "optimizer" not in states[2]


def test_a_mean_saved_without_its_step_count_continues_past_the_warm_up():
    """Files written before the warm-up hold no count: such a mean goes on at 1 - decay, as it started."""
    nets = [_net(1), _net(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in nets]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 2, 2, generator=g), torch.randint(0, C, (16,), generator=g)) for _ in range(3)]
    with dml.Cohort([nets[0], nets[1], None], [opts[0], opts[1], dml.MeanOf(0, decay=0.9)],
                    device="cpu", precision="fp32", plain=True) as cohort:
        for x, y in batches[:2]:
            cohort.step(x, y)
        state = cohort.state_dict()
        del state["peers"][2]["updates"]
        cohort.load_state_dict(state)
        before = {k: v.clone() for k, v in cohort.peers[2].model.named_parameters()}
        cohort.step(*batches[2])
        for name, value in cohort.peers[2].model.named_parameters():
            close(value, 0.9 * before[name].double() + 0.1 * dict(nets[0].named_parameters())[name].double())


@pytest.mark.parametrize("updates", [-1, 1.5, float("nan"), True, None])
def test_a_mean_refuses_a_step_count_it_would_trip_on(updates):
    """A negative count divides by zero steps later; NaN turns every weight of the mean into NaN."""
    nets = [_net(1), _net(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in nets]
    with dml.Cohort([nets[0], nets[1], None], [opts[0], opts[1], dml.MeanOf(0, decay=0.9)],
                    device="cpu", precision="fp32", plain=True) as cohort:
        state = cohort.state_dict()
        state["peers"][2]["updates"] = updates
        with pytest.raises((ValueError, TypeError), match="updates"):
            cohort.load_state_dict(state)


@pytest.mark.parametrize("make, message", [
    (lambda o: [o[0], o[1], dml.MeanOf(2)], "cannot be the mean of itself"),
    (lambda o: [o[0], None, dml.MeanOf(1)], "which is frozen"),
    (lambda o: [o[0], dml.MeanOf(0), dml.MeanOf(1)], "which is a mean itself"),
    (lambda o: [o[0], o[1], dml.MeanOf(5)], "not in a cohort of 3"),
    (lambda o: [o[0], o[1], dml.MeanOf(0, decay=0.0)], "decay must be a number between 0 and 1"),
    (lambda o: [o[0], o[1], dml.MeanOf(0, decay=1.0)], "decay must be a number between 0 and 1"),
    (lambda o: [o[0], o[1], dml.MeanOf(0, decay=-0.5)], "decay must be a number between 0 and 1"),
])
def test_a_temporal_mean_follows_a_peer_that_trains(make, message):
    nets = [_net(1), _net(2), None]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets[:2]]
    with pytest.raises(ValueError, match=message):
        dml.Cohort(nets, make(opts), device="cpu")


def test_a_temporal_mean_given_its_own_network_starts_from_its_sources_weights():
    nets = [_net(1), _net(2), _net(3)]
    opt = torch.optim.SGD(nets[0].parameters(), lr=0.1)
    with dml.Cohort(nets[:2], [opt, dml.MeanOf(0)], loss=Links([], 2, frozen=[1]), device="cpu") as cohort:
        for name, value in cohort.peers[1].model.state_dict().items():
            assert torch.equal(value, nets[0].state_dict()[name]), name
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, C))
    with pytest.raises(ValueError, match="not built like peer 0"):
        dml.Cohort([nets[0], other], [opt, dml.MeanOf(0)], loss=Links([], 2, frozen=[1]), device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_the_fp32_objective_of_their_values(dtype):
    """Under autocast peers return bf16 (or fp16) logits: every term is computed in fp32 from those values and
    equals the fp32 computation on the same numbers (in bf16 a softmax is off by up to 2^-8)."""
    logits, y = _batch(4)
    half = [z.to(dtype) for z in logits]
    full = [z.float() for z in half]  # the same values, in fp32
    links = Links([Link(1, 0, temperature=3.0), Link(ENSEMBLE, 0), Link("others", 1, gate="correct"),
                   Link((0, 2), 1, standardize=True), Link(3, 2, weight=0.5), Link(2, 2, gate="correct")], 4,
                  frozen=[3])
    for target in (0, 1, 2):
        ce_half, kd_half = links.terms(target, half[target].requires_grad_(), half, y)
        ce_full, kd_full = links.terms(target, full[target], full, y)
        assert torch.equal(ce_half.float(), ce_full) and torch.equal(kd_half.float(), kd_full), target
        assert ce_half.dtype == kd_half.dtype == torch.float32
    got = mutual_loss(half[0], half[1:], y, temperature=2.0)
    assert torch.equal(got.float(), mutual_loss(full[0], full[1:], y, temperature=2.0)) and got.dtype == torch.float32


def test_a_temporal_mean_need_not_be_listed_as_frozen_and_a_link_into_it_is_named():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with dml.Cohort([net, None], [opt, dml.MeanOf(0)], loss=dml.Links([Link(1, 0, temperature=2.0)], 2),
                    device="cpu") as cohort:
        assert cohort.links.frozen == {1} and cohort.links.trainable == [0]
        for _ in range(3):  # a mean copies its source at its first update: from the third step it differs
            out = cohort.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))
        assert out.kd[0].item() > 0  # the mean teaches peer 0
    with pytest.raises(ValueError, match=r"link 0 -> 1 leads into peer 1, a temporal mean \(dml.MeanOf\)"):
        dml.Cohort([net, None], [opt, dml.MeanOf(0)], loss=dml.Links.mutual(2), device="cpu")


def test_a_link_from_the_ensemble_into_the_only_trainable_peer_is_refused():
    with pytest.raises(ValueError, match="the ensemble is the mean of the trainable peers, here peer 0 alone"):
        Links([Link(ENSEMBLE, 0)], 2, frozen=[1])
