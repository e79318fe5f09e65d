"""Model-level export of blurred torchvision ResNets: torch.compile (no graph breaks), TorchScript, torch.fx, ONNX,
torch.export with a dynamic batch; a blurred 1-D network through torch.export and ONNX (dynamic batch and length).

References: the eager blurred model itself, and Composer's built-in BlurPool, which does break the graph (so the
graph-break test is shown to detect breaks).
"""

from __future__ import annotations

import copy
import functools
import io
import warnings

import composer.algorithms.blurpool as composer_blurpool
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch._dynamo
import torch.fx
import torchvision
from torch import nn

from blurpool_algo import apply_blurpool, models

#: (architecture, surgery options): defaults, the paper's placement/filter/padding, and every pad mode.
COMBOS = [
    ("resnet50", {}),
    ("resnet50", {"blur_first": False, "filter_size": 4, "pad_mode": "reflect"}),
    ("resnet18", {"blur_first": False}),
    ("resnet18", {"filter_size": 4, "min_channels": 0}),
    ("resnet18", {"pad_mode": "reflect"}),
    ("resnet18", {"pad_mode": "circular", "filter_size": 4, "blur_first": False}),
    ("resnet18", {"pad_mode": "replicate", "filter_size": 5}),
    ("resnet18", {"sampling": "adaptive", "circular_padding": True, "min_channels": 0}),
]


def combo_id(combo: tuple[str, dict]) -> str:
    arch, options = combo
    return "-".join([arch, *(f"{k}={v}" for k, v in options.items())]) if options else f"{arch}-defaults"


COMBO_IDS = [combo_id(c) for c in COMBOS]
#: Compiling, scripting and exporting a whole model to ONNX costs seconds, so ResNet-18 only (ResNet-50's Bottleneck
#: blocks hold the same layer kinds; torch.fx traces both): the stem blurred too, blur after the conv with circular
#: padding, adaptive sampling with circular padding. Every layer kind in every pad mode is scripted and exported on its
#: own in tests/test_layers.py.
WHOLE_MODEL = [3, 5, 7]
WHOLE_MODEL_COMBOS, WHOLE_MODEL_IDS = [COMBOS[i] for i in WHOLE_MODEL], [COMBO_IDS[i] for i in WHOLE_MODEL]


