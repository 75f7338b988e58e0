"""A small CNN on scikit-learn's handwritten digits, as a LightningCLI program that trains with or without XGrad.

``load_digits()`` holds 1797 real 8x8 scans that ship with scikit-learn, so the example needs no download
and runs anywhere on CPU. The model has no BatchNorm and no dropout, so with the same seed the only difference
between a run with ``XGradCallback`` and one without is the weights at which the gradients are taken. The configs
in ``examples/configs`` train what :func:`train` trains (same seed, data order, hyper-parameters and epochs), and
the Trainer logs ``val_loss`` and ``val_acc`` every epoch (to ``lightning_logs/<config>/version_N/metrics.csv``).

Run it from the repository root (with the package installed, e.g. ``pip install -e ".[examples]"``)::

    python examples/digits.py fit --config examples/configs/digits_sgd.yaml
    python examples/digits.py fit --config examples/configs/digits_sgd.yaml \
        --trainer.callbacks+=lightning_xgrad.XGradCallback
    python examples/digits.py fit --config examples/configs/digits_adamw.yaml \
        --trainer.callbacks+=lightning_xgrad.XGradCallback --trainer.callbacks.steps=2

``examples/demo.py`` (``make demo``) trains baseline and XGrad side by side and prints the comparison table.
"""

from __future__ import annotations

from typing import Literal, cast, get_args

import lightning as L
import torch
from _quiet import quiet  # beside this file
from lightning.pytorch.cli import ArgsType, LightningCLI
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_xgrad import XGradCallback

OptimizerName = Literal["sgd", "adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
#: learning rate used by :func:`train` when none is given
DEFAULT_LR: dict[str, float] = {"sgd": 0.05, "adamw": 1e-3}
NUM_CLASSES = 10


class DigitsDataModule(L.LightningDataModule):
    """The 8x8 digits as (N, 1, 8, 8) float32 images in [0, 1] and int64 labels, split stratified by class."""

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # pixels are 0..16
        labels = torch.tensor(digits.target, dtype=torch.int64)
        train_idx, val_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.val_fraction,
            random_state=self.seed,
            stratify=labels.numpy(),
        )
        train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed)  # same batch order for every run with this seed
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class DigitsClassifier(L.LightningModule):
    """A small CNN for 8x8 digits; ``momentum`` is used by SGD only."""

    def __init__(
        self,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, on_epoch=True)
        self.log("val_acc", self.val_acc, prog_bar=True, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                weight_decay=hp.weight_decay,
            )
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


def train(
    xgrad_steps: int | None,
    optimizer: str = "sgd",
    lr: float | None = None,
    epochs: int = 15,
    seed: int = 0,
    progress_bar: bool = True,
) -> dict[str, float]:
    """Train once, with XGrad unless ``xgrad_steps`` is None; return the final val_loss and val_acc."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    L.seed_everything(seed, workers=True, verbose=False)
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    model = DigitsClassifier(optimizer=cast(OptimizerName, optimizer), lr=lr)
    data = DigitsDataModule(seed=seed)
    callbacks = [] if xgrad_steps is None else [XGradCallback(steps=xgrad_steps)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        deterministic=True,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    return {name: float(trainer.callback_metrics[name]) for name in ("val_loss", "val_acc")}


def cli_main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """The program ``python examples/digits.py`` runs: a LightningCLI over :class:`DigitsClassifier` and
    :class:`DigitsDataModule`; ``args`` and ``run`` as LightningCLI takes them (``None``: the command line)."""
    quiet()
    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},  # a rerun into the same log folder replaces its config.yaml
    )


if __name__ == "__main__":
    cli_main()
