"""The seed system's initialisation of its CIFAR networks, one rule set for both families."""

from __future__ import annotations

from torch import nn


def init_like_seed(model: nn.Module, he_classifier: bool) -> None:
    """Convolutions N(0, sqrt(2 / (k*k*out_channels))) (He, fan-out); BatchNorm weight 1, bias 0;
    classifiers with a zero bias and, where ``he_classifier``, a He-normal weight on the fan-in
    (std sqrt(2/64) = 0.177 for a ResNet's 64 features; the seed's wide ResNets keep PyTorch's default).

    The He-normal classifier starts a ResNet confident and arbitrary (cross-entropy about 7 against
    ln 100 = 4.6): that is what gives DML cohorts the seed's slow first epoch.
    """
    for m in model.modules():
        init_conv_or_norm(m)
        if isinstance(m, nn.Linear):
            if he_classifier:
                nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


def init_conv_or_norm(m: nn.Module) -> None:
    """A convolution He-normal on its fan-out, a BatchNorm at weight 1 and bias 0; other modules as they are
    (the rule the CIFAR networks and the ImageNet ResNets share)."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
