"""The digits example `make demo` runs: one short training with and without XGrad, end to end."""

from __future__ import annotations

import math

import pytest

from .toolkit import load_example


def _load_example():
    return load_example("digits")


def test_digits_example_trains_with_and_without_xgrad() -> None:
    digits = _load_example()
    baseline = digits.train(None, optimizer="adamw", epochs=2, progress_bar=False)
    xgrad = digits.train(1, optimizer="adamw", epochs=2, progress_bar=False)
    for result in (baseline, xgrad):
        assert math.isfinite(result["val_loss"])
        assert result["val_acc"] > 0.5  # 10 classes: chance is 0.1
    assert xgrad["val_loss"] != baseline["val_loss"]  # the callback changed the training


def test_digits_example_rejects_an_unknown_optimizer() -> None:
    digits = _load_example()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        digits.DigitsClassifier(optimizer="adam")


def test_demo_prints_the_comparison_table(capsys: pytest.CaptureFixture[str]) -> None:
    """``make demo`` runs examples/demo.py, which imports the example's ``train`` from ``digits`` beside it."""
    demo = load_example("demo")
    demo.main(["--epochs", "1", "--optimizers", "adamw", "--no-progress-bar"])
    out = capsys.readouterr().out
    assert "[adamw seed=0 baseline]" in out and "[adamw seed=0 XGrad s=1]" in out
    assert "Digits, final validation after 1 epoch, 1 seed" in out
