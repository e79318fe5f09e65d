"""Quantization of blurred models, 2-D and 1-D: FX graph mode static quantization (``prepare_fx`` / ``convert_fx``, x86
default qconfig mapping) and PT2E (``export_for_training`` + ``prepare_pt2e`` / ``convert_pt2e`` with the
``X86InductorQuantizer``; the ``XNNPACKQuantizer`` for 1-D networks), and benchmarks/quantization.py's machinery.

Reference: the float model itself. A quantized model must run, hold quantized convs (the control that quantization
happened at all), and stay close to its float model. Whole models face a second control: the un-blurred model with the
same weights must be far outside the tolerance, so that a quantized model that lost its blur would fail.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.ao.quantization.quantizer.x86_inductor_quantizer as x86_inductor
from torch import nn
from torch.ao.quantization import QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
from torch.ao.quantization.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

from blurpool_algo import BlurAvgPool2d, BlurConv2d, BlurInputConv2d, BlurMaxPool2d, BlurPool2d, apply_blurpool, models
from blurpool_algo.layers import BlurAvgPool1d, BlurConv1d, BlurInputConv1d, BlurMaxPool1d, BlurPool1d
from blurpool_algo.recipe import recipe_parts


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


def fx_qconfig_mapping(model: nn.Module) -> QConfigMapping:
    """x86's default mapping, with the circularly padded ``nn.Conv2d`` and ``nn.Conv1d`` left in float: torch's
    quantized conv modules refuse ``padding_mode='circular'`` (``circular_padding=True`` gives every padded conv that
    mode). The blur layers pad in their own forward and quantize either way."""
    mapping = get_default_qconfig_mapping("x86")
    for name, module in model.named_modules():
        if type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "circular":
            mapping.set_module_name(name, None)
    return mapping


def fx_quantize(model: nn.Module, example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices for the FX flow
        prepared = prepare_fx(copy.deepcopy(model), fx_qconfig_mapping(model), (example,))
        with torch.no_grad():
            prepared(example)
        return convert_fx(prepared)


def pt2e_quantize(model: nn.Module, example: torch.Tensor) -> nn.Module:
    quantizer = x86_inductor.X86InductorQuantizer()
    quantizer.set_global(x86_inductor.get_default_x86_inductor_quantization_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export_for_training(model, (example,)).module()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            prepared(example)
        return convert_pt2e(prepared)


_FX_FUNCTIONAL_CONVS = (torch.ops.quantized.conv2d, torch.ops.quantized.conv2d_relu)


def fx_quantized_convs(model: nn.Module) -> int:
    """Quantized conv modules (``ConvReLU2d`` included) and quantized functional convs (``F.conv2d`` in a layer's
    forward) of an FX-converted model."""
    modules = sum(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in model.modules())
    return modules + sum(node.target in _FX_FUNCTIONAL_CONVS for node in model.graph.nodes)


def pt2e_convs(model: nn.Module) -> tuple[int, int]:
    """(convs, convs whose weight is dequantized from int8) of a PT2E-converted model."""
    convs = [node for node in model.graph.nodes if node.target == torch.ops.aten.conv2d.default]
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    return len(convs), sum(node.args[1].target == dequantize for node in convs)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fx_static_quantization_runs_and_stays_close(kind: str) -> None:
    model = _net(LAYERS[kind]())
    quantized = fx_quantize(model, _calibration())
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in quantized.modules()), "nothing was quantized"
    x = _calibration(1)
    with torch.no_grad():
        expected, got = model(x), quantized(x)
    assert got.shape == expected.shape
    # Relative L2 error, not the largest single deviation: one int8 rounding step at the peak of a small random net's
    # output sat right at a max-abs limit, and passed or failed with the kernels' summation order.
    assert relative_error(got, expected) <= 0.1


# --------------------------------------------------------------------------------------------------- whole models

#: Side of the images: ResNets subsample by 32, so the last stage sees 1x1 maps and every blur pads a tiny map.
SIDE = 32
#: Largest relative L2 error of a quantized model's logits against its float model's. With fixed sampling it measures
#: 0.01 to 0.06 here (8-bit weights, 7-bit activations under x86's reduce_range, random weights).
TOLERANCE = 0.1
#: Adaptive sampling keeps each map's largest-energy phase: quantization noise flips near-ties, and a flipped phase
#: moves that whole map by a pixel, so the error is larger (0.03 to 0.18 measured).
ADAPTIVE_TOLERANCE = 0.3
#: The paper's placement, filter and padding (what its model builders pass to apply_blurpool).
PAPER_OPTIONS = {"placement": "after_activation", "filter_size": 4, "pad_mode": "reflect", "replace_avgpools": True}


def _images(seed: int) -> torch.Tensor:
    return torch.randn(8, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _plain(arch: str) -> nn.Module:
    """A seeded, un-blurred model with 10 classes, BatchNorm statistics from one batch so that activations are O(1)
    (random-init statistics blow them up layer after layer). Never mutated: callers copy it."""
    torch.manual_seed(0)
    model = models.build_model(arch, num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(_images(100))
    return model.eval()


def _surgery(arch: str, **options) -> Callable[[], tuple[nn.Module, nn.Module]]:
    def build() -> tuple[nn.Module, nn.Module]:
        blurred = copy.deepcopy(_plain(arch))
        apply_blurpool(blurred, **options)
        return blurred.eval(), _plain(arch)

    return build


def _paper(name: str) -> Callable[[], tuple[nn.Module, nn.Module]]:
    def build() -> tuple[nn.Module, nn.Module]:
        # The paper's builder, loaded with the plain model's weights (the blur filters follow from filter_size).
        return getattr(models, name)(num_classes=10, weights=_plain(name).state_dict()).eval(), _plain(name)

    return build


#: (blurred model, its un-blurred twin with the same weights): resnet10 (the quickstart's ResNet: a strided stem conv,
#: a max-pool, strided 3x3 and 1x1 convs) in the conv placement and in the paper's (the quickstart's paper arm), and
#: the paper's ResNet-18 from its builder.
WHOLE_MODELS: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
    "conv_blur_first": _surgery("resnet10", blur_first=True),
    "conv_blur_after": _surgery("resnet10", blur_first=False, filter_size=4, pad_mode="reflect"),
    "conv_adaptive": _surgery("resnet10", sampling="adaptive"),
    "conv_adaptive_circular": _surgery("resnet10", sampling="adaptive", circular_padding=True, min_channels=0),
    "paper_resnet10": _surgery("resnet10", **PAPER_OPTIONS),
    "paper_resnet18": _paper("resnet18"),
}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def assert_close_to_float(kind: str, quantized: nn.Module, model: nn.Module, plain: nn.Module) -> None:
    tolerance = ADAPTIVE_TOLERANCE if "adaptive" in kind else TOLERANCE
    x = _images(1)
    with torch.no_grad():
        expected, got, unblurred = model(x), quantized(x), plain(x)
    assert got.shape == expected.shape
    error = relative_error(got, expected)
    assert error <= tolerance, f"quantized {kind}: relative error {error:.3f} > {tolerance}"
    # The control: the un-blurred twin is far outside the tolerance, so losing the blur would fail the check above.
    assert relative_error(unblurred, expected) > 2 * tolerance


#: Quantized convs after FX, counted by hand. resnet10 has 12 convs (the stem, two 3x3 per stage, three 1x1
#: shortcuts); the blurs stay in float (``blur_subsample`` is one FX leaf). Adaptive sampling's strided
#: 3x3 convs run inside ``conv_at_phase``, another leaf, so those 3 stay float; circular padding also leaves the 6
#: circularly padded ``nn.Conv2d`` in float (:func:`fx_qconfig_mapping`), so only the 3 shortcuts are quantized.
FX_QUANTIZED_CONVS = {
    "conv_blur_first": 12, "conv_blur_after": 12, "conv_adaptive": 9, "conv_adaptive_circular": 3,
    "paper_resnet10": 12,
}  # fmt: skip


@pytest.mark.parametrize("kind", list(FX_QUANTIZED_CONVS))
def test_fx_quantizes_whole_blurred_models(kind: str) -> None:
    model, plain = WHOLE_MODELS[kind]()
    quantized = fx_quantize(model, _images(0))
    assert fx_quantized_convs(quantized) == FX_QUANTIZED_CONVS[kind]
    assert_close_to_float(kind, quantized, model, plain)


#: Convs after PT2E, all with int8 weights, the blurs' depthwise convs included: resnet10's 12 plus 7 blurs in the
#: conv placement (the max-pool's, three strided 3x3 convs', three shortcuts'; the 3-channel stem is left alone under
#: min_channels=16), ResNet-18's 20 plus 7 (the max-pool, three BlurInputConv2d, three shortcuts). (Adaptive sampling
#: with circular padding quantizes too, every conv included: benchmarks/quantization.py's aps arm; its export costs
#: 4 s more than this test's budget.)
PT2E_CONVS = {"conv_blur_first": 19, "paper_resnet18": 27}


@pytest.mark.parametrize("kind", list(PT2E_CONVS))
def test_pt2e_quantizes_whole_blurred_models(kind: str) -> None:
    """The conv placement and the paper's ResNet-18. ``blur_first=False`` has its own test below."""
    model, plain = WHOLE_MODELS[kind]()
    quantized = pt2e_quantize(model, _images(0))
    assert pt2e_convs(quantized) == (PT2E_CONVS[kind], PT2E_CONVS[kind])
    assert_close_to_float(kind, quantized, model, plain)


