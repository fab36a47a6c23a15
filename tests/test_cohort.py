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
            for i, (m, opt) in enumerate(zip(hand, hand_opts)):
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


def test_mistakes_are_value_errors():
    with pytest.raises(ValueError, match="2 models need as many optimizers"):
        dml.Cohort([TinyNet(), TinyNet()], [_sgd(TinyNet())], device="cpu")
    with pytest.raises(ValueError, match="update 'sideways'"):
        _cohort([TinyNet()], update="sideways")
    with pytest.raises(ValueError, match="temperature"):
        dml.MutualLoss(temperature=0)
    with pytest.raises(ValueError, match="at least one model"):
        dml.Cohort([], [])


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
