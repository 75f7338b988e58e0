"""Manual optimization with two optimizers: the Trainer with XGradCallback against a plain-PyTorch reference.

Every optimizer's parameters are predicted at batch start; each ``opt.step()`` restores that optimizer's
parameters only; an optimizer that does not step in a batch gets its real weights back at batch end.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_xgrad import XGradCallback

from .reference import direction, state_rule
from .toolkit import TinyModule, batches, flat, loader, make_data, make_net, trainer

B_EVERY = 2  # the second optimizer steps on every second batch only


def _optimizers(net: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    return (
        torch.optim.Adam(net[0].parameters(), lr=0.02),
        torch.optim.SGD(net[2].parameters(), lr=0.05, momentum=0.9),
    )


class TwoOptimizers(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return _optimizers(self.net)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        opt_b.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        opt_a.step()
        if batch_idx % B_EVERY == 0:
            opt_b.step()


def _reference(steps: int | None, epochs: int, rule: str = "auto") -> nn.Module:
    net = make_net()
    opt_a, opt_b = _optimizers(net)
    data = batches(*make_data(64), batch_size=8)
    previous: dict[nn.Parameter, torch.Tensor] = {}  # trajectory: weights before the optimizer's last real step
    lr_then: dict[nn.Parameter, float] = {}
    for _ in range(epochs):
        for i, (x, y) in enumerate(data):
            real: dict[nn.Parameter, torch.Tensor] = {}
            if steps is not None:
                with torch.no_grad():
                    for optimizer in (opt_a, opt_b):
                        for group in optimizer.param_groups:
                            for p in group["params"]:
                                if rule == "trajectory" and p in previous:
                                    real[p] = p.detach().clone()
                                    p += steps * (group["lr"] / lr_then[p]) * (p - previous[p])
                                elif rule == "auto" and optimizer.state[p]:
                                    real[p] = p.detach().clone()
                                    p -= (
                                        steps
                                        * group["lr"]
                                        * direction(state_rule(optimizer, group), group, optimizer.state[p])
                                    )
            opt_a.zero_grad()
            opt_b.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            stepping = [opt_a] + ([opt_b] if i % B_EVERY == 0 else [])
            with torch.no_grad():
                for optimizer in (
                    opt_a,
                    opt_b,
                ):  # restore all: the stepping ones before their step, the rest at batch end
                    for p in optimizer.param_groups[0]["params"]:
                        if p in real:
                            p.copy_(real[p])
            for optimizer in stepping:
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        previous[p], lr_then[p] = p.detach().clone(), group["lr"]
                optimizer.step()
    return net


@pytest.mark.parametrize(("steps", "rule"), [(1, "auto"), (2, "auto"), (1, "trajectory"), (2, "trajectory")])
def test_two_optimizers_match_the_reference(steps: int, rule: str) -> None:
    """The second optimizer skips every other batch; under the trajectory rule it must still be predicted from its
    last real update, also on the batches where it steps."""
    module = TwoOptimizers()
    callback = XGradCallback(steps=steps, rule=rule)
    trainer(callbacks=[callback], max_epochs=3).fit(module, loader(*make_data(64), batch_size=8))
    expected = flat(_reference(steps, epochs=3, rule=rule))
    torch.testing.assert_close(flat(module), expected, rtol=1e-5, atol=1e-6)
    baseline = flat(_reference(None, epochs=3))
    assert (baseline - expected).abs().max() > 1e-3  # the prediction really changed the run


class RawOptimizers(TwoOptimizers):
    """The same training with the raw torch optimizers (``use_pl_optimizer=False``): no on_before_optimizer_step."""

    def __init__(self, with_closure: bool = False) -> None:
        super().__init__()
        self.with_closure = with_closure

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers(use_pl_optimizer=False)
        opt_a.zero_grad()
        opt_b.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        if self.with_closure:
            opt_a.step(lambda: None)
        else:
            opt_a.step()
        if batch_idx % B_EVERY == 0:
            opt_b.step()


@pytest.mark.parametrize("with_closure", [False, True], ids=["no_closure", "closure"])
def test_raw_optimizer_steps_restore_first_and_train_like_lightning_optimizers(with_closure: bool) -> None:
    """A raw step restores the real weights first; one with a closure does so once the closure has run."""
    lightning_steps, raw_steps = TwoOptimizers(), RawOptimizers(with_closure)
    for module in (lightning_steps, raw_steps):
        trainer(callbacks=[XGradCallback()], max_epochs=3).fit(module, loader(*make_data(64), batch_size=8))
    assert torch.equal(flat(raw_steps), flat(lightning_steps))


class IgnoresItsClosure(torch.optim.Optimizer):
    """Plain SGD whose step never calls the closure it is given (so nothing runs between the closure and the
    update). It does not call ``super().step()``: once torch has wrapped ``SGD.step``, that would run the step hooks
    a second time, without a closure."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.05})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


class RawStepIgnoringClosure(TinyModule):
    def __init__(self) -> None:
        super().__init__(IgnoresItsClosure)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self(batch[0]), batch[1]))
        optimizer.step(lambda: None)


def test_an_update_applied_to_predicted_weights_is_an_error() -> None:
    """The step's update lands on W_hat when the optimizer never runs the closure after which the real weights go
    back: the restore would throw it away, so the step raises instead."""
    with pytest.raises(RuntimeError, match=r"IgnoresItsClosure stepped while its parameters held predicted weights"):
        trainer(callbacks=[XGradCallback()], max_epochs=2).fit(
            RawStepIgnoringClosure(), loader(*make_data(64), batch_size=8)
        )
