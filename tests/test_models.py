import pytest
import torch

from dml.models import MODEL_NAMES, count_parameters, create_model
from dml.models.cifar_resnet import ZeroPadShortcut

# Published parameter counts for 100 classes.
EXPECTED = {
    "resnet20": 275_572,
    "resnet32": 470_004,
    "resnet44": 664_436,
    "resnet56": 858_868,
    "resnet110": 1_733_812,
    "wrn28_2": 1_479_220,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts(name):
    assert count_parameters(create_model(name, 100)) == EXPECTED[name]


def test_wrn28_10_is_registered_and_wide():
    # 36.5 M parameters: the published WRN-28-10 size for 100 classes.
    assert 36_400_000 < count_parameters(create_model("wrn28_10", 100)) < 36_600_000


@pytest.mark.parametrize("name", ["resnet20", "wrn28_2"])
def test_forward_shape(name):
    model = create_model(name, 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    out = ZeroPadShortcut(16, 32)(x)
    assert out.shape == (2, 32, 2, 2)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_model("resnet33")
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_resnet_uses_he_normal_convolutions_and_a_default_classifier():
    model = create_model("resnet110", 100)
    conv = model.blocks[-1].conv2.weight  # 64*64*9 weights: fan_in 576, He std sqrt(2/576)
    assert conv.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    # nn.Linear's default: uniform in +-1/sqrt(fan_in), std 1/sqrt(3 * 64); He-normal would be sqrt(2/64).
    assert model.fc.weight.abs().max().item() <= 1 / 8
    assert model.fc.weight.std().item() == pytest.approx((1 / (3 * 64)) ** 0.5, rel=0.05)
