"""Rule for AdaM3 (``lightning_xgrad.optim.AdaM3``): dW = m_hat / sqrt(v / (1 - b2^k)), the direction it applies.

``m_hat = m / (1 - b1^k)`` at the current step count k; v is the state's ``exp_avg_sq``, which already holds
``b2 * v + (1 - b2) * m^2 + eps`` (AdaM3 adds eps into its state, as the official code does), so the rule adds no
eps of its own, and there is none outside the square root. Coupled (L2) weight decay and ``maximize`` are already
inside m; decoupled decay is left out of dW, as for AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._foreach import chunk_slices, steps_as_floats
from .base import PredictionRule


class AdaM3Rule(PredictionRule):
    """AdaM3 (any weight decay mode, ``maximize``, ``foreach``)."""

    name = "adam3"

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "exp_avg_sq" not in state or "step" not in state:
            return None
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[list[Any]], group: dict[str, Any], alpha: float
    ) -> None:
        exp_avgs, exp_avg_sqs, steps = columns
        if not params or alpha == 0:
            return
        beta1, beta2 = (float(b) for b in group["betas"])
        if isinstance(steps[0], Tensor) and steps[0].device != torch.device("cpu"):
            self._add_with_device_steps(params, list(exp_avgs), list(exp_avg_sqs), list(steps), beta1, beta2, alpha)
            return
        ks = steps_as_floats(steps)
        sqrt_bc2 = [math.sqrt(1.0 - beta2**k) for k in ks]
        step_sizes = [alpha / (1.0 - beta1**k) for k in ks]
        for part in chunk_slices(params):
            denom = torch._foreach_sqrt(exp_avg_sqs[part])
            torch._foreach_div_(denom, sqrt_bc2[part])
            torch._foreach_addcdiv_(params[part], exp_avgs[part], denom, step_sizes[part])

    @staticmethod
    def _add_with_device_steps(
        params: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        steps: list[Tensor],
        beta1: float,
        beta2: float,
        alpha: float,
    ) -> None:
        """Steps that live on the accelerator (e.g. a state moved there): bias corrections as tensors, no sync."""
        bc1 = torch._foreach_pow(beta1, steps)
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1.0)
        sqrt_bc2 = torch._foreach_pow(beta2, steps)
        torch._foreach_neg_(sqrt_bc2)
        torch._foreach_add_(sqrt_bc2, 1.0)
        torch._foreach_sqrt_(sqrt_bc2)
        torch._foreach_div_(bc1, alpha)  # bc1 / alpha: the divisor that turns m / denom into alpha * m_hat / denom
        for part in chunk_slices(params):
            denom = torch._foreach_sqrt(exp_avg_sqs[part])
            torch._foreach_div_(denom, sqrt_bc2[part])
            torch._foreach_mul_(denom, bc1[part])
            torch._foreach_addcdiv_(params[part], exp_avgs[part], denom)
