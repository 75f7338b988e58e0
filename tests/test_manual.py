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


def _reference(steps: int | None, epochs: int) -> nn.Module:
    net = make_net()
    opt_a, opt_b = _optimizers(net)
    data = batches(*make_data(64), batch_size=8)
    for _ in range(epochs):
        for i, (x, y) in enumerate(data):
            real: dict[nn.Parameter, torch.Tensor] = {}
            if steps is not None:
                with torch.no_grad():
                    for optimizer in (opt_a, opt_b):
                        for group in optimizer.param_groups:
                            for p in group["params"]:
                                if optimizer.state[p]:
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
                optimizer.step()
    return net


@pytest.mark.parametrize("steps", [1, 2])
def test_two_optimizers_match_the_reference(steps: int) -> None:
    module = TwoOptimizers()
    trainer(callbacks=[XGradCallback(steps=steps)], max_epochs=3).fit(module, loader(*make_data(64), batch_size=8))
    expected = flat(_reference(steps, epochs=3))
    torch.testing.assert_close(flat(module), expected, rtol=1e-5, atol=1e-6)
    baseline = flat(_reference(None, epochs=3))
    assert (baseline - expected).abs().max() > 1e-3  # the prediction really changed the run
