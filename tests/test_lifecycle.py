"""XGradCallback in Lightning's lifecycle: accumulation windows, validation, checkpoints, exceptions, resume, args.

Spies placed before and after XGradCallback in the callback list see the weights just before the prediction (the
real W) and just after it; every check below compares module weights with those independent recordings.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import signal
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn

from lightning_xgrad import XGradCallback
from lightning_xgrad.prediction.predictor import OptimizerPredictor
from lightning_xgrad.prediction.snapshot import ParameterSnapshot

from .agreement import mse
from .reference import xgrad_reference
from .toolkit import OPTIMIZERS, TinyModule, batches, flat, loader, make_data, make_net, trainer


class RealWeights(Callback):
    """Placed before XGradCallback: the real weights at the start of every micro-batch, by batch index."""

    def __init__(self) -> None:
        self.at_batch_start: dict[tuple[int, int], torch.Tensor] = {}
        self.module: pl.LightningModule | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.at_batch_start[(trainer.current_epoch, i)] = flat(pl_module)
        self.module = pl_module


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


# ---------------------------------------------------------------- a learning rate that reaches 0


class LrReachesZero(TinyModule):
    """SGD with two param groups: ``net.0`` without momentum (the trajectory rule), whose per-step schedule takes its
    lr to 0 at steps 3 and 4 (a group frozen by lr=0) and back, and ``net.2`` with momentum 0.9 (the state rule) at a
    constant lr. ``abandon`` raises in training_step (``"raise"``) or skips the update (``"skip"``) at step 3, the
    first step at lr 0: either way the predicted window is abandoned."""

    def __init__(self, abandon: str | None = None) -> None:
        super().__init__()
        self.abandon = abandon
        self.skipped = False

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            [{"params": self.net[0].parameters(), "momentum": 0.0}, {"params": self.net[2].parameters()}],
            lr=0.05,
            momentum=0.9,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_zero_at_3_and_4, lambda step: 1.0])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.abandon == "raise" and self.global_step == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.abandon == "skip" and self.global_step == 3 and not self.skipped:
            self.skipped = True
            optimizer_closure()
        else:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)


def lr_zero_at_3_and_4(step: int) -> float:
    return 0.0 if step in (3, 4) else 1.0


def test_a_group_at_lr_zero_trains_like_the_reference() -> None:
    module = LrReachesZero()
    _fit(module, [XGradCallback(steps=2)], max_epochs=1)
    net = make_net()
    optimizer = torch.optim.SGD(
        [{"params": net[0].parameters(), "momentum": 0.0}, {"params": net[2].parameters()}], lr=0.05, momentum=0.9
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lr_zero_at_3_and_4, lambda step: 1.0])
    xgrad_reference(net, optimizer, batches(*make_data(80), 8), mse, steps=2, scheduler=scheduler)
    torch.testing.assert_close(flat(module), flat(net), rtol=1e-5, atol=1e-6)


def test_an_exception_at_lr_zero_surfaces_and_leaves_real_weights() -> None:
    real = RealWeights()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(LrReachesZero(abandon="raise"), [real, XGradCallback(steps=2)], max_epochs=1)
    # on_exception restored them (checked through the module the Trainer trained, via the spy's last record)
    module = real.module
    assert torch.equal(flat(module), real.at_batch_start[(0, 3)])


def test_a_skipped_update_at_lr_zero_is_restored_at_batch_end() -> None:
    real, end = RealWeights(), WeightsAtBatchEnd()
    _fit(LrReachesZero(abandon="skip"), [real, XGradCallback(steps=2), end], max_epochs=1)
    assert torch.equal(end.at_end[(0, 3)], real.at_batch_start[(0, 3)])


class CosineToZero(TinyModule):
    """Adam under a per-step CosineAnnealingLR with eta_min=0: the lr is exactly 0 at step 4 (then rises again);
    training_step raises there when asked."""

    def __init__(self, raise_at: int | None = None) -> None:
        super().__init__(OPTIMIZERS["adam"])
        self.raise_at = raise_at

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.raise_at:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_cosine_annealing_to_zero_under_the_trajectory_rule() -> None:
    module = CosineToZero()
    _fit(module, [XGradCallback(rule="trajectory")], max_epochs=1)
    net = make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=0.0)
    xgrad_reference(net, optimizer, batches(*make_data(80), 8), mse, steps=1, scheduler=scheduler, rule="trajectory")
    torch.testing.assert_close(flat(module), flat(net), rtol=1e-5, atol=1e-6)

    real = RealWeights()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(CosineToZero(raise_at=4), [real, XGradCallback(rule="trajectory")], max_epochs=1)
    assert torch.equal(flat(real.module), real.at_batch_start[(0, 4)])


def test_predictor_alone_at_lr_zero_restores_and_keeps_the_last_direction() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, dtype=torch.float64))
    optimizer = torch.optim.SGD([w], lr=0.1)  # no momentum: the trajectory rule
    predictor = OptimizerPredictor(optimizer, steps=2)
    for _ in range(3):
        predictor.predict()
        (w**4).sum().backward()
        predictor.restore()
        before = w.detach().clone()
        optimizer.step()
        optimizer.zero_grad()
    last_update = w.detach() - before
    real = w.detach().clone()

    optimizer.param_groups[0]["lr"] = 0.0
    predictor.predict()
    assert torch.equal(w.detach(), real)  # nothing to extrapolate at lr 0
    predictor.restore(stepped=False)  # abandoned at lr 0
    assert torch.equal(w.detach(), real)

    optimizer.param_groups[0]["lr"] = 0.05
    predictor.predict()
    torch.testing.assert_close(w.detach(), real + 2 * 0.5 * last_update, rtol=0, atol=1e-15)
    predictor.restore(stepped=False)  # abandoned again, this time after a real extrapolation
    assert torch.equal(w.detach(), real)

    optimizer.param_groups[0]["lr"] = 0.1
    predictor.predict()  # the last real update's direction survived both abandoned steps
    torch.testing.assert_close(w.detach(), real + 2 * 1.0 * last_update, rtol=0, atol=1e-15)
    predictor.restore()
    assert torch.equal(w.detach(), real)


def test_a_failing_restore_still_restores_everything_else_and_the_users_exception_surfaces(monkeypatch) -> None:
    original = ParameterSnapshot.restore
    failures = []

    def restore_failing_once(params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
        if failures == ["armed"]:
            failures[:] = [len(params)]
            raise RuntimeError("injected restore failure")
        original(params, buffers)

    real = RealWeights()
    module = FailingModule(fail_at=4, error=RuntimeError, optimizer=two_groups)
    monkeypatch.setattr(ParameterSnapshot, "restore", staticmethod(restore_failing_once))
    monkeypatch.setattr(XGradCallback, "on_exception", failing_from_now_on(XGradCallback.on_exception, failures))
    with pytest.warns(UserWarning, match="injected restore failure"), pytest.raises(RuntimeError, match="boom"):
        _fit(module, [real, XGradCallback()], max_epochs=2)
    n_first = sum(p.numel() for p in module.net[0].parameters())
    assert failures == [2]  # the first bucket (net.0) failed ...
    assert torch.equal(flat(module)[n_first:], real.at_batch_start[(1, 4)][n_first:])  # ... the other was restored


def failing_from_now_on(hook: Any, failures: list[Any]) -> Any:
    """Wraps on_exception so that the next snapshot restore, the first one it makes, fails."""

    def armed(*args: Any) -> None:
        failures.append("armed")
        hook(*args)

    return armed


def test_predictor_restore_goes_on_past_a_failing_bucket_and_raises_after(monkeypatch) -> None:
    net = make_net()
    optimizer = two_groups(net.parameters())
    predictor = OptimizerPredictor(optimizer)
    x, y = make_data(8)
    for _ in range(2):
        predictor.predict()
        mse(net, (x, y)).backward()
        predictor.restore()
        optimizer.step()
    real = flat(net)
    predictor.predict()
    assert not torch.equal(flat(net), real)
    calls = []
    original = ParameterSnapshot.restore

    def failing_first(params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
        calls.append(len(params))
        if len(calls) == 1:
            raise RuntimeError("injected")
        original(params, buffers)

    monkeypatch.setattr(ParameterSnapshot, "restore", staticmethod(failing_first))
    with pytest.raises(RuntimeError, match="injected"):
        predictor.restore()
    assert calls == [2, 2]  # both buckets were attempted
    n_first = sum(p.numel() for p in net[0].parameters())
    assert torch.equal(flat(net)[n_first:], real[n_first:])
    assert predictor.phase == "idle"


def two_groups(params: Any) -> torch.optim.Optimizer:
    """Adam with one param group per Linear layer of ``make_net`` (two buckets)."""
    params = list(params)
    return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=0.01)


# ---------------------------------------------------------------- optimizers replaced during fit


class ReplaceOptimizerAtEpoch(Callback):
    """The fine-tuning recipe: a fresh optimizer assigned to the strategy at the start of an epoch."""

    def __init__(self, epoch: int, factory: Any) -> None:
        self.epoch, self.factory = epoch, factory

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.strategy.optimizers = [self.factory(pl_module.parameters())]


@pytest.mark.parametrize("before_xgrad", [True, False], ids=["replacer_first", "replacer_last"])
@pytest.mark.parametrize("rule", ["auto", "trajectory"])
def test_a_replaced_optimizer_is_predicted_like_xgrad_on_the_new_one(before_xgrad: bool, rule: str) -> None:
    module = TinyModule(OPTIMIZERS["sgd_momentum"])
    replacer = ReplaceOptimizerAtEpoch(1, OPTIMIZERS["adam"])
    xgrad = XGradCallback(steps=2, rule=rule)
    _fit(module, [replacer, xgrad] if before_xgrad else [xgrad, replacer], max_epochs=2)

    net, data = make_net(), batches(*make_data(80), 8)
    xgrad_reference(net, OPTIMIZERS["sgd_momentum"](net.parameters()), data, mse, steps=2, rule=rule)
    xgrad_reference(net, OPTIMIZERS["adam"](net.parameters()), data, mse, steps=2, rule=rule)
    torch.testing.assert_close(flat(module), flat(net), rtol=1e-5, atol=1e-6)


class SteppingAllOptimizers(TinyModule):
    """Manual optimization that steps whatever optimizers the strategy holds right now."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.net[0].parameters(), lr=0.01)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        for optimizer in optimizers:
            optimizer.step()


