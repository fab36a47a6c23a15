"""The public library API: dml.Cohort with a user's own models, optimizers and batches."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dml
from dml.peer_threads import flushes_denormals


class TinyNet(nn.Module):
    """A user's network: nothing of the package's registry."""

    def __init__(self, num_classes: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def _batches(n=3, batch=8, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _cohort(models, **options):
    options.setdefault("precision", "fp32")
    options.setdefault("device", "cpu")
    return dml.Cohort(models, [_sgd(m) for m in models], **options)


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_one_model_is_exactly_cross_entropy_training():
    model, reference = TinyNet(), TinyNet()
    ref_opt = _sgd(reference)
    with _cohort([model], loss=dml.MutualLoss(), plain=True) as cohort:
        for x, y in _batches():
            out = cohort.step(x, y)
            ref_opt.zero_grad()
            loss = F.cross_entropy(reference(x), y)
            loss.backward()
            ref_opt.step()
            assert torch.equal(out.losses[0], loss)
    assert torch.equal(_params(model), _params(reference))


def test_two_user_models_step_as_deep_mutual_learning_by_hand():
    models = [TinyNet(seed=1), TinyNet(seed=2)]
    hand = copy.deepcopy(models)
    hand_opts = [_sgd(m) for m in hand]
    loss = dml.MutualLoss(temperature=2.0, kl_weight=0.5)
    with _cohort(models, loss=loss, plain=True) as cohort:
        for x, y in _batches():
            out = cohort.step(x, y)
            logits = [m(x) for m in hand]
            for i, opt in enumerate(hand_opts):
                other = logits[1 - i].detach()
                expected = F.cross_entropy(logits[i], y) + 0.5 * 4.0 * F.kl_div(
                    F.log_softmax(logits[i] / 2, 1), F.log_softmax(other / 2, 1), reduction="batchmean",
                    log_target=True)
                opt.zero_grad()
                expected.backward(retain_graph=True)
                opt.step()
                torch.testing.assert_close(out.losses[i], expected)
    for mine, ref in zip(models, hand):
        torch.testing.assert_close(_params(mine), _params(ref), rtol=1e-5, atol=1e-6)
    assert [z.shape for z in out.logits] == [(8, 5), (8, 5)]


def test_evaluate_gives_per_peer_and_ensemble_top1_top5():
    # Scores that ignore the image: peer 0 ranks 0 > 1 > ... > 4, peer 1 ranks 4 > 3 > ... > 0.
    models = [TinyNet(), TinyNet()]
    with torch.no_grad():
        for m, bias in zip(models, ([5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5])):
            m.fc.weight.zero_()
            m.fc.bias.copy_(torch.tensor(bias))
    labels = torch.tensor([0, 0, 1, 4, 4, 4, 2, 3])
    x = torch.randn(8, 3, 8, 8)
    with _cohort(models) as cohort:
        result = cohort.evaluate([(x[:5], labels[:5]), (x[5:], labels[5:])])
    assert result.top1 == [25.0, 37.5]
    assert result.top5 == [100.0, 100.0]
    # the mean softmax ties every class in pairs (0 with 4, 1 with 3): argmax takes class 0
    assert result.ensemble_top1 == 25.0 and result.samples == 8
    assert all(m.training for m in models)


def test_state_dict_resumes_exactly():
    batches = _batches(4)
    first = _cohort([TinyNet(seed=1), TinyNet(seed=2)], schedulers=None)
    for x, y in batches[:2]:
        first.step(x, y)
    state = copy.deepcopy(first.state_dict())
    for x, y in batches[2:]:
        first.step(x, y)
    first.close()
    second = _cohort([TinyNet(seed=8), TinyNet(seed=9)])
    second.load_state_dict(state)
    for x, y in batches[2:]:
        second.step(x, y)
    second.close()
    for a, b in zip(first.peers, second.peers):
        assert torch.equal(_params(a.model), _params(b.model))


def test_default_path_restores_torchs_settings_when_closed():
    threads, flush = torch.get_num_threads(), flushes_denormals()
    cohort = dml.Cohort([TinyNet(), TinyNet()], [_sgd(TinyNet()), _sgd(TinyNet())], device="cpu")
    assert flushes_denormals()  # denormals flushed while the cohort trains on a CPU
    cohort.close()
    assert (torch.get_num_threads(), flushes_denormals()) == (threads, flush)


def test_a_cohort_closes_what_it_made_and_leaves_what_it_was_given():
    from dml.distributed import LocalExchange
    from dml.runtime import Runtime

    runtime, exchange = Runtime("cpu", "fp32", plain=True, num_peers=2), LocalExchange(2)
    models, runner = [TinyNet(), TinyNet(seed=1)], runtime.runner
    with dml.Cohort(models, [_sgd(m) for m in models], runtime=runtime, exchange=exchange) as cohort:
        assert cohort.runtime is runtime and cohort.exchange is exchange
        cohort.step(*_batches(1)[0])
    assert runtime.runner is runner  # not closed: still the caller's
    runtime.close()


def test_entries_of_peers_another_process_holds_may_be_none():
    from dml.distributed import LocalExchange

    class SecondOfTwo(LocalExchange):  # this process holds peer 1 only
        def __init__(self):
            super().__init__(2)
            self.local_indices = [1]

    model = TinyNet()
    with dml.Cohort([None, model], [None, _sgd(model)], loss=dml.Links.mutual(2), device="cpu",
                    exchange=SecondOfTwo()) as cohort:
        assert [p.index for p in cohort.peers] == [1] and cohort.peers[0].model is model
    with pytest.raises(TypeError, match="model 1 is a NoneType"):
        dml.Cohort([model, None], [_sgd(model), None], loss=dml.Links.mutual(2), device="cpu")


def test_mistakes_are_value_errors():
    with pytest.raises(ValueError, match="2 models need as many optimizers"):
        dml.Cohort([TinyNet(), TinyNet()], [_sgd(TinyNet())], device="cpu")
    with pytest.raises(ValueError, match="update 'sideways'"):
        _cohort([TinyNet()], update="sideways")
    with pytest.raises(ValueError, match="temperature"):
        dml.MutualLoss(temperature=0)
    with pytest.raises(ValueError, match="at least one model"):
        dml.Cohort([], [])
    nets = [TinyNet(), TinyNet(seed=1)]
    with pytest.raises(TypeError, match="loss must be a dml.MutualLoss or dml.Links, not function"):
        dml.Cohort(nets, [_sgd(n) for n in nets], loss=lambda *a: 0, device="cpu")
    with pytest.raises(ValueError, match="the links are for 3 peers; the cohort has 2 models"):
        dml.Cohort(nets, [_sgd(n) for n in nets], loss=dml.Links.mutual(3), device="cpu")
    with pytest.raises(ValueError, match="peer 0: the links say it is frozen, but its optimizer is not None"):
        dml.Cohort(nets, [_sgd(n) for n in nets], loss=dml.Links.mutual(2, frozen=[0]), device="cpu")
    with pytest.raises(ValueError, match="the links say it is not frozen, but its optimizer is None"):
        dml.Cohort(nets, [_sgd(nets[0]), None], loss=dml.Links.mutual(2), device="cpu")


def test_peers_whose_logits_do_not_fit_are_named_before_any_step():
    models = [TinyNet(5), TinyNet(7)]
    before = [_params(m) for m in models]
    x, y = _batches(1)[0]
    with _cohort(models) as cohort, pytest.raises(ValueError) as caught:
        cohort.step(x, y)
    assert str(caught.value) == ("peer 1_tinynet returns logits of shape (2, 7) for a batch of 2 inputs; expected "
                                 "logits of shape (2, 5), as peer 0_tinynet returns")
    assert isinstance(caught.value, dml.cohort.PeerOutputError) and caught.value.index == 1
    assert all(torch.equal(b, _params(m)) for b, m in zip(before, models))  # nothing was trained

    class Pair(TinyNet):
        def forward(self, x):
            return super().forward(x), x

    with _cohort([Pair()], names=["pair"]) as cohort, pytest.raises(ValueError, match=(
            r"^peer 0_pair returns a tuple, not a tensor of logits for a batch of 2 inputs; expected logits of "
            r"shape \(2, classes\)$")):
        cohort.step(x, y)
    with _cohort([TinyNet(5)]) as cohort, pytest.raises(ValueError, match=r"returns logits of shape \(2, 5\) .*"
                                                                           r"expected logits of shape \(2, 10\)$"):
        cohort.check_batch(x, num_classes=10)


@pytest.mark.parametrize("labels, found", [([0, 1, 5], "from 0 to 5"), ([-1, 0, 4], "from -1 to 4")])
def test_labels_out_of_range_are_a_value_error_not_a_device_assert(labels, found):
    model = TinyNet(5)
    before = _params(model)
    with _cohort([model, TinyNet(5, seed=1)]) as cohort, pytest.raises(ValueError) as caught:
        cohort.step(torch.randn(3, 3, 8, 8), torch.tensor(labels))
    assert str(caught.value) == \
        f"labels must be class indices in 0..4 (the peers return 5 logits), found labels {found}"
    assert torch.equal(before, _params(model))
    with _cohort([TinyNet(5)]) as cohort, pytest.raises(ValueError, match=r"labels of shape \(3, 1\) for a batch of 3 "
                                                                          r"inputs; expected \(3,\)"):
        cohort.step(torch.randn(3, 3, 8, 8), torch.zeros(3, 1, dtype=torch.long))


class NoisyNet(TinyNet):
    """BatchNorm statistics and dropout: what a careless shape check would move or draw from."""

    def __init__(self, seed: int = 0):
        super().__init__(seed=seed)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean((2, 3))))


def test_the_shape_check_changes_nothing_training_computes():
    model = NoisyNet()
    model.bn.eval()  # a module the user keeps in evaluation mode stays so
    reference = copy.deepcopy(model)
    with _cohort([model]) as cohort:
        x, y = _batches(1)[0]
        rng = torch.get_rng_state()
        assert cohort.check_batch(x, y) == 5
        assert torch.equal(torch.get_rng_state(), rng)
        assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    # the check a first step makes leaves training bit-identical to a loop without it
    model, reference = NoisyNet(seed=3), NoisyNet(seed=3)
    ref_opt = _sgd(reference)
    torch.manual_seed(11)
    with _cohort([model], plain=True) as cohort:
        for x, y in _batches():
            cohort.step(x, y)
    torch.manual_seed(11)
    for x, y in _batches():
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


TORCHRUN_SCRIPT = '''
import os, sys
import torch
import dml
from torch import nn

torch.set_num_threads(1)
models = []
for seed in (1, 2, 3):
    torch.manual_seed(seed)
    models.append(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, 5)))
optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
g = torch.Generator().manual_seed(0)
batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(3)]
with dml.Cohort(models, optimizers, precision="fp32", device="cpu", plain=True) as cohort:
    for x, y in batches:
        cohort.step(x, y)
    result = cohort.evaluate(batches)
    state = {p.index: p.model.state_dict() for p in cohort.peers}
torch.save({"params": state, "ensemble": result.ensemble_top1}, f"{sys.argv[1]}/rank{os.environ.get('RANK', 0)}.pt")
'''


@pytest.mark.processes
def test_cohort_under_torchrun_matches_one_process(tmp_path):
    """3 peers over 2 processes (peers 0-1 and 2): the same weights and ensemble as one process."""
    import os
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(tmp_path / "two")], env=env, check=True, timeout=300, capture_output=True)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1)]
    assert sorted(ranks[0]["params"]) == [0, 1] and sorted(ranks[1]["params"]) == [2]
    for rank in ranks:
        assert rank["ensemble"] == one["ensemble"]
        for index, params in rank["params"].items():
            for key, value in params.items():
                assert torch.equal(value, one["params"][index][key]), (index, key)


def test_the_library_computes_in_the_models_own_precision_unless_asked():
    """A cohort of the user's models does not autocast them behind their back: fp32 in, fp32 out."""
    models = [TinyNet(), TinyNet()]
    with dml.Cohort(models, [_sgd(m) for m in models], device="cpu") as cohort:
        out = cohort.step(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))
        assert all(z.dtype == torch.float32 for z in out.logits)
    with dml.Cohort(models, [_sgd(m) for m in models], device="cpu", precision="auto") as cohort:
        out = cohort.step(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))
        assert all(z.dtype == torch.bfloat16 for z in out.logits)  # the fast path, as dml train runs


def test_what_the_readme_promises_of_step_and_evaluate():
    models = [TinyNet(seed=1), TinyNet(seed=2)]
    optimizers = [_sgd(m) for m in models]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in optimizers]
    with dml.Cohort(models, optimizers, device="cpu", schedulers=schedulers) as cohort:
        cohort.step(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))
        assert [o.param_groups[0]["lr"] for o in optimizers] == [0.1, 0.1]  # schedulers are the caller's to step
        assert [s.last_epoch for s in schedulers] == [0, 0]
        models[1].eval()
        cohort.evaluate([(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,)))])
        assert [m.training for m in models] == [True, False]  # each left in the mode it was in


def test_the_public_names_are_importable_from_dml():
    for name in dml.__all__:
        assert getattr(dml, name) is not None
    assert dml.load_image_folder.__module__ == "dml.data.folder"
