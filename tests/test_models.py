import pytest
import torch

from dml.models import MODEL_NAMES, count_parameters, create_model
from dml.models.cifar_resnet import ZeroPadShortcut

# Published parameter counts for 100 classes, one for every registered model: a new model needs its count here.
EXPECTED = {
    "resnet20": 275_572,
    "resnet32": 470_004,
    "resnet44": 664_436,
    "resnet56": 858_868,
    "resnet110": 1_733_812,
    "wrn28_2": 1_479_220,
    "wrn28_10": pytest.approx(36_500_000, abs=100_000),  # 36.5 M: the published WRN-28-10 size, to three digits
    "resnet18": 11_227_812,  # the ImageNet networks' standard counts (below) less 900 classes' weights and biases
    "resnet50": 23_712_932,
}
IMAGENET = ["resnet18", "resnet50"]
RESNETS = [name for name in MODEL_NAMES if name.startswith("resnet") and name not in IMAGENET]  # CIFAR's
# All but the 36.5 M-parameter wrn28_10, whose size test_parameter_counts checks.
SMALL = [name for name in MODEL_NAMES if name != "wrn28_10"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts(name):
    assert set(EXPECTED) == set(MODEL_NAMES)
    assert count_parameters(create_model(name, 100)) == EXPECTED[name]


@pytest.mark.parametrize("name", ["resnet20", "wrn28_2"])
def test_forward_shape(name):
    model = create_model(name, 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, count", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnets_have_the_standard_size_for_1000_classes(name, count):
    model = create_model(name, 1000)
    assert count_parameters(model) == count
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)  # any size: the pooling is global


@pytest.mark.parametrize("shared", [1, 2, 3])
def test_an_imagenet_resnet_splits_into_trunk_and_tail_at_every_stage(shared):
    torch.manual_seed(0)
    model = create_model("resnet18", 10).eval()
    x = torch.randn(2, 3, 64, 64)
    h = model.trunk(x, shared)
    assert h.shape[1] == model.trunk_channels(shared)
    split = model.fc(torch.nn.functional.adaptive_avg_pool2d(model.tail(h, shared), 1).flatten(1))
    torch.testing.assert_close(split, model(x), rtol=0, atol=0)
    trunk = set(model.trunk_modules(shared))
    assert {"conv1", "bn1", f"layer{shared}"} <= trunk and f"layer{shared + 1}" not in trunk


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = ZeroPadShortcut(16, 32)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])  # the input's channels first, as the seed's
    assert out[:, 16:].abs().sum() == 0


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet33")
    for name in MODEL_NAMES:
        assert name in str(info.value)


def _conv_std_fan_out(conv: torch.nn.Conv2d) -> float:
    return (2 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels)) ** 0.5


def _sampling_tolerance(n: int) -> float:
    """Relative tolerance for the std of n normal draws: 5 standard errors (1/sqrt(2n) each)."""
    return 5 / (2 * n) ** 0.5


@pytest.mark.parametrize("name", SMALL)
def test_convolutions_are_he_normal_on_fan_out(name):
    torch.manual_seed(0)
    model = create_model(name, 100)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    for conv in convs:
        w = conv.weight
        # the first convolution has 3 input channels: fan-in and fan-out rules differ most there
        assert w.std().item() == pytest.approx(_conv_std_fan_out(conv), rel=_sampling_tolerance(w.numel()))
        assert abs(w.mean().item()) < 5 * _conv_std_fan_out(conv) / w.numel() ** 0.5


@pytest.mark.parametrize("name", ["resnet20", "resnet110", "wrn28_2"])
def test_batchnorm_starts_at_one_and_zero(name):
    norms = [m for m in create_model(name, 100).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_classifier_is_he_normal_with_zero_bias(name):
    # 100 x 64 weights: He-normal on the fan-in, std sqrt(2/64) = 0.177 (PyTorch's default would be
    # uniform with std 1/sqrt(3*64) = 0.072).
    torch.manual_seed(1)
    fc = create_model(name, 100).fc
    assert fc.weight.std().item() == pytest.approx((2 / 64) ** 0.5, rel=_sampling_tolerance(fc.weight.numel()))
    assert fc.weight.abs().max().item() > 1 / 8  # a normal of std 0.177 leaves the default's range
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))


def test_wide_resnet_classifier_keeps_the_default_weight_with_zero_bias():
    torch.manual_seed(2)
    fc = create_model("wrn28_2", 100).fc  # 100 x 128: default uniform in +-1/sqrt(128)
    assert fc.weight.abs().max().item() <= 128 ** -0.5
    assert fc.weight.std().item() == pytest.approx((1 / (3 * 128)) ** 0.5, rel=_sampling_tolerance(fc.weight.numel()))
    assert torch.equal(fc.bias, torch.zeros_like(fc.bias))


def test_resnet_starts_confident_and_arbitrary():
    """The He-normal classifier makes a fresh ResNet's predictions peaked and random: initial
    cross-entropy well above ln(100) = 4.6, which is what slows a DML cohort's first epoch."""
    torch.manual_seed(3)
    model = create_model("resnet32", 100).train()  # batch statistics, as in the first training step
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 100, (256,))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert loss > 6.0  # measured 6.8-8.4 over seeds 0-2; PyTorch's default classifier gives 5.1-5.2
