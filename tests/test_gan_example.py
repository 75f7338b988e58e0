"""The two-optimizer GAN example: a short training with and without XGrad, and the manual-optimization lifecycle.

The lifecycle tests watch the real XGradCallback on the example's GAN (manual optimization, one Adam for the
generator and one for the discriminator): a spy placed before the callback records the real weights at batch start,
a spy placed after it records what the training step sees (the predictions) and what is left at batch end, and the
module's own ``on_before_optimizer_step`` (which Lightning calls after the callbacks') records both networks at each
``opt.step()``. Every check compares those independent recordings bit for bit.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_xgrad import XGradCallback

from .toolkit import flat, load_example, trainer

BATCHES = 6  # batch 0 predicts nothing (no Adam state yet); batches 1..5 run at predictions

Weights = tuple[torch.Tensor, torch.Tensor]  # (generator, discriminator), flattened


@pytest.fixture(scope="module")
def gan() -> ModuleType:
    return load_example("digits_gan")


def test_gan_example_trains_with_and_without_xgrad(gan: ModuleType) -> None:
    baseline = gan.train(None, epochs=2, progress_bar=False)
    xgrad = gan.train(1, epochs=2, progress_bar=False)
    for result in (baseline, xgrad):
        assert set(result) == {"val_fd", "val_is", "d_loss", "g_loss"}
        assert all(math.isfinite(value) for value in result.values()), result
        assert result["val_fd"] > 0.0
        assert 1.0 <= result["val_is"] <= 10.0  # exp of a KL bounded by log(10 classes)
    assert xgrad["val_fd"] != baseline["val_fd"]  # the callback changed the training
    assert xgrad["g_loss"] != baseline["g_loss"]


def test_gan_example_metrics_on_real_data(gan: ModuleType) -> None:
    real = gan.real_digits().double().numpy()
    assert gan.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    reference = gan.reference_scores()
    assert 0.0 < reference["val_fd"] < 0.5  # two halves of the same data: far below any generator after 2 epochs
    assert reference["val_is"] > 6.0  # the classifier is confident on real digits of all ten classes


def test_gan_example_rejects_g_every_below_one(gan: ModuleType) -> None:
    with pytest.raises(ValueError, match="g_every must be at least 1"):
        gan.DigitsGAN(g_every=0)


# ---------------------------------------------------------------- manual-optimization lifecycle


def _weights(module: Any) -> Weights:
    return flat(module.generator), flat(module.discriminator)


class BatchSpy(Callback):
    """The generator's and discriminator's weights at every batch start and batch end, by batch index."""

    def __init__(self) -> None:
        self.start: dict[int, Weights] = {}
        self.end: dict[int, Weights] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.start[i] = _weights(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.end[i] = _weights(pl_module)


def _fit_watched(gan: ModuleType, g_every: int) -> tuple[BatchSpy, BatchSpy, list[tuple[int, str, Weights]], Any]:
    """Fit the example's GAN for one epoch of ``BATCHES`` batches with spies around the real XGradCallback."""

    class WatchedGAN(gan.DigitsGAN):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.steps_seen: list[tuple[int, str, Weights]] = []

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            # runs after every callback's on_before_optimizer_step, so after XGradCallback's restore
            opt_g, opt_d = self.trainer.optimizers
            name = "g" if optimizer is opt_g else "d" if optimizer is opt_d else "?"
            self.steps_seen.append((self.trainer.fit_loop.epoch_loop.batch_idx, name, _weights(self)))

    pl.seed_everything(0, verbose=False)
    module = WatchedGAN(g_every=g_every)
    real, seen = BatchSpy(), BatchSpy()
    callbacks = [real, XGradCallback(steps=1), seen]
    fit = trainer(callbacks=callbacks, max_epochs=1, limit_train_batches=BATCHES, limit_val_batches=0)
    fit.fit(module, datamodule=gan.DigitsGANData())
    assert sorted(real.start) == sorted(seen.end) == list(range(BATCHES))
    return real, seen, module.steps_seen, module


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


