"""A torch.compile'd LightningModule trains with XGradCallback: the compiled graph sees the predicted weights
(all writes are in place, parameters are graph inputs), nothing recompiles, and the result equals eager XGrad."""

from __future__ import annotations

import torch
import torch._dynamo

from lightning_xgrad import XGradCallback

from .toolkit import OPTIMIZERS, TinyModule, flat, loader, make_data, trainer


def test_compiled_module_trains_like_eager_with_xgrad() -> None:
    data = make_data(64)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_module = TinyModule(OPTIMIZERS["adam"])
    trainer(callbacks=[XGradCallback()], max_epochs=2).fit(torch.compile(compiled_module), loader(*data))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    recompiles = sum(torch._dynamo.utils.counters["recompiles"].values())
    torch._dynamo.reset()

    eager = TinyModule(OPTIMIZERS["adam"])
    trainer(callbacks=[XGradCallback()], max_epochs=2).fit(eager, loader(*data))
    baseline = TinyModule(OPTIMIZERS["adam"])
    trainer(max_epochs=2).fit(baseline, loader(*data))

    assert graphs >= 1 and recompiles == 0  # it really compiled, once, across 16 predicted and restored steps
    torch.testing.assert_close(flat(compiled_module), flat(eager), rtol=1e-5, atol=1e-6)
    assert (flat(eager) - flat(baseline)).abs().max() > 1e-3  # so matching eager XGrad means seeing W_hat
