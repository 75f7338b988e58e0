"""XGrad in a plain Lightning Fabric training loop: an MLP on scikit-learn's digits with OptimizerPredictor.

Fabric has no callbacks for XGrad to hook into: the loop calls :class:`lightning_xgrad.OptimizerPredictor` itself,
around ``fabric.backward`` and ``optimizer.step``. The predictor takes the optimizer ``fabric.setup`` returns (a
``FabricAdamW``, say) and reads the real optimizer inside it, so AdamW still predicts with its Adam rule. One step::

    predictor.predict()                      # 1. W <- W_hat = W - s * lr * dW (the real W kept aside)
    loss = F.cross_entropy(model(x), y)      # 2. forward and backward at W_hat; under 16-mixed the
    fabric.backward(loss)                    #    gradients are still multiplied by the loss scale
    fabric.strategy.precision.unscale_gradients(optimizer.optimizer)
                                             # 3. 16-mixed: unscale now (other precisions: a no-op)
    predictor.restore()                      # 4. W <- the real W, bit-exact
    optimizer.step()                         # 5. update the real W with the gradient taken at W_hat
    optimizer.zero_grad()

Why this order under ``16-mixed`` (a GradScaler): Fabric's ``optimizer.step()`` is ``scaler.step`` (unscale unless
already done, skip the update if a gradient is inf or nan) followed by ``scaler.update``, so the real weights must
be back before it (step 4 before 5), and whatever runs between the backward pass and the step must see unscaled
gradients, as in Lightning's Trainer, which unscales before ``on_before_optimizer_step``: gradient clipping, and
``restore()`` itself, which hands the gradient point to optimizers that read their gradients there
(``AdaptiveHeavyBallSGD``/``Adam``). Hence step 3 first. Unscale ``optimizer.optimizer``, the optimizer inside
Fabric's wrapper: Fabric's step hands that object to ``scaler.step``, and a GradScaler remembers per optimizer object
whether it unscaled already, so unscaling the wrapper would divide the gradients by the scale twice. If you clip,
``fabric.clip_gradients(model, optimizer, ...)`` unscales (the right object) for you: call it in place of step 3. A
step the scaler skips leaves the real weights untouched.

Runs on CPU in seconds; the data ship with scikit-learn, nothing is downloaded::

    python examples/fabric_loop.py                              # AdamW, XGrad s=1, 32-true
    python examples/fabric_loop.py --steps 0                    # the same loop without XGrad
    python examples/fabric_loop.py --precision 16-mixed         # fp16 autocast with a GradScaler, on CPU too
    python examples/fabric_loop.py --devices 2 --strategy ddp   # DDP, 2 processes (gloo on CPU)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_xgrad import OptimizerPredictor

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = {"adamw": 3e-3, "sgd": 0.05}


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train and validation sets: 8x8 digits as 64 features in [0, 1] and int64 labels, split 80/20 by class."""
    digits = load_digits()
    features = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # pixels are 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(range(len(labels)), test_size=0.2, random_state=seed, stratify=labels.numpy())
    return TensorDataset(features[train_idx], labels[train_idx]), TensorDataset(features[val_idx], labels[val_idx])


def train_loader(dataset: TensorDataset, batch_size: int, seed: int) -> DataLoader:
    """Shuffled with a seeded generator; under DDP, ``fabric.setup_dataloaders`` replaces the sampler with a
    ``DistributedSampler(shuffle=True, seed=<the seed_everything seed>)``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def make_fabric(accelerator: str, devices: int, strategy: str, precision: str) -> Fabric:
    """Fabric on CPU turns ``precision="16-mixed"`` into bf16-mixed (with a warning); a GradScaler plugin keeps it
    fp16."""
    if precision == "16-mixed" and accelerator == "cpu":
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        return Fabric(accelerator=accelerator, devices=devices, strategy=strategy, plugins=[plugin])
    return Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the loader (the whole validation set, on every rank)."""
    total_loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    return total_loss / count, correct / count


def train(
    steps: int = 1,
    rule: Literal["auto", "trajectory"] = "auto",
    optimizer_name: str = "adamw",
    lr: float | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    precision: str = "32-true",
    accelerator: str = "cpu",
    devices: int = 1,
    strategy: str = "auto",
    seed: int = 0,
    save: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train once (XGrad with ``steps`` look-ahead, none for 0); the final metrics and the trained module."""
    fabric = make_fabric(accelerator, devices, strategy, precision)
    fabric.launch()  # DDP: start the other processes (they rerun this script)
    fabric.seed_everything(seed, verbose=False)
    train_set, val_set = digits_datasets(seed)
    module = make_model(seed)
    lr = DEFAULT_LR[optimizer_name] if lr is None else lr
    model, optimizer = fabric.setup(module, make_optimizer(optimizer_name, module.parameters(), lr))
    train_data = fabric.setup_dataloaders(train_loader(train_set, batch_size, seed))
    val_data = fabric.setup_dataloaders(DataLoader(val_set, batch_size=256), use_distributed_sampler=False)
    predictor = OptimizerPredictor(optimizer, steps=steps, rule=rule) if steps > 0 else None  # reads the AdamW inside
    optimizer_steps = 0
    for epoch in range(epochs):
        model.train()
        for x, y in train_data:
            if predictor is not None:
                predictor.predict()  # W <- W_hat
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)  # gradients at W_hat (scaled under 16-mixed)
            fabric.strategy.precision.unscale_gradients(optimizer.optimizer)  # before anything reads them (above)
            if predictor is not None:
                predictor.restore()  # W <- the real W, before the step updates it
            optimizer.step()  # 16-mixed: scaler.step (skips on inf/nan) and scaler.update
            optimizer.zero_grad()
            optimizer_steps += 1
        model.eval()
        val_loss, val_acc = evaluate(model, val_data)
        if not quiet:
            fabric.print(f"epoch {epoch}: train_loss {loss.item():.4f}  val_loss {val_loss:.4f}  val_acc {val_acc:.4f}")
    if save is not None:
        fabric.save(save, {"model": model})
    return {"val_loss": val_loss, "val_acc": val_acc, "optimizer_steps": optimizer_steps, "module": module}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1, help="XGrad's look-ahead s; 0 trains without XGrad (default 1)")
    parser.add_argument("--rule", choices=("auto", "trajectory"), default="auto", help="XGrad's dW rule")
    parser.add_argument("--optimizer", dest="optimizer_name", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default {DEFAULT_LR})")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="e.g. ddp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="save the trained weights here (fabric.save)")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps must be >= 0, got {args.steps}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return train(**vars(parse_args(argv)))


if __name__ == "__main__":
    main()
