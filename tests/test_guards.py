"""What keeps an update or an edit from being lost silently while the parameters hold W_hat.

- ``OptimizerPredictor`` guards the optimizer's step as ``XGradCallback`` does: a loop that steps before
  ``restore()``, or never calls it, trains exactly like the documented loop (against the plain-PyTorch reference);
- an in-place change of a predicted parameter between the prediction and the restore (a WGAN clamp written at the
  top of ``training_step``) is warned about once, naming the parameter and the remedy; the package's own writes and
  the user's optimizer steps are not (the whole suite runs with this warning as an error, see pyproject.toml).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_xgrad import OptimizerPredictor, PredictedWeightsEditedWarning, XGradCallback
from lightning_xgrad.prediction.edits import EDIT_CHECK_PERIOD, EDIT_CHECKS_FIRST

from .agreement import mse
from .reference import xgrad_reference
from .toolkit import TinyModule, batches, flat, loader, make_data, make_net, trainer

X, Y = make_data(80)
DATA = batches(X, Y, 8)

OPTIMIZERS: dict[str, Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_trajectory": lambda p: torch.optim.SGD(p, lr=0.05),
}


def _loop(name: str, order: str, epochs: int = 2) -> nn.Module:
    """Train with ``OptimizerPredictor`` in a plain loop: ``documented`` (predict, backward, restore, step),
    ``step_then_restore``, ``no_restore`` (restore never called) or ``closure`` (the forward and backward pass in
    the closure given to ``step``, no restore)."""
    net = make_net()
    optimizer = OPTIMIZERS[name](net.parameters())
    predictor = OptimizerPredictor(optimizer, steps=2)
    for _ in range(epochs):
        for batch in DATA:
            predictor.predict()
            if order == "closure":

                def closure(batch: Any = batch) -> Tensor:
                    optimizer.zero_grad()
                    loss = mse(net, batch)
                    loss.backward()
                    return loss

                optimizer.step(closure)
                continue
            mse(net, batch).backward()
            if order == "documented":
                predictor.restore()
            optimizer.step()
            if order == "step_then_restore":
                predictor.restore()
            optimizer.zero_grad()
    predictor.close()
    return net


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("order", ["step_then_restore", "no_restore", "closure"])
def test_a_loop_that_steps_before_restore_trains_like_the_documented_loop(name: str, order: str) -> None:
    documented = flat(_loop(name, "documented"))
    assert torch.equal(flat(_loop(name, order)), documented)

    net = make_net()
    xgrad_reference(net, OPTIMIZERS[name](net.parameters()), DATA, mse, steps=2, epochs=2)
    torch.testing.assert_close(documented, flat(net), rtol=1e-5, atol=1e-6)
    baseline = make_net()
    xgrad_reference(baseline, OPTIMIZERS[name](baseline.parameters()), DATA, mse, steps=None, epochs=2)
    assert (flat(baseline) - flat(net)).abs().max() > 1e-3


class HooklessSGD(torch.optim.Optimizer):
    """Plain SGD that never calls ``Optimizer.__init__`` and wraps nothing: no step hooks anywhere."""

    def __init__(self, params: Any, lr: float = 0.05) -> None:
        self.param_groups = [{"params": list(params), "lr": lr}]
        self.defaults = {"lr": lr}
        self.state: dict[Tensor, Any] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def test_a_step_before_restore_on_an_optimizer_without_step_hooks_is_warned_about() -> None:
    """Nothing can restore ahead of such an optimizer's step; the lost update shows as an edit of W_hat, and the
    warning says why and what to do."""
    net = make_net()
    optimizer = HooklessSGD(net.parameters())
    predictor = OptimizerPredictor(optimizer, parameter_names={p: n for n, p in net.named_parameters()})
    assert not predictor.guards_step
    with pytest.warns(PredictedWeightsEditedWarning) as records:
        for batch in DATA[:4]:
            predictor.predict()
            mse(net, batch).backward()
            optimizer.step()  # before restore: the update lands on W_hat
            predictor.restore()
            optimizer.zero_grad()
    edits = [r for r in records if issubclass(r.category, PredictedWeightsEditedWarning)]
    assert len(edits) == 1
    message = str(edits[0].message)
    assert "`0.weight`, `0.bias`, `2.weight` and 1 more changed in place" in message
    assert "HooklessSGD runs no step hooks" in message and "call restore() before every step()" in message


# ---------------------------------------------------------------- edits of W_hat inside training_step

CLIP = 0.05


class ClampingModule(TinyModule):
    """Clamps every weight to [-CLIP, CLIP] at the top of training_step, as a WGAN critic does: either on whatever
    the parameters hold (``inside=False``, the usual way of writing it) or inside ``XGradCallback.real_weights``."""

    def __init__(self, inside: bool) -> None:
        super().__init__(OPTIMIZERS["adamw"])
        self.inside = inside

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        with XGradCallback.real_weights(self) if self.inside else torch.enable_grad(), torch.no_grad():
            for p in self.net.parameters():
                p.clamp_(-CLIP, CLIP)
        return super().training_step(batch, batch_idx)


def test_a_clamp_of_the_predicted_weights_in_training_step_is_warned_about_once() -> None:
    """Written the usual way, the clamp lands on W_hat and the restore throws it away: the real weights leave the
    clip range. One warning names the parameters and the remedy."""
    module = ClampingModule(inside=False)
    with pytest.warns(PredictedWeightsEditedWarning) as records:
        trainer(callbacks=[XGradCallback()], max_epochs=2).fit(module, loader(X, Y))
    edits = [r for r in records if issubclass(r.category, PredictedWeightsEditedWarning)]
    assert len(edits) == 1
    message = str(edits[0].message)
    assert message.startswith("`net.0.weight`, `net.0.bias`, `net.2.weight` and 1 more changed in place")
    assert "inside `with XGradCallback.real_weights(self): ...` in training_step" in message
    assert flat(module).abs().max() > 2 * CLIP  # the clamp was discarded: the warning is about a real loss


def test_the_same_clamp_inside_real_weights_is_kept_and_not_warned_about() -> None:
    module = ClampingModule(inside=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PredictedWeightsEditedWarning)
        trainer(callbacks=[XGradCallback()], max_epochs=2).fit(module, loader(X, Y))
    # the last update follows the last clamp: within one AdamW step of the clip range
    assert flat(module).abs().max() <= CLIP + 0.011


def test_edits_are_checked_on_the_first_predictions_and_then_periodically() -> None:
    """Every prediction of the first ``EDIT_CHECKS_FIRST`` is checked, then every ``EDIT_CHECK_PERIOD``-th: an edit
    made at an unchecked prediction passes unseen (the price of a check that costs nothing on most steps), one made
    at a checked prediction is caught."""

    def edits_warned(edit_at: set[int]) -> bool:
        net = make_net()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        predictor = OptimizerPredictor(optimizer)
        predictions = 0
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always", PredictedWeightsEditedWarning)
            for _ in range(8):
                for batch in DATA:
                    if predictor.predict():
                        if predictions in edit_at:
                            with torch.no_grad():
                                net[0].bias.add_(1.0)
                        predictions += 1
                    mse(net, batch).backward()
                    predictor.restore()
                    optimizer.step()
                    optimizer.zero_grad()
        assert predictions > 3 * EDIT_CHECK_PERIOD
        return any(issubclass(r.category, PredictedWeightsEditedWarning) for r in records)

    assert edits_warned({EDIT_CHECKS_FIRST - 1})
    assert edits_warned({2 * EDIT_CHECK_PERIOD})
    unchecked = {EDIT_CHECKS_FIRST + 2, 2 * EDIT_CHECK_PERIOD + 1}
    assert all(n >= EDIT_CHECKS_FIRST and n % EDIT_CHECK_PERIOD for n in unchecked)
    assert not edits_warned(unchecked)


class ManualSteps(TinyModule):
    """Manual optimization through the raw optimizer and the LightningOptimizer, with the clamp done right."""

    def __init__(self) -> None:
        super().__init__(OPTIMIZERS["sgd_momentum"])
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers(use_pl_optimizer=batch_idx % 2 == 0)
        with XGradCallback.real_weights(self), torch.no_grad():
            self.net[0].weight.clamp_(-1.0, 1.0)
        optimizer.zero_grad()
        self.manual_backward(mse(self.net, batch))
        optimizer.step()


def test_the_users_steps_and_the_packages_own_writes_are_not_edits() -> None:
    """Manual steps (raw and through Lightning), validation and a checkpoint mid-window, real_weights(), metrics and
    accumulation: none of them is an edit of W_hat."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PredictedWeightsEditedWarning)
        trainer(callbacks=[XGradCallback(log_every_n_steps=1)], max_epochs=2, logger=False).fit(
            ManualSteps(), loader(X, Y)
        )
        trainer(
            callbacks=[XGradCallback(steps=2, log_every_n_steps=1)],
            max_epochs=2,
            accumulate_grad_batches=3,
            val_check_interval=4,
            limit_val_batches=1,
        ).fit(TinyModule(), loader(X, Y), loader(*make_data(16, seed=1)))


