"""XGradCallback in Lightning's lifecycle: accumulation windows, validation, checkpoints, exceptions, resume, args.

Spies placed before and after XGradCallback in the callback list see the weights just before the prediction (the
real W) and just after it; every check below compares module weights with those independent recordings.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lightning_xgrad import XGradCallback
from lightning_xgrad.predictor import OptimizerPredictor

from .toolkit import OPTIMIZERS, TinyModule, flat, loader, make_data, trainer


class RealWeights(Callback):
    """Placed before XGradCallback: the real weights at the start of every micro-batch, by batch index."""

    def __init__(self) -> None:
        self.at_batch_start: dict[tuple[int, int], torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.at_batch_start[(trainer.current_epoch, i)] = flat(pl_module)


class SeenWeights(Callback):
    """Placed after XGradCallback: what the forward pass sees, and what validation sees."""

    def __init__(self) -> None:
        self.at_batch_start: dict[tuple[int, int], torch.Tensor] = {}
        self.at_validation: list[tuple[int, int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.at_batch_start[(trainer.current_epoch, i)] = flat(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_validation.append((trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx, flat(pl_module)))


def _fit(module: pl.LightningModule, callbacks: list[Callback], n: int = 80, bs: int = 8, **kwargs: Any) -> pl.Trainer:
    x, y = make_data(n)
    t = trainer(callbacks=callbacks, **kwargs)
    val = loader(*make_data(16, seed=1), batch_size=16) if kwargs.get("limit_val_batches", 0) != 0 else None
    t.fit(module, loader(x, y, bs), val)
    return t


# ---------------------------------------------------------------- accumulation


def test_accumulation_predicts_once_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = OptimizerPredictor.predict

    def counting(self: OptimizerPredictor, enabled: bool = True) -> bool:
        calls.append(enabled)
        return original(self, enabled)

    monkeypatch.setattr(OptimizerPredictor, "predict", counting)
    real, seen = RealWeights(), SeenWeights()
    # 10 batches, windows [0-2] [3-5] [6-8] [9]: the last one is Lightning's forced step at the epoch's end
    _fit(TinyModule(OPTIMIZERS["adam"]), [real, XGradCallback(), seen], n=80, max_epochs=2, accumulate_grad_batches=3)
    assert len(calls) == 2 * 4
    for epoch in range(2):
        for start, end in [(0, 2), (3, 5), (6, 8)]:
            # the whole window runs at the window's prediction, and the real weights do not move inside it
            for i in range(start + 1, end + 1):
                assert torch.equal(seen.at_batch_start[(epoch, i)], seen.at_batch_start[(epoch, start)])
                assert torch.equal(real.at_batch_start[(epoch, i)], seen.at_batch_start[(epoch, start)])
        if epoch == 1:
            assert not torch.equal(seen.at_batch_start[(1, 3)], real.at_batch_start[(1, 3)])


# ---------------------------------------------------------------- validation mid-window


def test_validation_mid_window_sees_real_weights_and_the_window_goes_on_unchanged() -> None:
    real, seen = RealWeights(), SeenWeights()
    kwargs = dict(max_epochs=2, accumulate_grad_batches=4, limit_val_batches=1.0)
    with_val = TinyModule(OPTIMIZERS["sgd_momentum"])
    # validation after batches 2, 5, 8: mid-window for accumulate_grad_batches=4
    _fit(with_val, [real, XGradCallback(), seen], val_check_interval=3, **kwargs)
    without_val = TinyModule(OPTIMIZERS["sgd_momentum"])
    _fit(without_val, [XGradCallback()], **{**kwargs, "limit_val_batches": 0})
    mid_window = [(epoch, i, w) for epoch, i, w in seen.at_validation if (i + 1) % 4 != 0 and i != 9]
    assert len(mid_window) == 6  # after batches 2 and 5 of each epoch (8 ends a window)
    for epoch, i, w in mid_window:
        assert torch.equal(w, real.at_batch_start[(epoch, i - i % 4)])  # real weights, not the prediction
    assert not torch.equal(seen.at_batch_start[(1, 4)], real.at_batch_start[(1, 4)])
    # the prediction resumed after validation is the same one: both runs end bit-identical
    assert torch.equal(flat(with_val), flat(without_val))


# ---------------------------------------------------------------- checkpoints


class SaveMidWindow(Callback):
    """Placed after XGradCallback: saves a checkpoint at a micro-batch that does not end its window."""

    def __init__(self, path: str, at_batch: int, weights_only: bool) -> None:
        self.path, self.at_batch, self.weights_only = path, at_batch, weights_only
        self.live: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Any, b: Any, i: int):
        if trainer.current_epoch == 1 and i == self.at_batch:
            self.live = flat(pl_module)
            trainer.save_checkpoint(self.path, weights_only=self.weights_only)


@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "weights_only"])
def test_checkpoint_written_mid_window_holds_real_weights(tmp_path, weights_only: bool) -> None:
    real = RealWeights()
    saver = SaveMidWindow(str(tmp_path / "mid.ckpt"), at_batch=4, weights_only=weights_only)
    module = TinyModule(OPTIMIZERS["adam"])
    _fit(module, [real, XGradCallback(), saver], max_epochs=2, accumulate_grad_batches=3)
    saved = torch.load(saver.path, weights_only=False)["state_dict"]
    saved_flat = torch.cat([saved[k].reshape(-1) for k in module.state_dict()])
    assert torch.equal(saved_flat, real.at_batch_start[(1, 3)])  # the window [3-5] started from these
    assert not torch.equal(saver.live, saved_flat)  # the live weights really held a prediction then


def test_model_checkpoint_and_state_dict_keep_vars_are_untouched(tmp_path) -> None:
    module = TinyModule(OPTIMIZERS["adam"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    t = _fit(module, [XGradCallback(), checkpoint], max_epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / f"epoch=0-step={t.global_step}.ckpt", weights_only=False)
    assert torch.equal(torch.cat([v.reshape(-1) for v in saved["state_dict"].values()]), flat(module))
    assert all(v is p for v, p in zip(module.state_dict(keep_vars=True).values(), module.parameters(), strict=True))


# ---------------------------------------------------------------- exceptions and the end of fit


class FailingModule(TinyModule):
    def __init__(self, fail_at: int, error: type[BaseException], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_at, self.error = fail_at, error

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.current_epoch == 1 and batch_idx == self.fail_at:
            raise self.error("boom")
        return super().training_step(batch, batch_idx)


def test_exception_in_training_step_leaves_real_weights() -> None:
    real = RealWeights()
    module = FailingModule(fail_at=4, error=RuntimeError, optimizer=OPTIMIZERS["adam"])
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, [real, XGradCallback()], max_epochs=2, accumulate_grad_batches=3)
    assert torch.equal(flat(module), real.at_batch_start[(1, 3)])


def test_keyboard_interrupt_leaves_real_weights() -> None:
    real = RealWeights()
    module = FailingModule(fail_at=5, error=KeyboardInterrupt, optimizer=OPTIMIZERS["sgd_momentum"])
    try:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
            _fit(module, [real, XGradCallback()], max_epochs=2)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert torch.equal(flat(module), real.at_batch_start[(1, 5)])


class SkipEpochAt(TinyModule):
    """Returns -1 from on_train_batch_start at one batch: Lightning skips the rest of the epoch, with no step."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        return -1 if (self.current_epoch, batch_idx) == (1, 3) else None


