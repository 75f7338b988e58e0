"""Optional compiled prediction: the snapshot and ``W += alpha * dW`` in one pass over each tensor.

Eager foreach ops walk the parameters once per op (copy, sqrt, add, addcdiv for Adam); inductor fuses them into one
loop per tensor that reads W and the optimizer state once and writes the snapshot and W_hat, with no temporaries.
Each bucket gets its own compiled function (its own compile cache), compiled at its first prediction; per-step
scalars (bias corrections, lr) travel as a tensor, so a new step count or lr does not recompile.

A compiled call has a fixed cost (its guards over every tensor it takes, its wrapper) that the eager foreach ops do
not pay, and in a training step, between a forward and a backward, that cost grows. The passes it saves outweigh it
only for buckets of a few MiB and up, so a bucket smaller than ``compile_min_bytes`` stays eager
(:class:`CompiledKernels`); benchmarks/results/overhead.md measures where the two meet.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

#: the default ``compile_min_bytes``: buckets with fewer parameter bytes are predicted eagerly under ``compile=True``.
#: Measured on a CPU (benchmarks/results/overhead.md: compiled and eager meet near 2 MiB of parameters, whatever the
#: number of tensors); not measured on a GPU, where ``compile_min_bytes=0`` compiles every bucket
DEFAULT_COMPILE_MIN_BYTES = 4 * 2**20

#: per-step scalars of a bucket, ``[rows][tensors]``, or ``None`` when the rule cannot give them without a sync
ScalarsOf = Callable[[Sequence[Any], dict[str, Any], float], list[list[float]] | None]


def adam_kernel(
    params: list[Tensor], buffers: list[Tensor], exp_avgs: list[Tensor], second_moments: list[Tensor], scalars: Tensor
) -> None:
    """``buffers <- params``; ``params += scalars[1] * m / (sqrt(v) + scalars[0])``, per tensor."""
    for i in range(len(params)):
        buffers[i].copy_(params[i])
        params[i].add_(exp_avgs[i] / (second_moments[i].sqrt() + scalars[0, i]) * scalars[1, i])


class CompiledPrediction:
    """A compiled predict for one bucket: ``kernel(params, buffers, *state columns, scalars)``."""

    def __init__(self, kernel: Callable[..., None], columns: int, scalars_of: ScalarsOf) -> None:
        # A copy of the kernel with its own code object: dynamo caches per code object, so buckets with different
        # tensor lists do not evict each other or run into the recompile limit.
        fresh = types.FunctionType(kernel.__code__.replace(), kernel.__globals__, kernel.__name__)
        self._kernel = torch.compile(fresh, dynamic=False, fullgraph=True)
        self._columns = columns
        self._scalars_of = scalars_of

    def __call__(
        self,
        params: list[Tensor],
        buffers: list[Tensor],
        columns: Sequence[Any],
        group: dict[str, Any],
        alpha: float,
    ) -> bool:
        """Predict in place; ``False`` (nothing done) when the scalars are not available without a device sync."""
        scalars = self._scalars_of(columns, group, alpha)
        if scalars is None:
            return False
        values = torch.tensor(scalars, dtype=torch.float32)
        if params[0].device.type != "cpu":
            values = values.pin_memory().to(params[0].device, non_blocking=True)
        self._kernel(params, buffers, *columns[: self._columns], values)
        return True


class CompiledKernels:
    """The compiled predictions of one predictor, by bucket key, kept across plans (each is compiled once).

    Only buckets of at least ``min_bytes`` parameter bytes get one; smaller buckets, and rules without a kernel, get
    ``None`` and are predicted eagerly.
    """

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self._by_key: dict[Hashable, CompiledPrediction | None] = {}

    def for_bucket(self, key: Hashable, params: Sequence[Tensor], rule: Any) -> CompiledPrediction | None:
        """The kernel for the bucket ``key`` holding ``params``, predicted by ``rule`` (a
        :class:`~lightning_xgrad.rules.PredictionRule`); ``None``: predict it eagerly."""
        if sum(p.numel() * p.element_size() for p in params) < self.min_bytes:
            return None
        if key not in self._by_key:
            self._by_key[key] = rule.compiled_prediction()
        return self._by_key[key]