def test_pt2e_prepares_a_batchnorm_after_a_blurred_conv() -> None:
    """``blur_first=False`` in the conv placement puts a BatchNorm right after the blur's depthwise conv, whose weight
    is the filter buffer. ``prepare_pt2e`` folds every BatchNorm that follows a conv into it, assuming the weight is a
    Parameter read straight from the module: on the blur, torch 2.7 raises (an ``AssertionError``, or a ``KeyError``
    registering the fused filter over the buffer), so the layer ends in a view that keeps this BatchNorm out of the
    fold. The prepared model must run and compute the float model's function (observers only watch). The full flow is
    not run: with a BatchNorm left in the graph, ``convert_pt2e`` spends 10-15 s building its QAT folding patterns,
    whatever the model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        BlurConv2d(8, 8, 3, stride=2, padding=1, bias=False, blur_first=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
    ).eval()  # fmt: skip
    quantizer = x86_inductor.X86InductorQuantizer()
    quantizer.set_global(x86_inductor.get_default_x86_inductor_quantization_config())
    x = _calibration()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(torch.export.export_for_training(model, (x,)).module(), quantizer)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x))


# -------------------------------------------------------------------------------- benchmarks/quantization.py


@functools.cache
def _benchmark():
    """benchmarks/quantization.py as a module (the benchmarks are scripts beside each other, not a package)."""
    folder = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("quantization")
    finally:
        sys.path.remove(folder)


#: The quickstart recipes on 16 px synthetic images: the benchmark's plumbing without its data or training.
TINY_DATA = ["data.name=synthetic", "data.synthetic_samples=16", "data.image_size=16", "train_batch_size=8",
             "eval_batch_size=16", "callbacks.shift_consistency_monitor.crop_size=8"]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--arms", "conv,bogus", "--train"], "--arms"),
        (["--flows", "fx,onnx", "--train"], "--flows"),
        (["--arms", "conv"], "--checkpoint"),  # no weights and no --train
        (["--arms", "conv", "--checkpoint", "paper=x.pt"], "--checkpoint"),
        (["--arms", "conv", "--checkpoint", "conv=/no/such/file.pt"], "--checkpoint"),
        (["--train", "--calibration-images", "0"], "--calibration-images"),
        (["--train", "max_duration"], "overrides"),
        (["--train", "model.nme=resnet10"], "model.nme"),
    ],
)
def test_benchmark_refuses_bad_flags_in_one_line(flags: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _benchmark().parse_settings(flags)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("quantization.py: error: ") or error.startswith(f"{Path(sys.argv[0]).name}: error: ")
    assert named in error


def test_benchmark_measures_a_checkpoint(tmp_path: Path) -> None:
    """The float top-1 is the checkpoint's, computed here independently; the FX model's is reported beside it."""
    benchmark = _benchmark()
    recipe = benchmark.arm_recipe("conv", TINY_DATA)
    torch.manual_seed(1)
    network = models.build_model("resnet10", num_classes=10)
    apply_blurpool(network, blur_first=True, min_channels=16, filter_size=3, pad_mode="zeros")  # the recipe's
    torch.save(network.state_dict(), tmp_path / "conv.pt")
    out = tmp_path / "quantization.json"
    argv = ["--arms", "conv", "--flows", "fx", "--checkpoint", f"conv={tmp_path / 'conv.pt'}",
            "--calibration-images", "8", "--json", str(out), *TINY_DATA]  # fmt: skip
    assert benchmark.main(argv) == 0
    result = json.loads(out.read_text())["results"]["conv"]
    _, evaluation = recipe_parts(recipe).dataset.datasets(recipe_parts(recipe).data_options, eval_batch_size=16)
    images, labels = next(iter(torch.utils.data.DataLoader(evaluation, batch_size=len(evaluation))))
    with torch.no_grad():
        expected = 100.0 * float((network.eval()(images).argmax(1) == labels).float().mean())
    assert result["float"]["top1"] == pytest.approx(expected)
    assert result["evaluation_images"] == len(evaluation)
    assert result["fx"]["quantized_convs"] == FX_QUANTIZED_CONVS["conv_blur_first"]
    assert 0 <= result["fx"]["agreement"] <= 100
    assert result["fx"]["top1_change"] == pytest.approx(result["fx"]["top1"] - expected)


# ------------------------------------------------------------------------------------------------------ 1-D layers


def _calibration_1d(seed: int = 0) -> torch.Tensor:
    # 16 signals of 64 samples: with fewer, one batch's ranges say little about the next one's.
    return torch.randn(16, 3, 64, generator=torch.Generator().manual_seed(seed))


def _net_1d(layer: nn.Module) -> nn.Module:
    """conv -> BN -> ReLU, the blurred 1-D layer, then a conv: :func:`_net` in 1-D."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), layer, nn.Conv1d(8, 4, 3, padding=1),
    ).eval()  # fmt: skip