def test_window_abandoned_at_the_end_of_an_epoch_and_of_fit_restores() -> None:
    real, seen = RealWeights(), SeenWeights()
    module = SkipEpochAt(OPTIMIZERS["adam"])
    _fit(module, [real, XGradCallback(), seen], max_epochs=2)
    assert not torch.equal(seen.at_batch_start[(1, 3)], real.at_batch_start[(1, 3)])  # it had predicted
    assert torch.equal(flat(module), real.at_batch_start[(1, 3)])


class SkipStepAt(TinyModule):
    """Overrides optimizer_step to skip one update: it runs the closure itself, so on_before_optimizer_step never
    fires for that batch."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if (epoch, batch_idx) == (1, 2):
            optimizer_closure()
        else:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


class WeightsAtBatchEnd(Callback):
    def __init__(self) -> None:
        self.at_end: dict[tuple[int, int], torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Any, b: Any, i: int):
        self.at_end[(trainer.current_epoch, i)] = flat(pl_module)


def test_a_step_that_never_happens_is_restored_at_batch_end() -> None:
    real, end = RealWeights(), WeightsAtBatchEnd()
    _fit(SkipStepAt(OPTIMIZERS["adam"]), [real, XGradCallback(), end], max_epochs=2)
    assert torch.equal(end.at_end[(1, 2)], real.at_batch_start[(1, 2)])
    assert torch.equal(real.at_batch_start[(1, 3)], real.at_batch_start[(1, 2)])  # no update happened


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("name", ["adam", "rmsprop"], ids=["state_rule", "trajectory_rule"])
def test_resumed_run_follows_the_uninterrupted_trajectory(tmp_path, name: str) -> None:
    # resumed at an epoch boundary: with a plain DataLoader Lightning itself replays data on a mid-epoch resume
    x, y = make_data(80)
    straight = TinyModule(OPTIMIZERS[name])
    trainer(callbacks=[XGradCallback(steps=2)], max_epochs=3).fit(straight, loader(x, y))

    first = TinyModule(OPTIMIZERS[name])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    t = trainer(callbacks=[XGradCallback(steps=2), checkpoint], max_epochs=2, enable_checkpointing=True)
    t.fit(first, loader(x, y))
    saved = torch.load(tmp_path / "epoch=1-step=20.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("XGradCallback"))
    if name == "rmsprop":  # the trajectory rule needs the weights before the last step
        assert len(state["optimizers"][0]["previous"]) == len(list(first.parameters()))

    resumed = TinyModule(OPTIMIZERS[name])
    trainer(callbacks=[XGradCallback(steps=2)], max_epochs=3).fit(
        resumed, loader(x, y), ckpt_path=str(tmp_path / "epoch=1-step=20.ckpt")
    )
    torch.testing.assert_close(flat(resumed), flat(straight), rtol=0, atol=0)


def test_resume_without_the_trajectory_state_would_differ(tmp_path) -> None:
    """The check above can fail: dropping the callback's state changes the resumed run."""
    x, y = make_data(80)
    straight = TinyModule(OPTIMIZERS["rmsprop"])
    trainer(callbacks=[XGradCallback()], max_epochs=3).fit(straight, loader(x, y))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    t = trainer(callbacks=[XGradCallback(), checkpoint], max_epochs=2, enable_checkpointing=True)
    t.fit(TinyModule(OPTIMIZERS["rmsprop"]), loader(x, y))
    path = tmp_path / "epoch=1-step=20.ckpt"
    saved = torch.load(path, weights_only=False)
    saved["callbacks"] = {}
    torch.save(saved, path)
    resumed = TinyModule(OPTIMIZERS["rmsprop"])
    trainer(callbacks=[XGradCallback()], max_epochs=3).fit(resumed, loader(x, y), ckpt_path=str(path))
    assert (flat(resumed) - flat(straight)).abs().max() > 1e-6