class ClampsSecondMicroBatch(TinyModule):
    """Clamps W_hat (the wrong way) only in the second micro-batch of each window, after a validation that ran
    between the two."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if batch_idx % 2 == 1:
            with torch.no_grad():
                self.net[2].weight.clamp_(-CLIP, CLIP)
        return super().training_step(batch, batch_idx)


def test_an_edit_after_a_validation_mid_window_is_still_seen() -> None:
    """Validation swaps the real weights in and W_hat back: those writes are the package's, the edit after is not."""
    with pytest.warns(PredictedWeightsEditedWarning, match=r"^`net.2.weight` changed in place"):
        trainer(
            callbacks=[XGradCallback()],
            max_epochs=1,
            accumulate_grad_batches=2,
            val_check_interval=1,
            limit_val_batches=1,
        ).fit(ClampsSecondMicroBatch(), loader(X, Y), loader(*make_data(16, seed=1)))


def test_the_edited_parameter_is_named_when_a_param_group_spans_dtypes() -> None:
    """A param group with float32 and float64 parameters is planned as two buckets of one group."""
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    predictor = OptimizerPredictor(optimizer)
    for _ in range(2):
        predictor.predict()
        (a.sum() + b.sum()).backward()
        predictor.restore()
        optimizer.step()
        optimizer.zero_grad()
    predictor.predict()
    with torch.no_grad():
        a.mul_(2)
    with pytest.warns(PredictedWeightsEditedWarning, match=r"^`parameter 0 of param group 0 \(shape \(3,\)\)` changed"):
        predictor.restore()
