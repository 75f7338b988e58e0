"""Rule for torch's RAdam: the rectified Adam direction, or the bias-corrected momentum before rectification.

With k the step count, rho_inf = 2 / (1 - b2) - 1 and rho_k = rho_inf - 2 k b2^k / (1 - b2^k), torch's RAdam applies
``p -= lr * dW`` with

- rho_k > 5: ``dW = m_hat * r_k * sqrt(1 - b2^k) / (sqrt(v) + eps)``,
  ``r_k = sqrt((rho_k - 4)(rho_k - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_k))``;
- otherwise: ``dW = m_hat`` (momentum SGD while the variance estimate is unreliable),

where ``m_hat = m / (1 - b1^k)``. Decoupled weight decay is left out of dW; L2 decay is already inside m and v.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._directions import add_adam_direction_
from .._foreach import chunk_slices
from .._scalars import step_counts_as_floats
from .base import PredictionRule


def _rectification(k: float, beta2: float) -> float | None:
    """r_k, or ``None`` while rho_k <= 5 (RAdam then applies the bias-corrected momentum alone)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_k = rho_inf - 2.0 * k * beta2**k / (1.0 - beta2**k)
    if rho_k <= 5.0:
        return None
    return math.sqrt((rho_k - 4) * (rho_k - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_k))


class RAdamRule(PredictionRule):
    """torch.optim.RAdam; a ``step`` kept on an accelerator (capturable) is read with one sync per group."""

    name = "radam"

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            return None
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[list[Any]], group: dict[str, Any], alpha: float
    ) -> None:
        exp_avgs, exp_avg_sqs, step_counts = columns
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        rectified: list[int] = []
        rectified_sizes: list[float] = []
        plain: list[int] = []
        plain_sizes: list[float] = []
        for i, k in enumerate(step_counts_as_floats(step_counts)):
            step_size = alpha / (1.0 - beta1**k)
            rect = _rectification(k, beta2)
            if rect is None:
                plain.append(i)
                plain_sizes.append(step_size)
            else:
                rectified.append(i)
                rectified_sizes.append(step_size * rect * math.sqrt(1.0 - beta2**k))
        if plain:
            targets = [params[i] for i in plain]
            moments = [exp_avgs[i] for i in plain]
            for part in chunk_slices(targets):
                torch._foreach_add_(targets[part], torch._foreach_mul(moments[part], plain_sizes[part]))
        if rectified:
            targets = [params[i] for i in rectified]
            moments = [exp_avgs[i] for i in rectified]
            second = [exp_avg_sqs[i] for i in rectified]
            add_adam_direction_(targets, moments, second, rectified_sizes, eps=eps)
