"""XGrad under tensor parallelism (ModelParallelStrategy, data_parallel_size=1, tensor_parallel_size=2) on 2 CPU
processes (gloo), run by ``tests/test_model_parallel.py``::

    python tests/tp_script.py OUT_DIR

``net.0`` is column-wise and ``net.2`` row-wise parallel, so weights are DTensors sharded on different dims and
``net.2.bias`` is a replicated DTensor. Both ranks see every batch (tensor parallelism splits the model, not the
data). Each rank saves ``tp_rank{r}.pt``: the full final weights and the ``xgrad/relative_shift``,
``xgrad/prediction_cosine`` and ``xgrad/prediction_error`` logged every step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.*` when run as a script

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lightning_xgrad import XGradCallback
from tests.fsdp2_script import full_flat
from tests.toolkit import OPTIMIZERS, TinyModule, XGradMetricsRecorder, loader, make_data, trainer

EPOCHS, N, BATCH = 2, 80, 8


class TensorParallelModule(TinyModule):
    def configure_model(self) -> None:
        parallelize_module(
            self.net, self.device_mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()}
        )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    metrics = XGradMetricsRecorder()
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    run = trainer(
        devices=2,
        strategy=strategy,
        use_distributed_sampler=False,
        max_epochs=EPOCHS,
        callbacks=[XGradCallback(log_every_n_steps=1), metrics],
    )
    module = TensorParallelModule(OPTIMIZERS["adam"])
    run.fit(module, loader(*make_data(N), batch_size=BATCH))
    params = full_flat(module)
    torch.save({"params": params, **metrics.tensors()}, out / f"tp_rank{run.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
