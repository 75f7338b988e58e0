"""LightningCLI sets every XGradCallback argument from YAML or flags, and rejects values outside the types."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_xgrad import XGradCallback

from .toolkit import make_data, make_net


class CLIModule(pl.LightningModule):
    """A CLI-friendly module: typed init arguments only."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.net = make_net()
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*make_data(32)), batch_size=8)


def _cli(args: list[str]) -> LightningCLI:
    base = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]
    return LightningCLI(CLIModule, run=False, args=base + args, save_config_callback=None)


def test_yaml_entry_sets_every_argument(tmp_path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 1\n"
        "  callbacks:\n"
        "    - class_path: lightning_xgrad.XGradCallback\n"
        "      init_args: {steps: 3, rule: trajectory, start_step: 2, log_every_n_steps: 5}\n"
    )
    cli = _cli(["--config", str(config)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, XGradCallback)]
    assert (callback.steps, callback.rule, callback.start_step, callback.log_every_n_steps) == (3, "trajectory", 2, 5)
    cli.trainer.fit(cli.model)
    assert cli.trainer.global_step == 4


def test_flags_append_the_callback() -> None:
    cli = _cli(["--trainer.callbacks+=lightning_xgrad.XGradCallback", "--trainer.callbacks.steps=2"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, XGradCallback)]
    assert callback.steps == 2 and callback.rule == "auto"


def test_metrics_max_bytes_is_set_from_the_command_line() -> None:
    """The metrics' byte budget: an integer, or null for always exact; 32 MiB when not given."""
    flags = ["--trainer.callbacks+=lightning_xgrad.XGradCallback"]
    budgets = []
    for extra in ([], ["1048576"], ["null"]):
        given = [f"--trainer.callbacks.metrics_max_bytes={value}" for value in extra]
        (callback,) = [c for c in _cli(flags + given).trainer.callbacks if isinstance(c, XGradCallback)]
        budgets.append(callback.metrics_max_bytes)
    assert budgets == [32 * 2**20, 1048576, None]


def test_unknown_rule_is_rejected_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        _cli(["--trainer.callbacks+=lightning_xgrad.XGradCallback", "--trainer.callbacks.rule=adam"])


def test_yaml_sets_the_chunk_budget_of_both_callbacks(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``chunk_bytes`` reaches the predictors (and CProp's statistics) from a LightningCLI config."""
    from lightning_xgrad import CPropCallback

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_steps: 2\n"
        "  callbacks:\n"
        "    - class_path: lightning_xgrad.CPropCallback\n"
        "      init_args: {chunk_bytes: 0}\n"
        "    - class_path: lightning_xgrad.XGradCallback\n"
        "      init_args: {chunk_bytes: 1048576}\n"
    )
    cli = _cli(["--config", str(config)])
    (xgrad,) = [c for c in cli.trainer.callbacks if isinstance(c, XGradCallback)]
    (cprop,) = [c for c in cli.trainer.callbacks if isinstance(c, CPropCallback)]
    assert (xgrad.chunk_bytes, cprop.chunk_bytes) == (1048576, 0)
    seen = []
    original = XGradCallback.on_train_batch_start

    def spy(self, trainer, *args):
        original(self, trainer, *args)
        seen.extend(p.chunk_bytes for p in self._predictors)

    monkeypatch.setattr(XGradCallback, "on_train_batch_start", spy)
    cli.trainer.fit(cli.model)
    assert seen == [1048576, 1048576]
    assert [t.chunk_bytes for t in cprop._trackers.values()] == [0]
