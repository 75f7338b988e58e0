"""Checks that need CUDA: they skip without it (CI has no GPU) and run wherever one is present.

- 16-mixed with Lightning's own CUDA GradScaler, and fused Adam (its ``step`` lives on the GPU, so the Adam rule
  takes its no-sync tensor path): the Trainer with the callback ends where the plain-PyTorch reference does.
- FSDPStrategy (FSDP1) is refused in a real Trainer with the message that points to ModelParallelStrategy.
- No host-device sync in a training step: steps under ``torch.cuda.set_sync_debug_mode("error")``
  with the callback and AdamW (foreach, fused), SGD momentum, capturable Adam, the optimizers of
  ``lightning_xgrad.optim``, CPropCallback, bf16-mixed and ``compile=True``; each step is also checked to predict and
  restore (a test that predicts nothing would pass trivially).

``benchmarks/gpu_check.sh`` runs this file with the rest of the GPU check.
"""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy

from lightning_xgrad import CPropCallback, XGradCallback
from lightning_xgrad.cprop import CPropAdam, CPropSGD
from lightning_xgrad.heavy_ball import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD
from lightning_xgrad.optim import AdaM3

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


SYNC_FREE_OPTIMIZERS = {
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, fused=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "adam_capturable": lambda p: torch.optim.Adam(p, lr=0.01, capturable=True, foreach=True),
    "adam3": lambda p: AdaM3(p, lr=0.01),
    "cprop_adam": lambda p: CPropAdam(p, lr=0.01),
    "cprop_sgd": lambda p: CPropSGD(p, lr=0.05, momentum=0.9),
    "heavy_ball_sgd": lambda p: AdaptiveHeavyBallSGD(p, lr=0.05),
    "heavy_ball_adam": lambda p: AdaptiveHeavyBallAdam(p, lr=0.01),
}
#: the guarded steps start here: step 0 has no optimizer state, step 1 predicts (and compiles) for the first time
FIRST_GUARDED_STEP = 2
STEPS = 8


def _device_flat(module: torch.nn.Module) -> torch.Tensor:
    """All parameters as one vector, copied on the device: no host-device sync."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


@pytest.mark.parametrize(
    ("optimizer", "precision", "compile", "cprop"),
    [
        *[(name, "32-true", False, False) for name in SYNC_FREE_OPTIMIZERS],
        ("adamw_foreach", "bf16-mixed", False, False),
        ("adamw_fused", "bf16-mixed", False, False),
        ("adamw_foreach", "32-true", True, False),
        ("sgd_momentum", "32-true", True, False),
        ("adamw_foreach", "32-true", False, True),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_predicted_step_makes_no_host_device_sync(optimizer: str, precision: str, compile: bool, cprop: bool) -> None:
    """From batch start to batch end (the callback's hooks, forward, backward, the optimizer's update) of every step
    after the first prediction, CUDA's sync debug mode raises on any synchronizing call."""
    real_at_start: list[torch.Tensor] = []
    predicted: list[torch.Tensor] = []
    restored: list[torch.Tensor] = []

    class SyncErrorsOn(Callback):  # first in the list: before every other callback's batch start
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= FIRST_GUARDED_STEP:
                torch.cuda.set_sync_debug_mode("error")
            real_at_start.append(_device_flat(pl_module))

    class AfterPrediction(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            predicted.append(_device_flat(pl_module))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            restored.append(_device_flat(pl_module))

    class SyncErrorsOff(Callback):  # last in the list: after every other callback's batch end
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.cuda.set_sync_debug_mode("default")

    x, y = make_data(96)
    data = loader(x.cuda(), y.cuda())  # batches already on the GPU: no host-to-device copy in the step
    callbacks = [
        SyncErrorsOn(),
        *([CPropCallback()] if cprop else []),
        XGradCallback(compile=compile, compile_min_bytes=0),
    ]
    callbacks += [AfterPrediction(), SyncErrorsOff()]
    module = TinyModule(SYNC_FREE_OPTIMIZERS[optimizer])
    try:
        trainer(accelerator="cuda", precision=precision, callbacks=callbacks, max_steps=STEPS).fit(module, data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(real_at_start) == len(predicted) == len(restored) == STEPS
    for step in range(1, STEPS):  # every step with optimizer state predicted, and got its real weights back
        assert not torch.equal(predicted[step], real_at_start[step]), f"step {step} was not predicted"
        assert torch.equal(restored[step], real_at_start[step]), f"step {step} was not restored"
    assert torch.isfinite(flat(module)).all()