LAYERS_1D = {
    "conv_blur_first": lambda: BlurConv1d(8, 8, 3, stride=2, padding=1, filter_size=4),
    "conv_blur_after": lambda: BlurConv1d(8, 8, 3, stride=2, padding=1, filter_size=4, blur_first=False),
    "conv_pointwise": lambda: BlurConv1d(8, 8, 1, stride=2, filter_size=3),
    "input_conv": lambda: BlurInputConv1d(8, 8, 3, padding=1, blur_stride=2, filter_size=4, pad_mode="reflect"),
    "maxpool": lambda: BlurMaxPool1d(3, 2, 1, filter_size=4, pad_mode="reflect"),
    "avgpool": lambda: BlurAvgPool1d(2, 2, filter_size=3),
    "blurpool": lambda: BlurPool1d(8, 2, filter_size=5, pad_mode="replicate"),
}


def fx_quantized_convs_1d(model: nn.Module) -> int:
    modules = sum(isinstance(m, torch.ao.nn.quantized.Conv1d) for m in model.modules())
    functional = (torch.ops.quantized.conv1d, torch.ops.quantized.conv1d_relu)
    return modules + sum(node.target in functional for node in model.graph.nodes)


@pytest.mark.parametrize("kind", sorted(LAYERS_1D))
def test_fx_static_quantization_of_1d_layers(kind: str) -> None:
    model = _net_1d(LAYERS_1D[kind]())
    quantized = fx_quantize(model, _calibration_1d())
    # The two plain convs, and a blurred conv's own conv (its blur stays float, as in 2-D).
    assert fx_quantized_convs_1d(quantized) == (3 if "conv" in kind else 2)
    x = _calibration_1d(1)
    with torch.no_grad():
        expected, got = model(x), quantized(x)
    assert got.shape == expected.shape
    assert relative_error(got, expected) <= TOLERANCE


