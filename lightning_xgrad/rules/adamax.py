"""Rule for torch's Adamax: dW = m_hat / u, the direction its update applies.

torch's Adamax keeps ``exp_avg`` (m) and ``exp_inf`` (u = max(b2 * u, |g| + eps)) and applies
``p -= lr / (1 - b1^k) * m / u``; L2 weight decay and ``maximize`` are already inside g, so inside m and u.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._foreach import chunk_slices
from .._scalars import step_counts_as_floats
from .base import PredictionRule


class AdamaxRule(PredictionRule):
    """torch.optim.Adamax; a ``step`` kept on an accelerator (capturable) is read with one sync per group."""

    name = "adamax"

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "exp_inf" not in state:
            return None
        return state["exp_avg"], state["exp_inf"], state["step"]

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[list[Any]], group: dict[str, Any], alpha: float
    ) -> None:
        exp_avgs, exp_infs, step_counts = columns
        beta1 = float(group["betas"][0])
        step_sizes = [alpha / (1.0 - beta1**k) for k in step_counts_as_floats(step_counts)]
        for part in chunk_slices(params):
            torch._foreach_addcdiv_(params[part], exp_avgs[part], exp_infs[part], step_sizes[part])
