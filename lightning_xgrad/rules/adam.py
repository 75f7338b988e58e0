"""Rule for Adam and AdamW: dW = m_hat / (sqrt(v_hat) + eps), the direction torch's Adam applies.

``m_hat = m / (1 - b1^k)``, ``v_hat = v / (1 - b2^k)`` at the current step count k; eps outside the square root
as in torch; with ``amsgrad`` v is ``max_exp_avg_sq``, what the update itself uses. Coupled (L2) weight decay is
already inside m; AdamW's decoupled decay is left out of dW, as in the XGrad paper and its official code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._internal.adam_direction import add_adam_direction_, bias_corrected_step_sizes, sqrt_bias_corrections2
from .._internal.chunks import Chunks
from .._internal.scalars import StepCounts, one_minus_powers, uniform
from .base import PredictionRule
from .compiled import CompiledPrediction, adam_kernel


def adam_scalars(
    steps: Sequence[float], beta1: float, beta2: float, eps: float, alpha: float
) -> tuple[float | list[float], float | list[float]]:
    """Per-tensor ``(eps', step')`` such that ``alpha * m_hat / (sqrt(v_hat) + eps) == step' * m / (sqrt(v) + eps')``
    at step counts ``steps``: the bias corrections ride on scalars, which saves a pass over v. Single floats when every
    tensor is at the same step (the usual case), so foreach ops take their cheaper scalar overloads."""
    if isinstance(k := uniform(list(steps)), float):
        sqrt_bc2 = math.sqrt(1.0 - beta2**k)
        return eps * sqrt_bc2, alpha * sqrt_bc2 / (1.0 - beta1**k)
    sqrt_bc2s = sqrt_bias_corrections2(beta2, steps)
    step_sizes = bias_corrected_step_sizes(alpha, beta1, steps)
    return [eps * c for c in sqrt_bc2s], [size * c for size, c in zip(step_sizes, sqrt_bc2s, strict=True)]


class AdamRule(PredictionRule):
    """Adam, AdamW (also with ``amsgrad``, ``maximize``, ``foreach``, ``fused`` and ``capturable``)."""

    name = "adam"
    step_column = 2

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "step" not in state:
            return None
        second_moment = state.get("max_exp_avg_sq", state["exp_avg_sq"])
        return state["exp_avg"], second_moment, state["step"]

    def outer_eps(self, group: dict[str, Any]) -> float:
        """The eps added to the square root in the denominator (Adam's ``eps``)."""
        return float(group["eps"])

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        exp_avgs, second_moments, steps = columns
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = self.outer_eps(group)
        if not steps.host_readable:
            _add_with_device_steps(params, exp_avgs, second_moments, steps, beta1, beta2, eps, alpha, chunks)
            return
        eps_folded, step_size = adam_scalars(steps.floats(), beta1, beta2, eps, alpha)
        add_adam_direction_(params, exp_avgs, second_moments, step_size, eps=eps_folded, chunks=chunks)

    def compiled_prediction(self) -> CompiledPrediction | None:
        return CompiledPrediction(adam_kernel, 2, self.kernel_scalars)

    def kernel_scalars(self, columns: Sequence[Any], group: dict[str, Any], alpha: float) -> list[list[float]] | None:
        steps: StepCounts = columns[2]
        if not steps.host_readable:
            return None  # reading accelerator steps would sync: the eager no-sync path instead
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, step = adam_scalars(steps.floats(), beta1, beta2, self.outer_eps(group), alpha)
        n = len(steps)
        return [eps if isinstance(eps, list) else [eps] * n, step if isinstance(step, list) else [step] * n]


def _add_with_device_steps(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    second_moments: list[Tensor],
    steps: StepCounts,
    beta1: float,
    beta2: float,
    eps: float,
    alpha: float,
    chunks: Chunks,
) -> None:
    """Steps that live on the accelerator (capturable or fused Adam): bias corrections as tensors, no sync."""
    bc1 = one_minus_powers(beta1, steps.tensors)
    sqrt_bc2 = one_minus_powers(beta2, steps.tensors)
    torch._foreach_sqrt_(sqrt_bc2)
    torch._foreach_div_(bc1, alpha)  # bc1 / alpha: the divisor that turns m / denom into alpha * m_hat / denom
    add_adam_direction_(
        params, exp_avgs, second_moments, sqrt_bias_correction2=sqrt_bc2, eps=eps, divisors=bc1, chunks=chunks
    )
