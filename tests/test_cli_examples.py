"""The examples as LightningCLI programs: every config in ``examples/configs`` trains with and without XGrad.

Each config runs through the example's own ``cli_main`` (what ``python examples/<x>.py fit --config ...`` runs) for
one epoch, once as is and once with ``--trainer.callbacks+=lightning_xgrad.XGradCallback``, the flag a user adds.
Both runs must log finite validation metrics where the config's CSVLogger puts them, and end exactly where the
example's ``train()`` ends after one epoch (``train(None)`` and ``train(s)``, the rows of the demo tables), so the
config reproduces ``train()``; XGrad must be present only when asked for, with its ``steps``, and change the weights.
"""

from __future__ import annotations

import csv
import inspect
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_xgrad import XGradCallback

from .toolkit import EXAMPLES, flat, load_example

CONFIGS = EXAMPLES / "configs"
XGRAD = "--trainer.callbacks+=lightning_xgrad.XGradCallback"
# One epoch instead of the config's max_epochs; everything else as the config says.
ONE_EPOCH = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


class Case:
    def __init__(self, example: str, metrics: tuple[str, ...], flags: list[str], steps: int, **train: Any) -> None:
        self.example = example  # examples/<example>.py
        self.metrics = metrics  # validation metrics logged every epoch
        self.flags = flags  # what the user adds to train with XGrad
        self.steps = steps  # the XGradCallback.steps those flags ask for
        self.train = train  # train()'s arguments for the same run


DIGITS, GAN = ("val_loss", "val_acc"), ("val_fd", "val_is")
CASES = {
    "digits_sgd": Case("digits", DIGITS, [XGRAD], 1, optimizer="sgd"),
    "digits_adamw": Case("digits", DIGITS, [XGRAD, "--trainer.callbacks.steps=2"], 2, optimizer="adamw"),
    "digits_gan": Case("digits_gan", GAN, [XGRAD], 1),
}


@pytest.fixture(scope="module")
def examples() -> dict[str, ModuleType]:
    return {name: load_example(name) for name in ("digits", "digits_gan")}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Models this small train fastest on one thread, and two threads slow down many times over on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(example: ModuleType, config: str, flags: list[str]) -> LightningCLI:
    return example.cli_main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), *ONE_EPOCH, *flags])


def _xgrad_callbacks(cli: LightningCLI) -> list[XGradCallback]:
    return [c for c in cli.trainer.callbacks if isinstance(c, XGradCallback)]


#: configs of the companion methods, whose own test files run them (they change the optimizer, so train() has no twin)
COMPANION_CONFIGS = {"digits_cprop": "test_cprop.py", "digits_ahb": "test_heavy_ball.py"}


def test_every_digits_config_is_tested() -> None:
    assert sorted(path.stem for path in CONFIGS.glob("digits*.yaml")) == sorted([*CASES, *COMPANION_CONFIGS])
    for config, test_file in COMPANION_CONFIGS.items():
        assert f"{config}.yaml" in (Path(__file__).parent / test_file).read_text()


@pytest.mark.parametrize("config", sorted(CASES))
def test_config_settings_are_train_defaults(config: str, examples: dict[str, ModuleType]) -> None:
    """The settings the one-epoch runs below do not exercise: the full length and the seeds."""
    case, settings = CASES[config], yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    defaults = inspect.signature(examples[case.example].train).parameters
    assert settings["trainer"]["max_epochs"] == defaults["epochs"].default
    assert settings["seed_everything"] == settings["data"]["seed"] == defaults["seed"].default
    assert settings["trainer"]["deterministic"] is True


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("config", sorted(CASES))
def test_config_trains_as_train_does_with_and_without_xgrad(
    config: str, examples: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the config's CSVLogger writes lightning_logs/<config>/version_N here
    monkeypatch.setattr(sys, "argv", [f"{CASES[config].example}.py"])  # the CLI's arguments come from args only
    case = CASES[config]
    example = examples[case.example]
    baseline, xgrad = _fit(example, config, []), _fit(example, config, case.flags)

    assert _xgrad_callbacks(baseline) == []
    (callback,) = _xgrad_callbacks(xgrad)
    assert (callback.steps, callback.rule, callback.start_step) == (case.steps, "auto", 0)

    for cli, steps in ((baseline, None), (xgrad, case.steps)):
        assert cli.trainer.current_epoch == 1
        metrics = {name: float(cli.trainer.callback_metrics[name]) for name in case.metrics}
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        # the same run through train(): the config reproduces it, with or without XGrad
        reference = example.train(steps, epochs=1, progress_bar=False, **case.train)
        assert metrics == {name: reference[name] for name in case.metrics}
        # logged where the config says, with the config that made the run
        log_dir = Path(cli.trainer.log_dir).resolve()
        assert log_dir.parent == tmp_path.resolve() / "lightning_logs" / config
        rows = [row for row in csv.DictReader((log_dir / "metrics.csv").open()) if row[case.metrics[0]]]
        assert len(rows) == 1 and {name: float(rows[0][name]) for name in case.metrics} == metrics
        saved = yaml.safe_load((log_dir / "config.yaml").read_text())
        assert len(saved["trainer"]["callbacks"] or []) == (0 if steps is None else 1)

    # same seed, same data, same initial weights: XGrad alone moved the weights elsewhere
    assert not torch.equal(flat(baseline.model), flat(xgrad.model))
