"""A tiny LightningCLI program for tests/test_sweep.py: the user's program a sweep runs, a few seconds per run.

A linear model fits a fixed noisy linear target with SGD momentum for ``--trainer.max_epochs`` epochs of 4 batches
and logs ``train_loss`` every step and ``val_loss`` every epoch. Each fit appends one JSON line to
``--model.record``: what the run really was (its seed, ``data_seed``, the steps and ``log_every_n_steps`` of every
XGradCallback in the Trainer, its loggers) and the final ``val_loss`` as the Trainer saw it, so the tests check the
sweep against the runs themselves rather than against the sweep's own reading of the logs.
``--model.fail_flag=PATH`` makes a run with XGradCallback fail at the start of fit while PATH exists (a run that
crashes).

    python tests/sweep_program.py fit --model.record=runs.jsonl --trainer.max_epochs=3
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset


class SweepModule(pl.LightningModule):
    def __init__(self, record: str, data_seed: int = 0, lr: float = 0.05, fail_flag: str = "") -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.record, self.data_seed, self.lr, self.fail_flag = record, data_seed, lr, fail_flag
        generator = torch.Generator().manual_seed(data_seed)
        x = torch.randn(96, 4, generator=generator)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3 * torch.randn(96, 1, generator=generator)
        self.train_set, self.val_set = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=32)

    def _xgrad_steps(self) -> list[int]:
        return [c.steps for c in self.trainer.callbacks if type(c).__name__ == "XGradCallback"]

    def _xgrad_log_every(self) -> list[int | None]:
        return [c.log_every_n_steps for c in self.trainer.callbacks if type(c).__name__ == "XGradCallback"]

    def on_fit_start(self) -> None:
        if self.fail_flag and Path(self.fail_flag).exists() and self._xgrad_steps():
            raise RuntimeError(f"failing on purpose: {self.fail_flag} exists")

    def on_fit_end(self) -> None:
        run = {
            "seed": int(os.environ["PL_GLOBAL_SEED"]),
            "data_seed": self.data_seed,
            "xgrad_steps": self._xgrad_steps(),
            "xgrad_log_every": self._xgrad_log_every(),
            "loggers": [[type(lg).__name__, str(lg.save_dir)] for lg in self.trainer.loggers],
            "epochs": self.trainer.current_epoch,
            "val_loss": float(self.trainer.callback_metrics["val_loss"]),
        }
        with open(self.record, "a") as file:
            file.write(json.dumps(run) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    LightningCLI(SweepModule, save_config_kwargs={"overwrite": True})
