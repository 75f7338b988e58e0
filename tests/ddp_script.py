"""XGrad under DDP on 2 CPU processes (gloo): one fit per optimizer named on the command line.

Run by ``tests/test_ddp.py`` (Lightning's ``strategy="ddp"`` relaunches the script it runs, so it cannot run inside
pytest)::

    python tests/ddp_script.py --out DIR --optimizers adam rmsprop

Each rank reads its own shard through an explicit ``DistributedSampler(shuffle=False)``, so rank r gets samples
r, r+2, r+4, ...: step i of the two ranks together covers samples [2*b*i, 2*b*(i+1)), which a single process
replays with a non-shuffling loader of batch size 2*b. Each rank saves ``{name}_rank{r}.pt``: its final parameters
(flat), the inputs of every batch it trained on, and the callback's metrics as every rank computed them (logged every
``LOG_EVERY`` steps: ``logged_shift``, ``logged_cosine``, ``logged_error``, NaN at other steps).

The fits run one after the other in the same processes: after the first launch LOCAL_RANK is set on every rank, so
later Trainers neither relaunch nor re-initialise the process group.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.toolkit` when run as a script

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_xgrad import XGradCallback
from tests.toolkit import OPTIMIZERS, TinyModule, XGradMetricsRecorder, flat, make_data, trainer

WORLD_SIZE = 2
N = 80
PER_RANK_BATCH = 4
EPOCHS = 2  # N / (WORLD_SIZE * PER_RANK_BATCH) = 10 steps per epoch
#: XGradCallback's logging cadence (logging reads the weights only: the training is the same without it)
LOG_EVERY = 3


class ShardedModule(TinyModule):
    """TinyModule that serves this rank's shard of ``make_data(N)``, in order."""

    def train_dataloader(self) -> DataLoader:
        x, y = make_data(N)
        dataset = TensorDataset(x, y)
        sampler = DistributedSampler(dataset, num_replicas=WORLD_SIZE, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=PER_RANK_BATCH, sampler=sampler)


class InputRecorder(Callback):
    """The inputs of every training batch this rank sees."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.inputs.append(batch[0].detach().clone())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--optimizers", nargs="+", choices=sorted(OPTIMIZERS), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores
    for name in args.optimizers:
        recorder, metrics = InputRecorder(), XGradMetricsRecorder()
        run = trainer(
            devices=WORLD_SIZE,
            strategy="ddp",
            use_distributed_sampler=False,
            max_epochs=EPOCHS,
            callbacks=[XGradCallback(log_every_n_steps=LOG_EVERY), recorder, metrics],
        )
        module = ShardedModule(OPTIMIZERS[name])
        run.fit(module)
        assert run.world_size == WORLD_SIZE
        result = {
            "params": flat(module),
            "inputs": torch.stack(recorder.inputs),
            "global_step": run.global_step,
            **metrics.tensors(),
        }
        torch.save(result, args.out / f"{name}_rank{run.global_rank}.pt")


if __name__ == "__main__":
    main()
