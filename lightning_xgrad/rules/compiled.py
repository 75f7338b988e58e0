"""Optional compiled prediction: the snapshot and ``W += alpha * dW`` in one pass over each tensor.

Eager foreach ops walk the parameters once per op (copy, sqrt, add, addcdiv for Adam); inductor fuses them into one
loop per tensor that reads W and the optimizer state once and writes the snapshot and W_hat, with no temporaries.
Each bucket gets its own compiled function (its own compile cache), compiled at its first prediction; per-step
scalars (bias corrections, lr) travel as a tensor, so a new step count or lr does not recompile.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

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