def _audio_net() -> nn.Module:
    """An audio-style 1-D CNN with every 1-D subsampling kind: strided convs, a max-pool and an average pool; BatchNorm
    statistics from one batch, so that activations are O(1)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16), nn.ReLU(),
        nn.MaxPool1d(3, 2, 1),
        nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
        nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm1d):
            norm.momentum = None
    with torch.no_grad():
        model.train()(_signals(100))
    return model.eval()


def _signals(seed: int) -> torch.Tensor:
    return torch.randn(8, 1, 256, generator=torch.Generator().manual_seed(seed))


#: 1-D surgery options: the conv placement (fixed; adaptive sampling with circular padding) and the paper's.
OPTIONS_1D = {
    "conv_blur_first": {"min_channels": 0},
    "conv_adaptive_circular": {"sampling": "adaptive", "circular_padding": True, "min_channels": 0},
    "paper": {**PAPER_OPTIONS, "min_channels": 0},
}


def audio_models(kind: str) -> tuple[nn.Module, nn.Module]:
    """(the blurred audio net, its un-blurred twin with the same weights)."""
    plain = _audio_net()
    blurred = copy.deepcopy(plain)
    assert apply_blurpool(blurred, **OPTIONS_1D[kind]).num_replaced >= 2
    return blurred.eval(), plain


def assert_close_to_float_1d(kind: str, quantized: nn.Module, model: nn.Module, plain: nn.Module) -> None:
    tolerance = ADAPTIVE_TOLERANCE if "adaptive" in kind else TOLERANCE
    x = _signals(1)
    with torch.no_grad():
        expected, got, unblurred = model(x), quantized(x), plain(x)
    error = relative_error(got, expected)
    assert error <= tolerance, f"quantized 1-D {kind}: relative error {error:.3f} > {tolerance}"
    assert relative_error(unblurred, expected) > 2 * tolerance  # the control, as for 2-D


#: FX quantizes the audio net's 3 convs, but none under adaptive sampling with circular padding: the two strided ones
#: run inside the conv_at_phase leaf, the third pads circularly (left in float, see fx_qconfig_mapping).
FX_QUANTIZED_CONVS_1D = {"conv_adaptive_circular": 0, "paper": 3}


@pytest.mark.parametrize("kind", list(FX_QUANTIZED_CONVS_1D))
def test_fx_quantizes_a_blurred_1d_network(kind: str) -> None:
    model, plain = audio_models(kind)
    quantized = fx_quantize(model, _signals(0))
    assert fx_quantized_convs_1d(quantized) == FX_QUANTIZED_CONVS_1D[kind]
    assert_close_to_float_1d(kind, quantized, model, plain)


def test_pt2e_quantizes_a_blurred_1d_network() -> None:
    """PT2E with the XNNPACK quantizer: torch 2.7's X86InductorQuantizer annotates 2-D convs only, so it would leave a
    1-D network's convs in float (docs/deployment.md). Every conv gets int8 weights, the blurs' included."""
    kind = "conv_blur_first"
    model, plain = audio_models(kind)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    x = _signals(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(torch.export.export_for_training(model, (x,)).module(), quantizer)
        with torch.no_grad():
            prepared(x)
        quantized = convert_pt2e(prepared)
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    conv_ops = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default)  # the blurs may run as 2-D convs
    convs = [node for node in quantized.graph.nodes if node.target in conv_ops]
    # The 3 convs and the 3 blurs (the stem conv's, the max-pool's, the strided conv's).
    assert len(convs) == 6
    assert all(node.args[1].target == dequantize for node in convs)
    assert_close_to_float_1d(kind, quantized, model, plain)
