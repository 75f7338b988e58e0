"""The models of the step timing, their synthetic data, the LightningModule that trains them, and the naive XGrad
the callback is compared with."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_xgrad.rules import rule_for

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("adamw", "sgd")
#: what ``--cases`` also accepts: AdamW with ``fused=True`` (for the GPU check)
OPTIMIZER_CHOICES = (*OPTIMIZERS, "adamw_fused")


def mlp(width: int = 256, blocks: int = 50) -> nn.Module:
    """Optimizer-bound: many small tensors, little compute per parameter at batch 4."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*layers)


def cnn(classes: int = 10) -> nn.Module:
    """Compute-bound: convolutions over 32x32 images at batch 64, few parameters."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * 16, classes))


def param_stats(model: str) -> tuple[int, int, int]:
    """Number of tensors, parameter bytes, bytes of the largest tensor."""
    params = list((mlp() if model == "mlp" else cnn()).parameters())
    sizes = [p.numel() * p.element_size() for p in params]
    return len(params), sum(sizes), max(sizes)


class Synthetic(Dataset):
    """Fixed random batches, generated once (no data loading in the measured step)."""

    def __init__(self, model: str, batches: int, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        shape = (batches, batch_size, 256) if model == "mlp" else (batches, batch_size, 3, 32, 32)
        self.inputs = torch.randn(shape, generator=generator)
        classes = 256 if model == "mlp" else 10
        self.targets = torch.randint(0, classes, shape[:2], generator=generator)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


class Classifier(pl.LightningModule):
    """``model`` ("mlp" or "cnn") trained with cross-entropy by ``optimizer`` (one of :data:`OPTIMIZER_CHOICES`)."""

    def __init__(self, model: str, optimizer: str) -> None:
        super().__init__()
        self.net = mlp() if model == "mlp" else cnn()
        self.optimizer_name = optimizer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.parameters())


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZER_CHOICES`) as the benchmark configures it."""
    if name in ("adamw", "adamw_fused"):
        fused = {"fused": True} if name == "adamw_fused" else {"foreach": True}
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **fused)
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9, foreach=True)


def has_compiled_kernel(name: str) -> bool:
    """Whether ``compile=True`` compiles the prediction of the optimizer ``name`` (else its rule runs eager)."""
    return rule_for(make_optimizer(name, [nn.Parameter(torch.zeros(1))])).compiled_prediction() is not None


class NaiveXGrad(Callback):
    """XGrad as the official code writes it: a Python loop over parameters, a fresh clone of each every step, one
    in-place update per tensor, and a per-parameter copy back. Same hooks as XGradCallback, for a fair timing."""

    def __init__(self, steps: int = 1) -> None:
        self.steps = steps
        self.saved: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        optimizer = trainer.optimizers[0]
        for group in optimizer.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                self.saved.append((p, p.detach().clone()))
                if "exp_avg" in state:
                    beta1, beta2 = group["betas"]
                    step = float(state["step"])
                    bias_correction1 = 1 - beta1**step
                    bias_correction2 = 1 - beta2**step
                    denom = (state["exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-self.steps * lr / bias_correction1)
                else:
                    p.add_(state["momentum_buffer"], alpha=-self.steps * lr)

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for p, value in self.saved:
            p.copy_(value)
        self.saved = []
