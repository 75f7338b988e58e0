"""benchmarks/convergence.py: the report's arithmetic on hand-made curves, and one tiny real run end to end."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def convergence():
    from benchmarks import convergence

    return convergence


def _curve(loss: float, acc: float) -> list[dict[str, float]]:
    return [
        {"epoch": 0, "step": 10, "val_loss": loss + 1, "val_acc": acc - 0.1},
        {"epoch": 1, "step": 20, "val_loss": loss, "val_acc": acc},
    ]


def test_report_tabulates_paired_deltas_and_the_best_s(convergence) -> None:
    results = {
        "digits_sgd": {
            "0": [_curve(0.50, 0.90), _curve(0.70, 0.80)],
            "1": [_curve(0.40, 0.92), _curve(0.80, 0.79)],  # deltas -0.10, +0.10: mean 0, one seed better
            "2": [_curve(0.45, 0.91), _curve(0.60, 0.85)],  # deltas -0.05, -0.10: mean -0.075, both better
        }
    }
    text = convergence.report(results, seeds=[0, 1], steps_list=[1, 2], command="cmd", wall=60.0)
    assert "| baseline | 0.6000 ± 0.1414 | 0.8500 ± 0.0707 |  |  |" in text
    assert "| XGrad s=1 | 0.6000 ± 0.2828 | 0.8550 ± 0.0919 | +0.0000 ± 0.1414 | 1/2 |" in text
    assert "| XGrad s=2 | 0.5250 ± 0.1061 | 0.8800 ± 0.0424 | −0.0750 ± 0.0354 | 2/2 |" in text
    assert "best s = 2 by the mean val_loss" in text


def test_report_says_when_xgrad_does_not_help(convergence) -> None:
    results = {"digits_sgd": {"0": [_curve(0.5, 0.9)], "1": [_curve(0.6, 0.9)]}}
    text = convergence.report(results, seeds=[0], steps_list=[1], command="cmd", wall=1.0)
    assert "no s beats the baseline on the mean: XGrad does not help here" in text


def test_a_tiny_real_run_writes_table_plot_and_curves(convergence, tmp_path) -> None:
    convergence.main(
        [
            "--tasks",
            "digits_sgd",
            "--seeds",
            "1",
            "--steps",
            "1",
            "--out",
            str(tmp_path),
            "--",
            "--trainer.max_epochs=2",
        ]
    )
    data = json.loads((tmp_path / "convergence.json").read_text())
    curves = data["results"]["digits_sgd"]
    assert len(curves["0"][0]) == len(curves["1"][0]) == 2  # one validation point per epoch
    assert curves["0"][0][-1]["val_loss"] != curves["1"][0][-1]["val_loss"]  # the flag really added XGrad
    assert (tmp_path / "convergence.png").stat().st_size > 10_000
    assert "## digits_sgd" in (tmp_path / "convergence.md").read_text()


@pytest.fixture(scope="module")
def overhead():
    from benchmarks import overhead

    return overhead


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_naive_reference_predicts_what_xgrad_predicts(overhead, optimizer: str) -> None:
    """The timed naive reference must do the same work: the same W_hat, and the real weights back after."""
    from types import SimpleNamespace

    from lightning_xgrad import OptimizerPredictor

    module = overhead.Classifier("cnn", optimizer)
    opt = module.configure_optimizers()
    params = list(module.parameters())
    torch.manual_seed(0)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    real = [p.detach().clone() for p in params]
    predictor = OptimizerPredictor(opt, steps=1)
    predictor.predict()
    expected = [p.detach().clone() for p in params]
    predictor.restore()
    naive = overhead.NaiveXGrad(steps=1)
    naive.on_train_batch_start(SimpleNamespace(optimizers=[opt]), module, None, 0)
    for p, want, before in zip(params, expected, real, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(want, before)
    naive.on_before_optimizer_step(SimpleNamespace(optimizers=[opt]), module, opt)
    assert all(torch.equal(p.detach(), before) for p, before in zip(params, real, strict=True))


def test_overhead_tiny_run_writes_table_plot_and_memory(overhead, tmp_path) -> None:
    overhead.main(["--cases", "cnn-sgd", "--runs", "1", "--steps", "2", "--warmup", "4", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "overhead.json").read_text())
    row = data["summary"]["cnn-sgd"]
    param_bytes = sum(p.numel() * p.element_size() for p in overhead.cnn().parameters())
    assert row["param_bytes"] == param_bytes
    for variant in ("xgrad", "xgrad-compiled"):
        assert row[variant]["persistent_bytes"] == param_bytes  # one snapshot buffer per parameter
        # SGD's prediction works in place; the compiled kernel's only allocation is its per-tensor float32 scalars
        assert row[variant]["transient_bytes"] <= 4 * row["tensors"]
        assert row[variant]["hooks_ms"] > 0
    assert row["naive"]["transient_bytes"] >= param_bytes  # a clone of every parameter, every step
    raw = data["raw"]["cnn-sgd"]["xgrad"]
    assert raw["active"] == [True, False] and len(raw["pair_ratios"]) == 1  # with and without, paired
    assert raw["hooks"][1] == 0.0  # the callback did not act in the step without it
    text = (tmp_path / "overhead.md").read_text()
    assert "| cnn-sgd | xgrad-compiled |" in text and "## Targets" in text
    assert (tmp_path / "overhead.png").stat().st_size > 10_000