# ---------------------------------------------------------------- start_step, frozen parameters, logging


def test_no_prediction_before_start_step() -> None:
    real, seen = RealWeights(), SeenWeights()
    t = _fit(TinyModule(OPTIMIZERS["adam"]), [real, XGradCallback(start_step=6), seen], max_epochs=1)
    assert t.global_step == 10
    for i in range(10):
        predicted = not torch.equal(seen.at_batch_start[(0, i)], real.at_batch_start[(0, i)])
        assert predicted == (i >= 6), i


class FreezeFirstLayerAt(Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == 4:
            pl_module.net[0].requires_grad_(False)


def test_parameters_frozen_mid_training_are_not_predicted() -> None:
    real, seen = RealWeights(), SeenWeights()
    module = TinyModule(OPTIMIZERS["adam"])
    _fit(module, [FreezeFirstLayerAt(), real, XGradCallback(), seen], max_epochs=1)
    n_first = sum(p.numel() for p in module.net[0].parameters())
    for i in range(5, 10):
        assert torch.equal(seen.at_batch_start[(0, i)][:n_first], real.at_batch_start[(0, i)][:n_first])
        assert not torch.equal(seen.at_batch_start[(0, i)][n_first:], real.at_batch_start[(0, i)][n_first:])
    assert not torch.equal(seen.at_batch_start[(0, 2)][:n_first], real.at_batch_start[(0, 2)][:n_first])


def test_relative_shift_is_logged_every_n_steps() -> None:
    class Logged(Callback):
        def __init__(self) -> None:
            self.values: dict[int, float] = {}

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Any, b: Any, i: int):
            if "xgrad/relative_shift" in trainer.callback_metrics:
                self.values[i] = float(trainer.callback_metrics["xgrad/relative_shift"])

    real, seen, logged = RealWeights(), SeenWeights(), Logged()
    _fit(TinyModule(OPTIMIZERS["sgd_momentum"]), [real, XGradCallback(log_every_n_steps=4), seen, logged], max_epochs=1)
    assert set(logged.values) >= {4, 8}
    for i in (4, 8):
        w, w_hat = real.at_batch_start[(0, i)], seen.at_batch_start[(0, i)]
        assert logged.values[i] == pytest.approx(float((w_hat - w).norm() / w.norm()), rel=1e-5)
    assert logged.values[5] == logged.values[4]  # not logged again until step 8