@functools.cache
def _baseline(arch: str) -> nn.Module:
    """Seeded torchvision model (no weights), BatchNorm statistics calibrated on one batch so outputs are O(1)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1000)))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def blurred(arch: str, options: dict) -> tuple[nn.Module, set[str]]:
    """A blurred eval-mode copy of the baseline and the names of the replaced modules."""
    model = copy.deepcopy(_baseline(arch))
    report = apply_blurpool(model, **options)
    assert report.num_replaced >= 7
    return model, {d.name for d in report.replaced}


def make_input(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------- torch.compile


def test_composer_reference_breaks_the_graph(fresh_dynamo) -> None:
    """Composer's built-in BlurPool breaks the graph (``int(torch.div(...))``), so ``fullgraph=True`` refuses it: the
    compile test below, which compiles ours with ``fullgraph=True``, would see a break."""
    model = copy.deepcopy(_baseline("resnet18"))
    composer_blurpool.apply_blurpool(model)
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(torch._dynamo.exc.Unsupported):
        warnings.simplefilter("ignore")
        torch.compile(model, backend="eager", fullgraph=True)(make_input(1, 3, 64, 64))


@pytest.mark.parametrize(("arch", "options"), WHOLE_MODEL_COMBOS, ids=WHOLE_MODEL_IDS)
def test_compile_matches_eager(arch: str, options: dict, fresh_dynamo) -> None:
    model, _ = blurred(arch, options)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = make_input(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


# ------------------------------------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize(("arch", "options"), WHOLE_MODEL_COMBOS, ids=WHOLE_MODEL_IDS)
def test_jit_script_matches_eager(arch: str, options: dict) -> None:
    model, _ = blurred(arch, options)
    scripted = torch.jit.script(model)
    # Also through a save/load round trip, as deployments use it.
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = make_input(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for _ in range(2):  # the profiling executor optimizes from the second call on
            torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scripted(make_input(1, 3, 80, 96)), model(make_input(1, 3, 80, 96)))


# -------------------------------------------------------------------------------------------------------- torch.fx


@pytest.mark.parametrize(("arch", "options"), COMBOS, ids=COMBO_IDS)
def test_fx_symbolic_trace_matches_eager(arch: str, options: dict) -> None:
    model, replaced = blurred(arch, options)
    traced = torch.fx.symbolic_trace(model)
    get_attrs = {node.target for node in traced.graph.nodes if node.op == "get_attr"}
    assert {t for t in get_attrs if t.endswith("blur_filter")} == {f"{name}.blur_filter" for name in replaced}
    for size in [(2, 3, 64, 64), (1, 3, 72, 88)]:
        x = make_input(*size)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------ ONNX


@pytest.mark.parametrize(("arch", "options"), WHOLE_MODEL_COMBOS, ids=WHOLE_MODEL_IDS)
def test_onnx_dynamic_axes(arch: str, options: dict) -> None:
    model, _ = blurred(arch, options)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (make_input(1, 3, 64, 64),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), session_options, providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 96, 80), (2, 3, 72, 72)]:
        x = make_input(*shape, seed=1)
        (logits,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- torch.export


def _paper_resnet18() -> nn.Module:
    """The paper's ResNet-18 (``blurpool_algo.models``) with the baseline's weights."""
    return models.resnet18(weights=_baseline("resnet18").state_dict()).eval()


def _conv_resnet10() -> nn.Module:
    """The quickstart's resnet10 in the conv placement, the stem blurred too: every blur layer kind of the placement,
    with half the ops of ResNet-18 to trace."""
    torch.manual_seed(0)
    model = models.build_model("resnet10", num_classes=10)
    apply_blurpool(model, filter_size=4, min_channels=0)
    return model.eval()


#: The conv placement and the paper's.
EXPORTED = {"resnet10-conv": _conv_resnet10, "resnet18-paper": _paper_resnet18}


@pytest.mark.parametrize("kind", list(EXPORTED))
def test_torch_export_with_a_dynamic_batch_matches_eager(kind: str) -> None:
    model = EXPORTED[kind]()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (make_input(2, 3, 64, 64),), dynamic_shapes=({0: batch},))
    (image,) = [node for node in program.graph.nodes if node.op == "placeholder" and node.name == "x"]
    assert isinstance(image.meta["val"].shape[0], torch.SymInt), "the batch dim was specialised"
    exported = program.module()
    for size in (1, 5):  # neither is the example's batch
        x = make_input(size, 3, 64, 64, seed=size)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x))


def test_torch_export_of_a_circular_pool_leaves_the_batch_unbounded() -> None:
    """``circular_padding`` makes the max-pool pad circularly and cut its output to the plain pool's size. A cut that
    slices every axis (``out[:, :, :h, :w]``) makes torch guard the batch against int64's largest value, which an
    unbounded ``torch.export.Dim`` refuses; only the spatial axes may be cut."""
    model = nn.Sequential(nn.MaxPool2d(3, 2, 1))
    apply_blurpool(model, sampling="adaptive", circular_padding=True)
    pool = model[0]
    assert pool.padding_mode == "circular"
    program = torch.export.export(pool, (make_input(4, 8, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for size in (1, 3):
        x = make_input(size, 8, 16, 16, seed=size)
        torch.testing.assert_close(program.module()(x), pool(x))


def _audio_net(options: dict) -> nn.Module:
    """An audio-style 1-D CNN (strided convs, a max-pool, an average pool), blurred with ``options``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16), nn.ReLU(),
        nn.MaxPool1d(3, 2, 1),
        nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
        nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    assert apply_blurpool(model, **options).num_replaced >= 2
    return model


#: The 1-D conv placement (the stem blurred too, adaptive sampling, circular padding) and the paper's.
EXPORTED_1D = {
    "conv-adaptive-circular": {"min_channels": 0, "sampling": "adaptive", "circular_padding": True},
    "paper": {"placement": "after_activation", "filter_size": 4, "pad_mode": "reflect", "replace_avgpools": True},
}


@pytest.mark.parametrize("kind", list(EXPORTED_1D))
def test_torch_export_of_a_1d_network_with_a_dynamic_batch_matches_eager(kind: str) -> None:
    model = _audio_net(EXPORTED_1D[kind])
    program = torch.export.export(model, (make_input(2, 1, 200),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    exported = program.module()
    for size in (1, 5):
        x = make_input(size, 1, 200, seed=size)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x))


@pytest.mark.parametrize("kind", list(EXPORTED_1D))
def test_onnx_of_a_1d_network_with_dynamic_batch_and_length_matches_eager(kind: str) -> None:
    model = _audio_net(EXPORTED_1D[kind])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (make_input(1, 1, 200),), buffer, dynamo=False, opset_version=17, input_names=["signal"],
            output_names=["logits"], dynamic_axes={"signal": {0: "batch", 2: "length"}, "logits": {0: "batch"}},
        )  # fmt: skip
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(3, 1, 256), (2, 1, 131)]:  # another batch, another (odd) length
        x = make_input(*shape, seed=2)
        (logits,) = session.run(None, {"signal": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-4, atol=1e-4)