def test_every_optimizer_is_predicted_and_each_step_restores_its_own(gan: ModuleType) -> None:
    real, seen, steps_seen, module = _fit_watched(gan, g_every=1)
    assert [(i, name) for i, name, _ in steps_seen] == [(i, name) for i in range(BATCHES) for name in ("d", "g")]
    # batch 0: no optimizer state yet, nothing is predicted
    assert all(torch.equal(s, r) for s, r in zip(seen.start[0], real.start[0], strict=True))
    for i in range(1, BATCHES):
        (real_g, real_d), (pred_g, pred_d) = real.start[i], seen.start[i]
        assert _differs(pred_g, real_g) and _differs(pred_d, real_d), f"batch {i}: both networks predicted"
    for i, name, (g, d) in steps_seen:
        (real_g, real_d), (pred_g, pred_d) = real.start[i], seen.start[i]
        if name == "d":
            # the discriminator's step sees its own real weights back, the generator still at its prediction
            assert torch.equal(d, real_d), f"batch {i}: discriminator restored for its step"
            assert torch.equal(g, pred_g), f"batch {i}: generator keeps its prediction through the D step"
        else:
            # the generator's step sees its real weights back; the discriminator has taken its update already
            assert torch.equal(g, real_g), f"batch {i}: generator restored for its step"
            assert i == 0 or _differs(d, pred_d)
            assert _differs(d, real_d), f"batch {i}: discriminator updated before the generator's step"
    # between batches only the optimizers move the weights: what a batch leaves is the next batch's real start
    for i in range(BATCHES - 1):
        assert all(torch.equal(e, r) for e, r in zip(seen.end[i], real.start[i + 1], strict=True)), f"batch {i}"
    assert all(torch.equal(w, e) for w, e in zip(_weights(module), seen.end[BATCHES - 1], strict=True))


def test_generator_not_stepped_gets_its_real_weights_back_at_batch_end(gan: ModuleType) -> None:
    real, seen, steps_seen, module = _fit_watched(gan, g_every=2)
    expected = [(i, name) for i in range(BATCHES) for name in (("d", "g") if i % 2 == 0 else ("d",))]
    assert [(i, name) for i, name, _ in steps_seen] == expected
    for i in range(1, BATCHES):
        (real_g, real_d), (pred_g, pred_d) = real.start[i], seen.start[i]
        # the generator has Adam state from batch 0 on, so it is predicted on skipped batches too
        assert _differs(pred_g, real_g) and _differs(pred_d, real_d), f"batch {i}: both networks predicted"
        end_g, end_d = seen.end[i]
        if i % 2 == 1:  # the generator did not step in this batch
            assert torch.equal(end_g, real_g), f"batch {i}: generator's real weights back at batch end"
            if i + 1 < BATCHES:
                assert torch.equal(real.start[i + 1][0], real_g), f"batch {i}: generator's real weights unchanged"
        else:
            assert _differs(end_g, real_g), f"batch {i}: the generator stepped"
        assert _differs(end_d, real_d), f"batch {i}: the discriminator stepped"
    for i in range(BATCHES - 1):
        assert all(torch.equal(e, r) for e, r in zip(seen.end[i], real.start[i + 1], strict=True)), f"batch {i}"
    assert all(torch.equal(w, e) for w, e in zip(_weights(module), seen.end[BATCHES - 1], strict=True))


def test_gan_demo_prints_the_comparison_table(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/gan_demo.py imports the example's ``train`` from ``digits_gan`` beside it."""
    gan_demo = load_example("gan_demo")
    threads = torch.get_num_threads()
    try:
        gan_demo.main(["--epochs", "1", "--no-progress-bar"])  # sets one torch thread for the process
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "[seed=0 baseline]" in out and "[seed=0 XGrad s=1]" in out
    assert "Digits GAN, final validation after 1 epoch, 1 seed" in out
