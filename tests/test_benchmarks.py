"""Tests for the benchmark scripts' machinery: what they count, compare and refuse. No timing is asserted.

Memory is asserted where it is deterministic: the bytes autograd saves for a backward do not depend on the machine.
"""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    """Imports a benchmark script as a module (they are scripts beside each other, not a package)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


overhead = _load("overhead")
blur_kernels = _load("blur_kernels")
gpu_check = _load("gpu_check")
_SCRIPTS = {"overhead": overhead, "blur_kernels": blur_kernels}


def _images(batch: int = 2, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, side, side, generator=generator), torch.randint(0, 10, (batch,), generator=generator)


# ------------------------------------------------------------------------------------------------ saved activations


def test_saved_bytes_count_one_more_activation_once():
    # A second (not in-place) ReLU saves its output, one more map of the input's size; the Linear after it saves a
    # flattened view of that same storage, which must not count twice. The loss's share cancels.
    images, labels = _images()

    def model(relus: int) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 3, 1), *(nn.ReLU() for _ in range(relus)), nn.Flatten(), nn.Linear(3072, 10))

    difference = overhead.saved_activation_bytes(model(2), images, labels) - overhead.saved_activation_bytes(
        model(1), images, labels
    )
    assert difference == images.numel() * images.element_size()


def test_saved_bytes_leave_out_parameters():
    # One more Linear(1000 -> 10) adds its 2x1000 float input and nothing else: not the 12 MB weight of the
    # Linear(3072 -> 1000) before it, nor its own (parameters exist whatever the batch).
    images, labels = _images()
    stem = [nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Flatten()]
    plain = nn.Sequential(*stem, nn.Linear(3072, 10))
    wider = nn.Sequential(*stem, nn.Linear(3072, 1000), nn.Linear(1000, 10))
    extra = overhead.saved_activation_bytes(wider, images, labels) - overhead.saved_activation_bytes(
        plain, images, labels
    )
    assert extra == 2 * 1000 * 4


# ResNet-18 at 64 px: the three shortcut convs' (input channels, output channels, input side).
RESNET18_SHORTCUTS_AT_64PX = [(64, 128, 16), (128, 256, 8), (256, 512, 4)]


@pytest.mark.parametrize("arm", ["first", "after"])
def test_ours_saves_exactly_what_the_pointwise_path_spares(arm):
    # Deterministic, so a test (the benchmark reports the same figure for ResNet-50). Per shortcut, Composer's
    # blur_first=True keeps the full-size blurred input for the strided conv's backward, where ours keeps a quarter of
    # it; Composer's blur_first=False keeps the stride-1 conv's output for the blur's backward, where ours keeps the
    # quarter-size blurred input. Composer's max-pool also keeps the 64x1x3x3 filter it rebuilds in every forward.
    batch = 2
    images, labels = _images(batch, 64)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    ours = overhead.SURGERY[f"ours_{arm}"](overhead.copy.deepcopy(reference))
    composer = overhead.SURGERY[f"composer_{arm}"](overhead.copy.deepcopy(reference))
    spared_floats = 64 * 3 * 3
    for inputs, outputs, side in RESNET18_SHORTCUTS_AT_64PX:
        composer_keeps = (inputs if arm == "first" else outputs) * side * side
        spared_floats += batch * (composer_keeps - inputs * (side // 2) ** 2)
    difference = overhead.saved_activation_bytes(composer, images, labels) - overhead.saved_activation_bytes(
        ours, images, labels
    )
    assert difference == 4 * spared_floats


# ------------------------------------------------------------------------------------------------------- per layer


def test_replaced_names_are_the_blurred_layers_in_model_order():
    torch.manual_seed(0)
    baseline = torchvision.models.resnet50()
    others = {arm: overhead.SURGERY[arm](overhead.copy.deepcopy(baseline)) for arm in ("ours_first", "composer_after")}
    names = overhead._replaced_names(baseline, others)
    stages = [f"layer{i}.0.{part}" for i in (2, 3, 4) for part in ("conv2", "downsample.0")]
    assert names == ["maxpool", *stages]  # 7: the stem pool, 3 strided 3x3 and 3 shortcut convs; not the RGB stem


def test_captured_inputs_are_what_the_layers_receive():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    images, _ = _images(2, 64)
    inputs = overhead._captured_inputs(model, ["maxpool", "layer2.0.conv1"], images)
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(images)))
        torch.testing.assert_close(inputs["maxpool"], stem)
        torch.testing.assert_close(inputs["layer2.0.conv1"], model.layer1(model.maxpool(stem)))


# ----------------------------------------------------------------------------------------------------- end to end


def test_overhead_runs_end_to_end_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(overhead, "SAMPLE_SECONDS", 0.001)
    out = tmp_path / "overhead.json"
    # One arm of each kind (every arm's surgery is checked on its own below): the run's cost grows with the arms.
    # Composer's arm runs end to end in the GPU check's smoke test (test_gpu_check_smoke_writes_every_part).
    arms = ("baseline", "ours_first", "ours_paper", "aps_first", "aps_naive")
    argv = ["--models", "resnet18", "--image-size", "32", "--batch-size", "2", "--repeats", "5",
            "--layer-repeats", "5", "--arms", ",".join(arms), "--json", str(out)]  # fmt: skip
    assert overhead.main(argv) == 0
    payload = json.loads(out.read_text())
    result = payload["results"]["resnet18"]
    assert set(result["arms"]) == set(arms)
    for arm in result["arms"].values():
        assert len(arm["train_step"]["values_ms"]) == 5 and arm["memory_bytes"] > 0
    layers = result["per_layer"]["layers"]
    # The stem pool, and per stage the strided conv1 (blurred, or moved to stride 1 by the paper's placement), conv2
    # (which takes the paper's blur) and the shortcut: 1 + 3 x 3.
    assert layers[0]["name"] == "maxpool" and len(layers) == 10
    stage = [entry for entry in layers if entry["name"].startswith("layer2.0.")]
    assert [entry["name"] for entry in stage] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert not stage[1]["arms"]["ours_first"]["replaced"] and stage[1]["arms"]["ours_paper"]["replaced"]
    # The adaptive arms replace what ours_first replaces (the naive one too, by its own class).
    for entry in layers:
        flags = {arm: entry["arms"][arm]["replaced"] for arm in ("ours_first", "aps_first", "aps_naive")}
        assert len(set(flags.values())) == 1, (entry["name"], flags)
    for arm, total in result["per_layer"]["added_ms"].items():
        assert total == pytest.approx(sum(entry["arms"][arm]["added_ms"] for entry in layers))
    assert payload["targets"] == []  # the targets are about ResNet-50
    printed = capsys.readouterr().out
    assert "resnet18: forward+backward per replaced layer" in printed and "ours_first" in printed
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside the JSON


def test_every_arms_surgery_gives_a_working_model_and_the_naive_aps_computes_aps_first():
    assert set(overhead.SURGERY) == set(overhead.ARMS)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    images, _ = _images(side=32)
    outputs = {}
    with torch.no_grad():
        for arm, surgery in overhead.SURGERY.items():
            outputs[arm] = surgery(copy.deepcopy(reference))(images)
            assert outputs[arm].shape == (2, 10), arm
    # The same function, at stride 1 first: equal up to the conv kernels' summation order (1.8e-7 on one thread, 0 on
    # two, on our machine), far below the 0.14 by which fixed sampling differs.
    torch.testing.assert_close(outputs["aps_naive"], outputs["aps_first"], rtol=1e-5, atol=1e-6)
    assert (outputs["aps_first"] - outputs["ours_first"]).abs().max() > 1e-2  # the phase choice changes the outputs


def test_targets_are_judged_from_the_numbers():
    results = {
        "resnet50": {
            "per_layer": {
                "added_ms": {"ours_first": 4.0, "composer_first": 10.0, "ours_after": 11.0, "composer_after": 10.0}
            },
            "arms": {
                "ours_first": {"memory_bytes": 5},
                "composer_first": {"memory_bytes": 5},
                "ours_after": {"memory_bytes": 6},
                "composer_after": {"memory_bytes": 5},
            },
        }
    }
    verdicts = [check["met"] for check in overhead.check_targets(results)]
    assert verdicts == [True, False, True, False]


@pytest.mark.parametrize(
    ("script", "argv", "message"),
    [
        ("overhead", ["--models", "resnet5O"], "--models: unknown model 'resnet5O'; allowed: torchvision"),
        ("overhead", ["--models", ","], "--models must be a comma-separated list of torchvision classification model"),
        ("overhead", ["--arms", "ours_first,theirs"], "--arms must be one of 'baseline', 'ours_first',"),
        ("overhead", ["--repeats", "3"], "--repeats must be an int >= 5 (medians of fewer are noise), got 3"),
        ("overhead", ["--layer-repeats", "4"], "--layer-repeats must be an int >= 5"),
        ("overhead", ["--image-size", "16"], "--image-size must be an int >= 32"),
        ("overhead", ["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
        ("overhead", ["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        ("overhead", ["--no-per-layer", "--no-whole-model"], "nothing to measure"),
        ("overhead", ["--inductor-cpu-threads", "1"], "--inductor-cpu-threads must be left out without --compile"),
        ("overhead", ["--compile", "--inductor-cpu-threads", "0"], "--inductor-cpu-threads must be an int >= 1, got 0"),
        ("blur_kernels", ["--repeats", "4"], "--repeats must be an int >= 5 (medians of fewer are noise), got 4"),
        ("blur_kernels", ["--filter-size", "4"], "--filter-size must be odd (transpose_backward pads symmetrically)"),
        ("blur_kernels", ["--filter-size", "1"], "--filter-size must be an int >= 3, got 1"),
        ("blur_kernels", ["--batch-size", "0"], "--batch-size must be an int >= 1, got 0"),
    ],
)
def test_benchmarks_refuse_bad_options_before_any_work(script, argv, message, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        pytest.fail("measured despite a bad option")

    for name in ("measure", "measure_model", "measure_layers"):
        if hasattr(_SCRIPTS[script], name):
            monkeypatch.setattr(_SCRIPTS[script], name, no_work)
    with pytest.raises(SystemExit) as exit_info:
        _SCRIPTS[script].main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_overhead_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        overhead.parse_settings(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- blur kernels


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("filter_size", [3, 5])
def test_every_blur_form_computes_the_same_values_and_gradients(filter_size, stride):
    x = torch.randn(2, 5, 11, 10, dtype=torch.float64)
    with torch.no_grad():
        weight = blur_kernels.binomial_filter_2d(filter_size, dtype=torch.float64)[None, None].expand(5, 1, -1, -1)
        reference = torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, [filter_size // 2] * 4), weight, stride=stride, groups=5
        )
    for name, form in blur_kernels.FORMS.items():
        leaf = x.clone().requires_grad_(True)
        out = form(leaf.float(), filter_size, stride).double()
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5, msg=name)
    for name, form in blur_kernels.FORMS.items():  # gradients, in float64 against torch's own autograd of the conv
        if name == "depthwise":
            continue
        leaf = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(form(leaf.float(), filter_size, stride).sum(), leaf)[0]
        expected = torch.autograd.grad(blur_kernels.depthwise(leaf.float(), filter_size, stride).sum(), leaf)[0]
        torch.testing.assert_close(grad, expected, msg=name)


# ------------------------------------------------------------------------------------------------------- GPU check


def test_gpu_check_without_cuda_exits_2_with_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine: no CUDA seen
    monkeypatch.setattr(gpu_check, "run", lambda *args: pytest.fail("worked without CUDA"))
    assert gpu_check.main(["--out", str(tmp_path / "results")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("gpu_check: CUDA is not available here")
    assert not (tmp_path / "results").exists()


def test_gpu_check_smoke_writes_every_part(tmp_path, capsys):
    # Every part's code on the CPU at tiny sizes (the compiled overhead is skipped by --smoke, and says so).
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    files = {path.name: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert set(files) == {f"gpu_{part}.json" for part in (*gpu_check.PARTS, "summary")}
    summary = files["gpu_summary.json"]
    assert summary["finished"] and summary["smoke"] and summary["numerics_failed"] == 0 and summary["total_s"] > 0
    assert {part: entry["status"] for part, entry in summary["parts"].items()} == {
        "numerics": "done", "overhead": "done", "throughput": "done", "overhead_compiled": "skipped"
    }  # fmt: skip
    assert {"torch", "cuda", "device", "composer"} <= set(summary["environment"])
    numerics = files["gpu_numerics.json"]
    # 7 kinds of 2-D layer in 2 memory formats and 6 of 1-D in one, in fp32 and bf16, each against float64.
    assert numerics["passed"] == 2 * (7 * 2 + 6) and numerics["failed"] == 0
    kinds = {check["layer"].split()[0] for check in numerics["checks"]}
    assert kinds == {name for name in gpu_check.__dict__ if name.startswith("Blur") and name[-2:] in ("1d", "2d")}
    conv = next(check for check in numerics["checks"] if check["layer"] == "BlurConv2d 3x3 blur_first")
    assert set(conv["errors"]) == {"output", "input_grad", "weight_grad", "bias_grad"}
    assert all(check["output_channels_last"] for check in numerics["checks"] if check["memory_format"] != "contiguous")
    settings = files["gpu_overhead.json"]["settings"]
    assert settings["amp"] and settings["channels_last"] and not settings["compile"]
    result = files["gpu_overhead.json"]["results"]["resnet18"]
    assert set(result["arms"]) == set(gpu_check.SMOKE_SIZES.arms) == {"baseline", *result["per_layer"]["added_ms"]}
    assert len(result["per_layer"]["layers"]) == 7  # ResNet-18's stem pool, and 3 strided convs and 3 shortcuts
    throughput = files["gpu_throughput.json"]["arms"]
    assert set(throughput) == set(gpu_check.SMOKE_SIZES.arms) and all(
        arm["images_per_s"] > 0 for arm in throughput.values()
    )
    assert "skipped" in files["gpu_overhead_compiled.json"]
    assert "passed" in capsys.readouterr().out  # the numerics table was printed


def test_gpu_check_records_a_budget_skip_and_a_failed_part_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.SMOKE_ESTIMATES_S, "throughput", 10**6)
    monkeypatch.setattr(gpu_check, "run_numerics", lambda *args: 1 / 0)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--parts", "numerics,throughput"]) == 1
    parts = json.loads((tmp_path / "gpu_summary.json").read_text())["parts"]
    assert parts["numerics"]["status"] == "failed" and "ZeroDivisionError" in parts["numerics"]["error"]
    assert parts["throughput"]["status"] == "skipped" and "budget" in parts["throughput"]["reason"]
    assert "budget" in json.loads((tmp_path / "gpu_throughput.json").read_text())["skipped"]


def test_gpu_check_numerics_detect_rounding_when_the_tolerance_is_zero(monkeypatch):
    # The control: the same check that passes at bf16's tolerance fails when no error is allowed (bf16 rounds).
    cpu = torch.device("cpu")
    assert gpu_check.check_layer("BlurConv2d 3x3 blur_after", "bfloat16", True, cpu, 1, 2)["passed"]
    monkeypatch.setitem(gpu_check.TOLERANCES, "bfloat16", 0.0)
    assert not gpu_check.check_layer("BlurConv2d 3x3 blur_after", "bfloat16", True, cpu, 1, 2)["passed"]


def test_gpu_check_kills_an_overrunning_child_run(tmp_path, monkeypatch):
    # The compiled run goes to a child process with the budget left as its timeout; a stand-in script that writes its
    # --json shows the arguments arrive, one that sleeps shows the kill.
    script = tmp_path / "stand_in.py"
    script.write_text(
        "import json, sys, time\n"
        "if '--compile' in sys.argv: time.sleep(60)\n"
        "open(sys.argv[sys.argv.index('--json') + 1], 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    monkeypatch.setattr(gpu_check, "OVERHEAD_SCRIPT", script)
    cpu, sizes, out = torch.device("cpu"), gpu_check.SMOKE_SIZES, tmp_path / "out.json"
    gpu_check.run_overhead(cpu, sizes, False, out, True, timeout_s=30)
    assert json.loads(out.read_text()) == gpu_check.overhead_argv(cpu, sizes, False, out)
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.run_overhead(cpu, sizes, True, tmp_path / "never.json", True, timeout_s=0.3)
    assert not (tmp_path / "never.json").exists()
