"""The Composer algorithm: Event.INIT surgery in a real Trainer, logging, repr, checkpoints and autoload safety."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import composer.algorithms
import pytest
import torch
import torchvision
from composer import Trainer
from composer.algorithms.blurpool import BlurConv2d as ComposerBlurConv2d
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Event
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import blurpool_algo
from blurpool_algo import BlurConv2d, BlurMaxPool2d, BlurPool, apply_blurpool
from blurpool_algo.checkpoints import parse_algorithm_description
from blurpool_algo.rules import EXCLUSIONS, Reason

NUM_CLASSES = 10


def _loader(seed: int = 0, n: int = 32, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def _model(seed: int = 0) -> ComposerClassifier:
    torch.manual_seed(seed)
    return ComposerClassifier(torchvision.models.resnet18(num_classes=NUM_CLASSES), num_classes=NUM_CLASSES)


def _trainer(model: nn.Module, **kwargs) -> Trainer:
    kwargs.setdefault("max_duration", "2ba")
    return Trainer(
        model=model,
        train_dataloader=_loader(),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        device="cpu",
        progress_bar=False,
        seed=17,
        **kwargs,
    )


def _blur_layers(model: nn.Module) -> dict[str, str]:
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, BlurConv2d | BlurMaxPool2d | ComposerBlurConv2d)
    }


def test_trainer_applies_surgery_at_init_and_logs_counts():
    logger = InMemoryLogger()
    model = _model()
    reference = copy.deepcopy(model.module)
    expected = apply_blurpool(reference)

    trainer = _trainer(model, algorithms=[BlurPool(blur_first=True)], loggers=[logger])
    # Surgery happened in the constructor, before any training: Event.INIT.
    assert _blur_layers(trainer.state.model) == {f"module.{k}": v for k, v in _blur_layers(reference).items()}
    trainer.fit()

    hparams = logger.hyperparameters
    assert hparams["blurpool/num_blurconv_layers"] == expected.num_blurconv_layers == 6
    assert hparams["blurpool/num_blurmaxpool_layers"] == 1
    assert hparams["blurpool/num_bluravgpool_layers"] == 0
    assert hparams["blurpool/num_blurpool_layers"] == 1  # Composer's name for the max-pool count
    assert hparams["blurpool/num_skipped_layers"] == len(expected.skipped)


def test_paper_placement_in_a_trainer_builds_the_papers_model():
    # The algorithm's after_activation placement on a ComposerClassifier gives, module for module, the network
    # blurpool_algo.models.resnet18 builds; the counts are logged; training runs.
    from blurpool_algo import models

    logger = InMemoryLogger()
    model = _model()
    algorithm = BlurPool(placement="after_activation", filter_size=4, pad_mode="reflect")
    trainer = _trainer(model, algorithms=[algorithm], loggers=[logger])
    built = models.resnet18(num_classes=NUM_CLASSES)
    network = trainer.state.model.module
    assert [(n, type(m).__name__) for n, m in network.named_modules()] == [
        (n, type(m).__name__) for n, m in built.named_modules()
    ]
    assert all(
        getattr(m, "stride", None) == getattr(dict(built.named_modules())[n], "stride", None)
        for n, m in network.named_modules()
    )
    trainer.fit()
    hparams = logger.hyperparameters
    assert hparams["blurpool/num_blurinputconv_layers"] == 3 and hparams["blurpool/num_blurconv_layers"] == 3
    assert hparams["blurpool/num_blurmaxpool_layers"] == 1


def test_paper_placement_warns_about_strided_convs_it_cannot_place():
    # A strided conv whose output goes straight into another conv has no activation to put the blur after.
    network = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
    )  # fmt: skip
    model = ComposerClassifier(network, num_classes=NUM_CLASSES)
    algorithm = BlurPool(placement="after_activation")
    with pytest.warns(UserWarning, match=r"does not recognize the structure around module\.3"):
        _trainer(model, algorithms=[algorithm])
    assert type(network[3]) is nn.Conv2d and network[3].stride == (2, 2)
    assert [d.name for d in algorithm.report.skipped if d.code is Reason.UNRECOGNIZED] == ["module.3"]


@pytest.mark.parametrize("pattern", ["layer4.*", "module.layer4.*", "layer4", "module.layer4"])
def test_exclude_patterns_name_the_wrapped_network(pattern):
    algorithm = BlurPool(exclude=[pattern])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every pattern here matches a module: no warning
        trainer = _trainer(_model(), algorithms=[algorithm])
    blurred = _blur_layers(trainer.state.model)
    assert blurred and not any(name.startswith("module.layer4.") for name in blurred)
    assert any(name.startswith("module.layer3.") for name in blurred)
    assert type(trainer.state.model.module.layer4[0].conv1) is nn.Conv2d
    assert algorithm.report.unmatched_exclude == ()
    # The report names the user's pattern, not a variant the algorithm derived from it.
    assert {d.details["pattern"] for d in algorithm.report.skipped if d.code in EXCLUSIONS} == {pattern}


def test_exclude_pattern_that_matches_nothing_warns_once_naming_the_users_pattern():
    # The paper's placement too: both placements share the matching.
    for placement in ("conv", "after_activation"):
        algorithm = BlurPool(exclude=["layr4.*", "layer3"], placement=placement)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _trainer(_model(), algorithms=[algorithm])
        unmatched = [str(w.message) for w in caught if "matches no module name" in str(w.message)]
        assert len(unmatched) == 1, unmatched
        assert "'layr4.*'" in unmatched[0] and "'layer4" in unmatched[0]
        assert "module.layr4" not in unmatched[0]
        assert algorithm.report.unmatched_exclude == ("layr4.*",)
        network = trainer.state.model.module
        assert not any(isinstance(m, BlurConv2d) for m in network.layer3.modules())  # "layer3" excluded all of it
        assert any(isinstance(m, BlurConv2d) for m in network.layer4.modules())  # the typo excluded nothing


@pytest.mark.parametrize("composer_first", [True, False], ids=["composer_first", "ours_first"])
def test_refuses_to_run_beside_composers_blurpool(composer_first):
    # Both in one Trainer would blur every subsampling layer twice (or one would undo the other) without a word.
    model = _model()
    ours, theirs = BlurPool(), composer.algorithms.BlurPool()
    algorithms = [theirs, ours] if composer_first else [ours, theirs]
    with pytest.raises(ValueError, match=r"composer\.algorithms\.BlurPool") as info:
        _trainer(model, algorithms=algorithms)
    assert "\n" not in str(info.value)
    # Ours blurred nothing (Composer's may have run first: whatever it did is its own surgery, not ours).
    assert not any(isinstance(m, BlurConv2d | BlurMaxPool2d) for m in model.modules())


def test_algorithm_matches_only_init():
    algorithm = BlurPool()
    state = object()  # match() must not need the state for this decision
    assert algorithm.match(Event.INIT, state)  # type: ignore[arg-type]
    assert not any(algorithm.match(event, state) for event in Event if event != Event.INIT)  # type: ignore[arg-type]


def test_training_updates_blurred_weights():
    model = _model()
    trainer = _trainer(model, algorithms=[BlurPool()])
    conv = trainer.state.model.module.layer2[0].conv1
    before = conv.weight.detach().clone()
    trainer.fit()
    assert isinstance(conv, BlurConv2d)
    assert not torch.equal(before, conv.weight.detach())


def test_no_effect_warning_when_nothing_is_replaced():
    model = ComposerClassifier(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES)),
        num_classes=NUM_CLASSES,
    )
    with pytest.warns(NoEffectWarning, match="replaced no layer"):
        _trainer(model, algorithms=[BlurPool()])


def test_no_warning_when_layers_are_replaced():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEffectWarning)
        _trainer(_model(), algorithms=[BlurPool()])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"blur_first": False, "filter_size": 4, "pad_mode": "reflect"},
        {"replace_convs": False, "replace_avgpools": True, "min_channels": 0, "exclude": ("layer4.*", "fc")},
        {"placement": "after_activation", "filter_size": 4, "pad_mode": "reflect"},
        {"sampling": "adaptive", "circular_padding": True, "min_channels": 0},
    ],
)
def test_repr_evals_back_to_an_equal_algorithm(options):
    algorithm = BlurPool(**options)
    rebuilt = eval(repr(algorithm), {"blurpool_algo": blurpool_algo})
    assert isinstance(rebuilt, BlurPool)
    assert rebuilt == algorithm
    assert repr(rebuilt) == repr(algorithm)
    assert rebuilt != BlurPool(min_channels=algorithm.min_channels + 1, **{
        k: v for k, v in options.items() if k != "min_channels"
    })  # fmt: skip


def test_options_read_as_attributes_like_composers():
    algorithm = BlurPool(blur_first=False, min_channels=8)
    assert algorithm.blur_first is False
    assert algorithm.min_channels == 8
    assert algorithm.replace_convs is True
    with pytest.raises(AttributeError):
        _ = algorithm.not_an_option


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"filter_size": 0}, "filter_size"),
        ({"pad_mode": "mirror"}, "pad_mode"),
        ({"min_channels": -1}, "min_channels"),
        ({"blur_first": "yes"}, "blur_first"),
        ({"replace_convs": False, "replace_maxpools": False}, "nothing to replace"),
        ({"exclude": [""]}, "exclude"),
        ({"placement": "paper"}, "placement must be one of 'conv', 'after_activation'"),
        ({"sampling": "aps"}, "sampling must be one of 'fixed', 'adaptive'"),
        ({"circular_padding": 1}, "circular_padding must be True or False, got 1"),
    ],
)
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        BlurPool(**options)


def test_sampling_options_are_attributes_and_parse_as_a_checkpoint_description():
    algorithm = BlurPool(sampling="adaptive", circular_padding=True)
    assert (algorithm.sampling, algorithm.circular_padding) == ("adaptive", True)
    assert (BlurPool().sampling, BlurPool().circular_padding) == ("fixed", False)
    cls, args, kwargs = parse_algorithm_description(repr(algorithm))
    assert cls(*args, **kwargs) == algorithm


def test_required_on_load():
    assert BlurPool.required_on_load() is True


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    uninterrupted = _trainer(_model(), algorithms=[BlurPool(blur_first=False)], max_duration="4ba")
    uninterrupted.fit()

    first = _trainer(
        _model(), algorithms=[BlurPool(blur_first=False)], max_duration="4ba",
        save_folder=str(tmp_path), save_filename="ba{batch}.pt", save_interval="2ba",
    )  # fmt: skip
    first.fit(duration="2ba")
    checkpoint = tmp_path / "ba2.pt"
    assert checkpoint.exists()

    with warnings.catch_warnings():
        # Resuming with the same algorithm must be silent about required_on_load algorithms.
        warnings.filterwarnings("error", message=".*required_on_load.*")
        resumed = _trainer(
            _model(seed=99), algorithms=[BlurPool(blur_first=False)], max_duration="4ba", load_path=str(checkpoint)
        )
    assert [type(a) for a in resumed.state.algorithms] == [BlurPool]
    resumed.fit()

    expected, got = _weights(uninterrupted.state.model), _weights(resumed.state.model)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_checkpoint_autoloads_this_blurpool_not_composers(tmp_path):
    trainer = _trainer(
        _model(), algorithms=[BlurPool(filter_size=4, pad_mode="reflect")],
        save_folder=str(tmp_path), save_filename="last.pt", save_interval="2ba",
    )  # fmt: skip
    trainer.fit()
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["state"]["algorithms"]
    assert saved[0][1]["repr"].startswith("blurpool_algo.BlurPool(")

    with pytest.warns(UserWarning, match=r"Automatically adding required_on_load algorithm blurpool_algo\.BlurPool"):
        plain = _trainer(_model(seed=5), load_path=str(tmp_path / "last.pt"))
    assert plain.state.algorithms == [BlurPool(filter_size=4, pad_mode="reflect")]
    layers = _blur_layers(plain.state.model)
    assert layers and set(layers.values()) == {"BlurConv2d", "BlurMaxPool2d"}
    assert not any(isinstance(m, ComposerBlurConv2d) for m in plain.state.model.modules())
    torch.testing.assert_close(_weights(plain.state.model), _weights(trainer.state.model), rtol=0, atol=0)


def test_registration_points_composer_namespace_at_this_package():
    assert composer.algorithms.blurpool_algo is blurpool_algo
    rebuilt = eval(f"algorithms.{BlurPool(filter_size=5)!r}", {"algorithms": composer.algorithms})
    assert rebuilt == BlurPool(filter_size=5)


AUTOLOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys, warnings
    import torch, torchvision
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), batch_size=4)
    model = ComposerClassifier(torchvision.models.resnet18(num_classes=10), num_classes=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model=model, train_dataloader=data, max_duration="1ba", load_path=sys.argv[1],
                          device="cpu", progress_bar=False)
    assert "blurpool_algo" not in sys.modules, "the check needs a process that never imported blurpool_algo"
    messages = [str(w.message) for w in caught]
    print("WARNED" if any("blurpool_algo.BlurPool" in m and "recreating the algorithm failed" in m
                          for m in messages) else "SILENT")
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in trainer.state.model.modules()}
    print("COMPOSER_BLURPOOL" if any("composer.algorithms.blurpool" in k for k in kinds) else "NO_COMPOSER_BLURPOOL")
    print("ALGORITHMS", trainer.state.algorithms)
    """
)


def test_checkpoint_in_a_process_without_the_package_warns_and_never_builds_composers_blurpool(tmp_path):
    trainer = _trainer(_model(), algorithms=[BlurPool()], save_folder=str(tmp_path), save_filename="last.pt")
    trainer.fit()
    result = subprocess.run(
        [sys.executable, "-c", AUTOLOAD_WITHOUT_PACKAGE, str(tmp_path / "last.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WARNED" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "NO_COMPOSER_BLURPOOL" in result.stdout
    assert "ALGORITHMS []" in result.stdout
