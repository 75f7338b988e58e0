"""Checks that need CUDA: they skip without it (CI has no GPU) and run wherever one is present.

- 16-mixed with Lightning's own CUDA GradScaler, and fused Adam (its ``step`` lives on the GPU, so the Adam rule
  takes its no-sync tensor path): the Trainer with the callback ends where the plain-PyTorch reference does.
- FSDPStrategy (FSDP1) is refused in a real Trainer with the message that points to ModelParallelStrategy.
"""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

from lightning_xgrad import XGradCallback

from .agreement import mse
from .reference import xgrad_reference
from .toolkit import TinyModule, batches, flat, loader, make_data, make_net, trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _fused_adam(params):
    return torch.optim.Adam(params, lr=0.01, fused=True)


def test_fused_adam_on_cuda_matches_the_reference() -> None:
    x, y = make_data(96)
    module = TinyModule(_fused_adam)
    trainer(accelerator="cuda", callbacks=[XGradCallback()], max_epochs=2).fit(module, loader(x, y))
    net = make_net().cuda()
    data = [(bx.cuda(), by.cuda()) for bx, by in batches(x, y, 8)]
    optimizer = _fused_adam(net.parameters())
    xgrad_reference(net, optimizer, data, mse, 1, epochs=2)
    torch.testing.assert_close(flat(module).cpu(), flat(net).cpu(), rtol=1e-4, atol=1e-5)


def test_16_mixed_with_the_cuda_grad_scaler_restores_exactly() -> None:
    real_at_start: list[torch.Tensor] = []
    restored: list[torch.Tensor] = []

    class Before(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            real_at_start.append(flat(pl_module))

    class After(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            restored.append(flat(pl_module))

    module = TinyModule()
    trainer(accelerator="cuda", precision="16-mixed", callbacks=[Before(), XGradCallback(), After()], max_epochs=2).fit(
        module, loader(*make_data(96))
    )
    assert len(restored) == len(real_at_start) == 24
    assert all(torch.equal(a, b) for a, b in zip(real_at_start, restored, strict=True))
    assert torch.isfinite(flat(module)).all()


def test_fsdp1_is_refused_in_a_real_trainer() -> None:
    with pytest.raises(MisconfigurationException, match=r"does not support FSDPStrategy.*ModelParallelStrategy"):
        trainer(accelerator="cuda", devices=1, strategy=FSDPStrategy(), callbacks=[XGradCallback()]).fit(
            TinyModule(), loader(*make_data(16))
        )
