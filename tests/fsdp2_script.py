"""XGrad under ModelParallelStrategy (FSDP2) on 2 CPU processes (gloo): the fits named on the command line.

Run by ``tests/test_model_parallel.py`` (Lightning relaunches the script it runs, so it cannot run inside pytest)::

    python tests/fsdp2_script.py --out DIR --runs adam:baseline adam:xgrad rmsprop:xgrad adam:xgrad_logged

``configure_model`` applies ``fully_shard`` over the data-parallel mesh of size 2 to each layer and the root, so every
parameter and every optimizer state tensor is a DTensor sharded on dim 0. The net is shaped so the shards are uneven
(15 rows: 8 + 7) and one parameter (``scale``, 1 row) has an empty shard on rank 1. Data are served as in
``tests/ddp_script.py`` (explicit ``DistributedSampler(shuffle=False)``, so the ranks' batches i together are the
single-process batch i of size 2*b).

For each run ``NAME:MODE`` (NAME a key of ``tests.toolkit.OPTIMIZERS``; MODE ``baseline``: no callback, ``xgrad``:
``XGradCallback()``, ``xgrad_logged``: ``XGradCallback(log_every_n_steps=1)``) each rank saves
``{name}_{mode}_rank{r}.pt``: the final full parameters (``full_tensor()`` of every DTensor, flat, in
``named_parameters`` order), its local shard sizes, the inputs of every batch it trained on, the logged
``xgrad/relative_shift``, ``xgrad/prediction_cosine`` and ``xgrad/prediction_error`` after every batch
(``logged_shift``, ``logged_cosine``, ``logged_error``), and ``probe``, one row per batch taken in
``on_train_batch_start`` after the callback predicted, with columns

- ``sd_gap``: max |full(state_dict()[name]) - W|, W the real weights recorded before the callback ran (must be 0);
- ``dcp_gap``: the same for ``get_model_state_dict(full_state_dict=True)`` (what a full checkpoint collects);
- ``shift``: max |W_param_now - W|, what the prediction moved (> 0 from the second step on with XGrad);
- ``sd_dtensor``: whether every rank's state_dict values are DTensors of their parameters' global shape, placements
  and local shard shape (if not, nothing is gathered and both gaps are infinite).

The fits run one after the other in the same processes: after the first launch LOCAL_RANK is set on every rank, so
later Trainers neither relaunch nor re-initialise the process group.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests.*` when run as a script

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_xgrad import XGradCallback
from tests.ddp_script import EPOCHS, WORLD_SIZE, InputRecorder, ShardedModule
from tests.toolkit import OPTIMIZERS, OptimizerFactory, TinyModule, XGradMetricsRecorder

MODES = ("baseline", "xgrad", "xgrad_logged")
#: why this torch's FSDP2 cannot run on the CPU, or None: its collectives record events on streams, which
#: ``torch.cpu.Stream`` lacks in older releases (2.6), so even a fit without XGrad fails inside torch there
CPU_FSDP2_MISSING = (
    None
    if hasattr(torch.cpu.Stream, "record_event")
    else f"torch {torch.__version__}'s FSDP2 does not run on the CPU: torch.cpu.Stream has no record_event"
)


class Scale(nn.Module):
    """``x * weight`` with a (1, features) weight: fully_shard on dim 0 leaves rank 1 an empty (0, features) shard."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, features), 1.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def make_uneven_net(seed: int = 0) -> nn.Sequential:
    """A two-layer MLP whose dim-0 sizes (15, 15, 2, 2, 1) shard unevenly over two ranks, one of them to nothing."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 15), nn.Tanh(), nn.Linear(15, 2), Scale(2))


class UnevenModule(TinyModule):
    """TinyModule with ``make_uneven_net``: the unsharded single-process model."""

    def __init__(self, optimizer: OptimizerFactory = OPTIMIZERS["adam"], seed: int = 0) -> None:
        super().__init__(optimizer, seed=seed)
        self.net = make_uneven_net(seed)


class FullyShardedModule(UnevenModule, ShardedModule):
    """UnevenModule, fully sharded (FSDP2) over the data-parallel mesh, serving this rank's shard of the data."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def full(value: Tensor) -> Tensor:
    """The whole tensor: gathered from the shards for a DTensor (a collective: every rank must call it)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_flat(module: nn.Module) -> Tensor:
    """All parameters as one detached vector, gathered from the shards."""
    return torch.cat([full(p.detach()).reshape(-1).clone() for p in module.parameters()])


def gap(value: Tensor, expected: Tensor) -> float:
    """max |value - expected|; infinite where the shapes differ (a DTensor rebuilt with the wrong global shape)."""
    if value.shape != expected.shape:
        return math.inf
    return float((value.detach() - expected).abs().max())


class RealWeightRecorder(Callback):
    """Placed before XGradCallback: the full real weights at the start of every batch."""

    def __init__(self) -> None:
        self.real: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.real = {name: full(p.detach()).clone() for name, p in pl_module.named_parameters()}


class MidWindowStateDictProbe(Callback):
    """Placed after XGradCallback: what ``state_dict()`` reports while the prediction is in the parameters."""

    def __init__(self, recorder: RealWeightRecorder) -> None:
        self.recorder = recorder
        self.rows: list[list[float]] = []

    @torch.no_grad()
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        real = self.recorder.real
        params = dict(pl_module.named_parameters())
        shift = max(gap(full(p), real[name]) for name, p in params.items())
        state = pl_module.state_dict()
        well_formed = torch.tensor(
            all(
                isinstance(state[name], DTensor)
                and state[name].shape == p.shape
                and state[name].placements == p.placements
                and state[name].to_local().shape == p.to_local().shape
                for name, p in params.items()
            ),
            dtype=torch.int32,
        )
        # gathering a malformed DTensor can fail or hang on one rank only: gather only if every rank's are sound
        torch.distributed.all_reduce(well_formed, op=torch.distributed.ReduceOp.MIN)
        if not well_formed:
            self.rows.append([math.inf, math.inf, shift, 0.0])
            return
        sd_gap = max(gap(full(state[name]), real[name]) for name in params)
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        gathered = get_model_state_dict(pl_module, options=options)
        dcp_gap = max(gap(gathered[name], real[name]) for name in params)
        self.rows.append([sd_gap, dcp_gap, shift, 1.0])


def xgrad_callback(mode: str) -> XGradCallback:
    """The callback of a mode: ``xgrad`` the defaults, ``xgrad_logged`` also logging its metrics every step."""
    return XGradCallback(log_every_n_steps=1) if mode == "xgrad_logged" else XGradCallback()


def sharded_trainer(callbacks: list[Callback], epochs: int = EPOCHS) -> pl.Trainer:
    """A Trainer of WORLD_SIZE CPU processes, FSDP2 over all of them, with nothing else on (no logger, checkpoints,
    progress bar, summary or sanity check)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1),
        use_distributed_sampler=False,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def fit(name: str, mode: str) -> dict[str, Any]:
    """One sharded fit; returns what this rank saves."""
    recorder, inputs, metrics = RealWeightRecorder(), InputRecorder(), XGradMetricsRecorder()
    probe = MidWindowStateDictProbe(recorder)
    xgrad = [] if mode == "baseline" else [xgrad_callback(mode)]
    trainer = sharded_trainer([recorder, *xgrad, probe, inputs, metrics])
    module = FullyShardedModule(OPTIMIZERS[name])
    trainer.fit(module)
    assert trainer.world_size == WORLD_SIZE
    assert all(isinstance(p, DTensor) for p in module.parameters()), "configure_model left parameters unsharded"
    state = trainer.optimizers[0].state.values()
    assert all(isinstance(v, DTensor) for s in state for k, v in s.items() if k != "step"), "unsharded optimizer state"
    return {
        "params": full_flat(module),
        "local_numels": torch.tensor([p.to_local().numel() for p in module.parameters()]),
        "inputs": torch.stack(inputs.inputs),
        "global_step": trainer.global_step,
        "probe": torch.tensor(probe.rows, dtype=torch.float64),
        **metrics.tensors(),
    }


def run_spec(text: str) -> tuple[str, str]:
    """``NAME:MODE`` -> (optimizer name, mode)."""
    name, _, mode = text.partition(":")
    if name not in OPTIMIZERS or mode not in MODES:
        raise argparse.ArgumentTypeError(f"expected NAME:MODE with NAME in {sorted(OPTIMIZERS)}, MODE in {MODES}")
    return name, mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", nargs="+", type=run_spec, required=True, help="NAME:MODE, run in this order")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes on two cores
    for name, mode in args.runs:
        result = fit(name, mode)
        torch.save(result, args.out / f"{name}_{mode}_rank{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main()
