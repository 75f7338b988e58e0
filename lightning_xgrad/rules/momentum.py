"""Rules for optimizers whose momentum buffer is the update direction: SGD (heavy ball) and RMSprop with momentum.

torch's SGD applies ``p -= lr * buf`` with ``buf = momentum * buf + (1 - dampening) * g`` (L2 weight decay and
``maximize`` already folded into g), and RMSprop with momentum applies ``p -= lr * buf`` with
``buf = momentum * buf + g / (sqrt(v) + eps)``. Either way dW is the buffer itself. Nesterov SGD and RMSprop
without momentum apply a direction that includes the fresh gradient, which the state does not keep.

These rules have no compiled prediction (``compile=True`` leaves them eager): their eager prediction is already one
copy and one foreach add, and a compiled kernel, which runs per tensor, measured slower than it on the overhead
benchmark's models (benchmarks/results/overhead.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._internal.chunks import Chunks
from .base import PredictionRule


class MomentumBufferRule(PredictionRule):
    """dW = ``state["momentum_buffer"]``."""

    name = "momentum_buffer"

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        buffer = state.get("momentum_buffer")
        return None if buffer is None else (buffer,)

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        torch._foreach_add_(params, columns[0], alpha=alpha)  # in place, no temporaries: one call


class SGDRule(MomentumBufferRule):
    """SGD with momentum and without Nesterov."""

    name = "sgd_momentum"

    def handles(self, group: dict[str, Any]) -> bool:
        return group.get("momentum", 0) > 0 and not group.get("nesterov", False)


class RMSpropRule(MomentumBufferRule):
    """RMSprop with momentum (plain or centered)."""

    name = "rmsprop_momentum"

    def handles(self, group: dict[str, Any]) -> bool:
        return group.get("momentum", 0) > 0
