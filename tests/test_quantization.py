"""Quantization of blurred models: FX graph mode static quantization (``prepare_fx`` / ``convert_fx``).

Reference: the float model itself. A quantized model must run, hold quantized convs (the control that quantization
happened at all), and stay close to its float model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from blurpool_algo import BlurAvgPool2d, BlurConv2d, BlurInputConv2d, BlurMaxPool2d, BlurPool2d


def _calibration(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 20, 20, generator=torch.Generator().manual_seed(seed))


def _net(layer: nn.Module) -> nn.Module:
    """conv -> BN -> ReLU, the blurred layer, then a conv, so the layer sits between quantized ops."""
    torch.manual_seed(0)
    channels = 8
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), layer,
        nn.Conv2d(channels, 4, 3, padding=1),
    ).eval()  # fmt: skip


LAYERS = {
    "conv_blur_first": lambda: BlurConv2d(8, 8, 3, stride=2, padding=1, filter_size=4),
    "conv_blur_after": lambda: BlurConv2d(8, 8, 3, stride=2, padding=1, filter_size=4, blur_first=False),
    "conv_pointwise": lambda: BlurConv2d(8, 8, 1, stride=2, filter_size=3),
    "input_conv": lambda: BlurInputConv2d(8, 8, 3, padding=1, blur_stride=2, filter_size=4, pad_mode="reflect"),
    "maxpool": lambda: BlurMaxPool2d(3, 2, 1, filter_size=4, pad_mode="reflect"),
    "avgpool": lambda: BlurAvgPool2d(2, 2, filter_size=3),
    "blurpool": lambda: BlurPool2d(8, 2, filter_size=5, pad_mode="replicate"),
}


def fx_quantize(model: nn.Module, example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices for the FX flow
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (example,))
        with torch.no_grad():
            prepared(example)
        return convert_fx(prepared)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fx_static_quantization_runs_and_stays_close(kind: str) -> None:
    model = _net(LAYERS[kind]())
    quantized = fx_quantize(model, _calibration())
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in quantized.modules()), "nothing was quantized"
    x = _calibration(1)
    with torch.no_grad():
        expected, got = model(x), quantized(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()