def test_the_rule_each_optimizer_got_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _fit(TinyModule(OPTIMIZERS["adamw"]), [XGradCallback()], max_epochs=1, n=16)
        _fit(TinyModule(OPTIMIZERS["rmsprop"]), [XGradCallback()], max_epochs=1, n=16)
    assert "optimizer 0 (AdamW) predicts with the adam rule, steps=1" in caplog.text
    assert "optimizer 0 (RMSprop) predicts with the trajectory rule" in caplog.text


# ---------------------------------------------------------------- bad input and unsupported setups


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"steps": 0}, ValueError, "`steps` must be an integer >= 1, got 0"),
        ({"steps": 1.5}, TypeError, "`steps` must be an integer >= 1, got 1.5"),
        ({"steps": True}, TypeError, "`steps` must be an integer >= 1, got True"),
        ({"steps": "2"}, TypeError, "`steps` must be an integer >= 1, got '2'"),
        ({"rule": "adam"}, ValueError, "`rule` must be one of ('auto', 'trajectory'), got 'adam'"),
        ({"start_step": -1}, ValueError, "`start_step` must be an integer >= 0, got -1"),
        ({"log_every_n_steps": 0}, ValueError, "`log_every_n_steps` must be an integer >= 1 or None, got 0"),
        ({"log_every_n_steps": 2.0}, TypeError, "`log_every_n_steps` must be an integer >= 1 or None, got 2.0"),
    ],
)
def test_bad_arguments_are_named_with_the_allowed_values(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        XGradCallback(**kwargs)
    assert str(info.value) == f"XGradCallback: {message}"


def test_lbfgs_is_refused() -> None:
    lbfgs = lambda p: torch.optim.LBFGS(p, lr=0.1)  # noqa: E731
    with pytest.raises(MisconfigurationException, match=r"LBFGS \(optimizer 0\).*evaluates the closure"):
        _fit(TinyModule(lbfgs), [XGradCallback()], max_epochs=1, n=16)


@pytest.mark.parametrize(
    ("strategy_class", "pointer"),
    [(FSDPStrategy, "issue 117742"), (DeepSpeedStrategy, "ZeRO wrapper")],
)
def test_fsdp1_and_deepspeed_are_refused_at_setup_by_name(strategy_class: type, pointer: str) -> None:
    strategy = strategy_class.__new__(strategy_class)  # constructing them needs CUDA or deepspeed
    fake_trainer = type("T", (), {"strategy": strategy})()
    with pytest.raises(MisconfigurationException) as info:
        XGradCallback().setup(fake_trainer, TinyModule(), "fit")
    message = str(info.value)
    assert f"does not support {strategy_class.__name__}" in message
    assert pointer in message and "ModelParallelStrategy" in message  # why, and what to use instead


class SharedParameter(TinyModule):
    """Two optimizers that both hold the output layer: each step restores its own parameters, so it is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net.parameters(), lr=0.1), torch.optim.Adam(self.net[2].parameters())

    def training_step(self, batch: Any, batch_idx: int) -> None:
        pass


def test_a_parameter_in_two_optimizers_is_refused() -> None:
    with pytest.raises(MisconfigurationException, match=r"belongs to optimizers 0 and 1"):
        _fit(SharedParameter(), [XGradCallback()], max_epochs=1, n=16)
