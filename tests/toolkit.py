"""Shared pieces for the tests: a tiny model, fixed data, an optimizer factory and a quiet Trainer.

The model is small enough that a fit of tens of steps takes about a second on two CPU cores, and its data are fixed
tensors so a plain-PyTorch reference loop can replay exactly the batches the Trainer sees (no shuffling).
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from examples._loader import EXAMPLES, load_example  # noqa: F401  (re-exported for the tests)
from lightning_xgrad import PredictedWeightsEditedWarning
from lightning_xgrad._internal.chunks import Chunks
from lightning_xgrad._internal.scalars import StepCounts

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*litlogger.*")
# Nothing the tests do edits W_hat unless a test says so: the multi-process scripts, which import this module, fail on
# the warning as pytest does (pyproject.toml)
warnings.filterwarnings("error", category=PredictedWeightsEditedWarning)

OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=0.005, momentum=0.9),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=0.005, momentum=0.5, centered=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.005),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
}


def make_data(n: int = 96, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed regression problem: 6 inputs, 2 outputs, a nonlinear target with noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.stack([torch.sin(x[:, 0] * 2) + x[:, 1] * x[:, 2], x[:, 3] - x[:, 4] ** 2], dim=1)
    return x, y + 0.05 * torch.randn(n, 2, generator=g)


def make_net(seed: int = 0) -> nn.Module:
    """A two-layer MLP with fixed initial weights."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """The batches a non-shuffling DataLoader yields, in order."""
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


class TinyModule(pl.LightningModule):
    """``make_net`` trained with MSE by the optimizer ``optimizer`` builds; an optional per-step LR schedule."""

    def __init__(
        self,
        optimizer: OptimizerFactory = OPTIMIZERS["adam"],
        schedule: Callable[[int], float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.net = make_net(seed)
        self.optimizer_factory = optimizer
        self.schedule = schedule

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y.float())  # float32 loss: half-precision CPU kernels vary

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader(x: Tensor, y: Tensor, batch_size: int = 8) -> DataLoader:
    """A non-shuffling loader over fixed tensors."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with everything that prints or writes turned off unless asked for."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def flat(module: nn.Module) -> Tensor:
    """All parameters as one detached vector."""
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


#: the metrics XGradCallback logs (with one optimizer)
XGRAD_METRICS = ("xgrad/relative_shift", "xgrad/prediction_cosine", "xgrad/prediction_error")


class _XGradMetricsLogger(Logger):
    """A logger that keeps every ``xgrad/...`` metric it receives, by name and step, on every rank (Lightning's own
    loggers write from rank 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: dict[str, dict[int, float]] = {}

    @property
    def name(self) -> str:
        return "xgrad-metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is None:
            return
        for key, value in metrics.items():
            if key.startswith("xgrad/"):
                self.by_name.setdefault(key, {})[step] = float(value)


class XGradMetricsRecorder(Callback):
    """The ``XGRAD_METRICS`` as the Trainer's loggers received them, one value per batch (NaN where a metric was not
    logged for that batch's step), on every rank; it adds its own logger to the Trainer at the start of fit."""

    def __init__(self) -> None:
        self.logged: dict[str, list[float]] = {name: [] for name in XGRAD_METRICS}
        self._logger = _XGradMetricsLogger()

    @property
    def values(self) -> list[float]:
        """``xgrad/relative_shift`` per batch."""
        return self.logged["xgrad/relative_shift"]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.loggers = [*trainer.loggers, self._logger]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step this batch's metrics are logged at
        for name, values in self.logged.items():
            values.append(self._logger.by_name.get(name, {}).get(step, float("nan")))

    def tensors(self) -> dict[str, Tensor]:
        """Each metric per batch, as float64 tensors keyed ``logged_shift``, ``logged_cosine``, ``logged_error``."""
        keys = ("logged_shift", "logged_cosine", "logged_error")
        return {
            key: torch.tensor(self.logged[name], dtype=torch.float64)
            for key, name in zip(keys, XGRAD_METRICS, strict=True)
        }


def make_dry_run(*arguments: str, cwd: Any) -> str:
    """What ``make -n`` would run, as a top-level make prints it.

    The suite itself runs under ``make test``; without this, the child make inherits MAKELEVEL and MAKEFLAGS and
    adds "Entering directory" lines (and the parent's flags) to its plan.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    command = ["make", "-n", "--no-print-directory", *arguments]
    return subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


class AcceleratorStepCounts(StepCounts):
    """Step counts taken for an accelerator's (capturable or fused optimizers keep them there): the rules then compute
    their bias corrections with tensor ops instead of reading the counts, the path a machine without a GPU only
    takes this way."""

    @property
    def host_readable(self) -> bool:
        return False


def simulate_accelerator_step_counts(monkeypatch: Any) -> None:
    """Every plan built from now on (in this test) treats its step counts as kept on an accelerator."""
    monkeypatch.setattr(StepCounts, "host_readable", AcceleratorStepCounts.host_readable)


def rule_columns(rule: Any, states: list[Any], step_counts: type[StepCounts] = StepCounts) -> tuple[Any, ...]:
    """The columns ``rule.add_direction_`` takes for parameters with these optimizer states, built as the predictor's
    plan builds them (the rule's step column as ``step_counts``)."""
    rows = [rule.state_tensors(state) for state in states]
    assert all(row is not None for row in rows)
    columns: list[Any] = [list(column) for column in zip(*rows, strict=True)]
    if rule.step_column is not None:
        columns[rule.step_column] = step_counts(columns[rule.step_column])
    return tuple(columns)


def add_rule_direction_(
    rule: Any, out: list[Tensor], columns: tuple[Any, ...], group: dict[str, Any], alpha: float, chunk_bytes: int = 0
) -> None:
    """``out += alpha * dW`` as ``rule`` computes it (chunks of at most the largest tensor unless told otherwise)."""
    rule.add_direction_(out, columns, group, alpha, Chunks(out, chunk_bytes))