class ChangeOptimizerList(Callback):
    """Epoch 1: an optimizer for ``net.2`` is added; epoch 2: the one for ``net.0`` is removed."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = list(trainer.strategy.optimizers)
        if trainer.current_epoch == 1:
            trainer.strategy.optimizers = [*optimizers, torch.optim.SGD(pl_module.net[2].parameters(), lr=0.05)]
        if trainer.current_epoch == 2:
            trainer.strategy.optimizers = optimizers[1:]


def test_added_and_removed_optimizers_are_predicted_from_the_next_window_on() -> None:
    real, seen = RealWeights(), SeenWeights()
    module = SteppingAllOptimizers()
    _fit(module, [ChangeOptimizerList(), real, XGradCallback(), seen], max_epochs=3)
    n_first = sum(p.numel() for p in module.net[0].parameters())

    def predicted(epoch: int, i: int) -> tuple[bool, bool]:
        shift = seen.at_batch_start[(epoch, i)] - real.at_batch_start[(epoch, i)]
        return bool(shift[:n_first].any()), bool(shift[n_first:].any())

    assert predicted(0, 5) == (True, False)  # net.2 belongs to no optimizer
    assert predicted(1, 0) == (True, False)  # the added SGD has not stepped yet (trajectory: no update applied)
    assert predicted(1, 5) == (True, True)
    assert predicted(2, 5) == (False, True)  # net.0's optimizer was removed
    # net.0 stopped training in epoch 2: the removed optimizer's hooks and predictions are gone
    assert torch.equal(real.at_batch_start[(2, 9)][:n_first], real.at_batch_start[(2, 0)][:n_first])


# ---------------------------------------------------------------- optimizer state reset or loaded


class ResetOptimizerState(Callback):
    """Placed before XGradCallback: at step ``at`` resets the Adam state of ``net.0`` in one of several ways."""

    def __init__(self, style: str, at: int = 6, saved_at: int = 3) -> None:
        self.style, self.at, self.saved_at = style, at, saved_at
        self.saved: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        reset_state(trainer.optimizers[0], pl_module.net, self, trainer.global_step)


def reset_state(optimizer: torch.optim.Optimizer, net: nn.Module, plan: Any, step: int) -> None:
    """The state change ``plan`` describes, at step ``step`` (shared by the Trainer run and the reference)."""
    if step == plan.saved_at:
        plan.saved = copy.deepcopy(optimizer.state_dict())
    if step != plan.at:
        return
    if plan.style == "assign_empty":
        for p in net[0].parameters():
            optimizer.state[p] = {}
    elif plan.style == "delete":
        for p in net[0].parameters():
            del optimizer.state[p]
    elif plan.style == "clear":
        optimizer.state.clear()
    elif plan.style == "load_earlier":
        optimizer.load_state_dict(plan.saved)


@pytest.mark.parametrize("style", ["assign_empty", "delete", "clear", "load_earlier"])
def test_a_reset_or_loaded_optimizer_state_is_never_predicted_from_stale_tensors(style: str) -> None:
    module = TinyModule(OPTIMIZERS["adam"])
    _fit(module, [ResetOptimizerState(style), XGradCallback(steps=2)], max_epochs=1)

    net = make_net()
    optimizer = OPTIMIZERS["adam"](net.parameters())
    plan = ResetOptimizerState(style)
    xgrad_reference(
        net,
        optimizer,
        batches(*make_data(80), 8),
        mse,
        steps=2,
        on_window_start=lambda t: reset_state(optimizer, net, plan, t),
    )
    torch.testing.assert_close(flat(module), flat(net), rtol=1e-5, atol=1e-6)


def test_the_plan_is_not_rebuilt_every_step(monkeypatch) -> None:
    builds = []
    original = OptimizerPredictor._build_plan

    def counting(self: OptimizerPredictor, *args: Any) -> None:
        builds.append(1)
        original(self, *args)

    monkeypatch.setattr(OptimizerPredictor, "_build_plan", counting)
    _fit(TinyModule(OPTIMIZERS["adam"]), [ResetOptimizerState("assign_empty"), XGradCallback()], max_epochs=2)
    # 20 steps: plans at the first step (no state yet), the second (state complete), and the same two again after
    # the reset at step 6; a few more are fine, one per step is not
    assert len(builds) <= 6


# ---------------------------------------------------------------- pickling and copying the module mid-window


class PicklesItself(pl.LightningModule):
    """Saves itself with torch.save and deep-copies itself in training_step at step 4 (mid-window: the prediction is
    in place). Module-level and free of lambdas, so that it pickles."""

    def __init__(self, save_at: int | None = 4) -> None:
        super().__init__()
        self.net = make_net()
        self.save_at = save_at
        self.pickled: bytes | None = None
        self.copies: list[nn.Module] = []  # a list: a module attribute would become a submodule
        self.live: torch.Tensor | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.save_at and self.pickled is None:
            self.live = flat(self)
            stream = io.BytesIO()
            torch.save(self, stream)
            self.pickled = stream.getvalue()
            self.copies.append(copy.deepcopy(self.net))
        return mse(self.net, batch)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_torch_save_and_deepcopy_of_the_module_mid_window_hold_the_real_weights() -> None:
    real = RealWeights()
    module = PicklesItself()
    _fit(module, [real, XGradCallback()], max_epochs=1)
    expected = real.at_batch_start[(0, 4)]
    assert not torch.equal(module.live, expected)  # the module held the prediction then
    loaded = torch.load(io.BytesIO(module.pickled), weights_only=False)
    assert torch.equal(flat(loaded.net), expected)
    assert torch.equal(torch.cat([v.reshape(-1) for v in loaded.net.state_dict().values()]), expected)
    assert torch.equal(flat(module.copies[0]), expected)
    torch.save(loaded, io.BytesIO())  # the loaded module pickles again
    # saving and copying did not disturb training
    undisturbed = PicklesItself(save_at=None)
    _fit(undisturbed, [XGradCallback()], max_epochs=1)
    assert torch.equal(flat(module), flat(undisturbed))


# ---------------------------------------------------------------- messages


def test_the_callback_added_twice_is_refused_with_the_fix() -> None:
    with pytest.raises(MisconfigurationException) as info:
        _fit(TinyModule(), [XGradCallback(), XGradCallback(steps=2)], max_epochs=1, n=16)
    message = str(info.value)
    assert "XGradCallback was added 2 times" in message
    assert "--trainer.callbacks+=" in message  # the usual way to end up there, and what to do instead


class NoOptimizer(TinyModule):
    def configure_optimizers(self) -> None:
        return None


def test_a_model_without_an_optimizer_is_told_once_that_xgrad_has_nothing_to_do(caplog) -> None:
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning) as record:
        _fit(NoOptimizer(), [XGradCallback()], max_epochs=2, n=16)
    ours = [str(w.message) for w in record if "XGradCallback" in str(w.message)]
    assert ours == ["XGradCallback: the model has no optimizer, so XGrad has nothing to predict."]
    assert "predicts with the" not in caplog.text


def test_resuming_with_other_steps_or_rule_warns_once_naming_both(tmp_path) -> None:
    x, y = make_data(80)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1)
    trainer(
        callbacks=[XGradCallback(steps=2, rule="trajectory"), checkpoint], max_epochs=1, enable_checkpointing=True
    ).fit(TinyModule(OPTIMIZERS["rmsprop"]), loader(x, y))
    with pytest.warns(UserWarning) as record:
        trainer(callbacks=[XGradCallback(steps=1)], max_epochs=2).fit(
            TinyModule(OPTIMIZERS["rmsprop"]), loader(x, y), ckpt_path=str(tmp_path / "epoch=0-step=10.ckpt")
        )
    ours = [str(w.message) for w in record if "XGradCallback" in str(w.message)]
    assert len(ours) == 1
    assert "steps=2, rule='trajectory'" in ours[0] and "steps=1, rule='auto'" in ours[0]


# ---------------------------------------------------------------- logging at the callback's own cadence


@pytest.mark.parametrize("trainer_every", [1, 50])
def test_relative_shift_reaches_the_logger_at_its_own_steps(tmp_path, trainer_every: int) -> None:
    real, seen = RealWeights(), SeenWeights()
    logger = CSVLogger(tmp_path, name="", version="")
    _fit(
        TinyModule(OPTIMIZERS["sgd_momentum"]),
        [real, XGradCallback(log_every_n_steps=3), seen],
        max_epochs=2,
        logger=logger,
        log_every_n_steps=trainer_every,
    )
    with open(tmp_path / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("xgrad/relative_shift")]
    logged = [(int(row["step"]), float(row["xgrad/relative_shift"])) for row in rows]
    expected = []
    for (epoch, i), w in sorted(real.at_batch_start.items()):
        step = 10 * epoch + i  # 10 batches per epoch, one step each
        if step % 3 == 0 and step > 0:  # step 0 has nothing to predict from
            expected.append((step, float((seen.at_batch_start[(epoch, i)] - w).norm() / w.norm())))
    assert [step for step, _ in logged] == [step for step, _ in expected]  # every value once, at its own step
    for (_, value), (_, truth) in zip(logged, expected, strict=True):
        assert value == pytest.approx(truth, rel=1e-5)


class ReplaceOptimizerMidWindow(Callback):
    """After XGradCallback: replaces the optimizer at the start of one batch, when the prediction is already in
    place (and then keeps it)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == self.at_step:
            trainer.strategy.optimizers = [OPTIMIZERS["adam"](pl_module.parameters())]


def test_an_optimizer_replaced_mid_window_updates_the_real_weights() -> None:
    """Its first update starts from the real weights (the old optimizer's prediction is put back first); from the next
    window on it is predicted itself."""
    real, seen, at_update = RealWeights(), SeenWeights(), RealAtUpdate()
    callbacks = [real, XGradCallback(), ReplaceOptimizerMidWindow(4), seen, at_update]
    _fit(TinyModule(OPTIMIZERS["sgd_momentum"]), callbacks, max_epochs=1)
    assert not torch.equal(seen.at_batch_start[(0, 4)], real.at_batch_start[(0, 4)])  # it ran at a prediction
    assert torch.equal(at_update.weights[4], real.at_batch_start[(0, 4)])  # the new optimizer's update: real weights
    assert all(torch.equal(at_update.weights[i], real.at_batch_start[(0, i)]) for i in range(10))
    assert not torch.equal(seen.at_batch_start[(0, 6)], real.at_batch_start[(0, 6)])  # the new one is predicted


class RealAtUpdate(Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.weights.append(flat(pl_module))
