"""The adaptive heavy-ball optimizers with XGrad under FSDP2 (ModelParallelStrategy, 2 CPU processes, gloo).

Run by ``tests/test_heavy_ball.py`` (Lightning relaunches the script it runs, so it cannot run inside pytest)::

    python tests/heavy_ball_fsdp2_script.py OUT_DIR

The model and data are those of ``tests/fsdp2_script.py``: every parameter a DTensor sharded on dim 0, unevenly, one
with an empty shard on rank 1, and rank r's batches together are the single-process batches of :class:`
GlobalBatchModule`. The optimizer has two param groups, so each group's squared norms must be summed over the ranks.
Each rank saves ``{kind}_rank{r}.pt``: the full final parameters (flat), the beta of both groups after every step and
its local shard sizes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.*` when run as a script

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_xgrad import XGradCallback
from lightning_xgrad.heavy_ball.optim import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD
from tests.ddp_script import PER_RANK_BATCH, WORLD_SIZE, N
from tests.fsdp2_script import FullyShardedModule, UnevenModule, full_flat, sharded_trainer
from tests.toolkit import loader, make_data

KINDS = ("sgd", "adam")
EPOCHS = 1  # N / (WORLD_SIZE * PER_RANK_BATCH) = 10 steps


def make_optimizer(kind: str, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """Two groups: the first layer, and the rest (second layer and the scale with an empty shard on rank 1)."""
    ps = list(params)
    if kind == "sgd":
        groups = [{"params": ps[:2], "lr": 0.05}, {"params": ps[2:], "lr": 0.1, "weight_decay": 1e-3}]
        return AdaptiveHeavyBallSGD(groups)
    groups = [{"params": ps[:2], "lr": 0.01, "weight_decay": 0.01}, {"params": ps[2:], "lr": 0.005}]
    return AdaptiveHeavyBallAdam(groups)


class BetaRecorder:
    """Mixin for a LightningModule: both groups' beta after every step."""

    betas: list[list[float]]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        groups = self.trainer.optimizers[0].param_groups  # type: ignore[attr-defined]
        self.betas.append([float(g["momentum"]) for g in groups])


class GlobalBatchModule(BetaRecorder, UnevenModule):
    """The unsharded single-process model, on the global batches (size WORLD_SIZE * PER_RANK_BATCH, in order)."""

    def __init__(self, kind: str) -> None:
        super().__init__(lambda p: make_optimizer(kind, p))
        self.betas = []

    def train_dataloader(self) -> DataLoader:
        return loader(*make_data(N), WORLD_SIZE * PER_RANK_BATCH)


class ShardedHeavyBallModule(BetaRecorder, FullyShardedModule):
    """The same model fully sharded over the two ranks, each serving its shard of the data."""

    def __init__(self, kind: str) -> None:
        super().__init__(lambda p: make_optimizer(kind, p))
        self.betas = []


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)  # two processes on two cores
    for kind in KINDS:
        module = ShardedHeavyBallModule(kind)
        trainer = sharded_trainer([XGradCallback()], epochs=EPOCHS)
        trainer.fit(module)
        result = {
            "params": full_flat(module),
            "betas": torch.tensor(module.betas),
            "local_numels": [p.to_local().numel() for p in module.parameters()],
            # the secant's state is sharded like the parameters (DTensors), as torch's optimizers keep theirs
            "sharded_state": all(
                isinstance(state[key], DTensor)
                for state in trainer.optimizers[0].state.values()
                for key in ("prev_point", "prev_grad")
            ),
        }
        torch.save(result, out / f"{kind}_rank{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main()
