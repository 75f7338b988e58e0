"""Baseline vs. XGrad on scikit-learn's handwritten digits, with a small CNN, on CPU in under a minute.

``load_digits()`` holds 1797 real 8x8 scans that ship with scikit-learn, so the example needs no download
and runs anywhere. For each optimizer and seed it trains the same model once plainly and once per requested
``XGradCallback(steps=s)``, with identical data order and initial weights, and prints a side-by-side table of
the final validation loss and accuracy. The model has no BatchNorm and no dropout, so the only difference
between the runs is the weights at which the gradients are taken.

Run it from the repository root (with the package installed, e.g. ``pip install -e ".[examples]"``)::

    python examples/digits.py                                   # SGD and AdamW, one seed, XGrad s=1
    python examples/digits.py --seeds 3 --steps 1 2 --no-progress-bar
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from typing import Literal, cast, get_args

import lightning as L
import torch
from _report import method_name, print_table, summary  # beside this file
from lightning.pytorch.utilities.warnings import PossibleUserWarning
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


def main(argv: list[str] | None = None) -> None:
    """Run baseline and XGrad for every optimizer and seed, then print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds, 0..N-1 (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[1], help="XGrad prediction steps to compare (default: 1)"
    )
    parser.add_argument(
        "--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS), help="(default: sgd adamw)"
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be at least 1")

    # num_workers=0 is deliberate: the whole data set is a few hundred KiB of tensors in memory.
    warnings.filterwarnings("ignore", ".*does not have many workers.*", category=PossibleUserWarning)
    start = time.perf_counter()
    methods: list[int | None] = [None, *args.steps]
    # results[(optimizer, method)] = list over seeds of {"val_loss": ..., "val_acc": ...}
    results: dict[tuple[str, int | None], list[dict[str, float]]] = {}
    for optimizer in args.optimizers:
        for seed in range(args.seeds):
            for steps in methods:
                t0 = time.perf_counter()
                progress_bar = not args.no_progress_bar
                metrics = train(steps, optimizer, epochs=args.epochs, seed=seed, progress_bar=progress_bar)
                results.setdefault((optimizer, steps), []).append(metrics)
                print(
                    f"[{optimizer} seed={seed} {method_name(steps)}] val_loss={metrics['val_loss']:.4f} "
                    f"val_acc={metrics['val_acc']:.4f} ({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )

    header = ["optimizer", "method", "val_loss", "val_acc", "Δ val_loss", "Δ val_acc"]
    rows = []
    for optimizer in args.optimizers:
        base = results[(optimizer, None)]
        for steps in methods:
            runs = results[(optimizer, steps)]
            row = [optimizer, method_name(steps)]
            row += [summary([r[k] for r in runs], digits=4) for k in ("val_loss", "val_acc")]
            if steps is None:
                row += ["", ""]
            else:
                for key in ("val_loss", "val_acc"):
                    deltas = [r[key] - b[key] for r, b in zip(runs, base, strict=True)]
                    row.append(summary(deltas, signed=True, digits=4))
            rows.append(row)
    epochs = f"{args.epochs} epoch" + ("s" if args.epochs > 1 else "")
    seeds = f"mean ± std over {args.seeds} seeds" if args.seeds > 1 else "1 seed"
    caption = "Δ = XGrad - baseline, run for run at the same seed"
    print_table(f"Digits, final validation after {epochs}, {seeds}", caption, header, rows, label_columns=2)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"wall time (all runs): {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
