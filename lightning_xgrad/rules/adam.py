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

from .._internal.adam_direction import add_adam_direction_
from .._internal.scalars import on_accelerator, step_counts_as_floats, uniform
from .base import PredictionRule
from .compiled import CompiledPrediction, adam_kernel


class AdamRule(PredictionRule):
    """Adam, AdamW (also with ``amsgrad``, ``maximize``, ``foreach``, ``fused`` and ``capturable``)."""

    name = "adam"

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "step" not in state:
            return None
        second_moment = state.get("max_exp_avg_sq", state["exp_avg_sq"])
        return state["exp_avg"], second_moment, state["step"]

    def outer_eps(self, group: dict[str, Any]) -> float:
        """The eps added to the square root in the denominator (Adam's ``eps``)."""
        return float(group["eps"])

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[list[Any]], group: dict[str, Any], alpha: float
    ) -> None:
        exp_avgs, second_moments, step_counts = columns
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = self.outer_eps(group)
        if on_accelerator(step_counts):
            self._add_with_device_steps(params, exp_avgs, second_moments, step_counts, beta1, beta2, eps, alpha)
            return
        eps_folded, step_size = self._scalars(step_counts, beta1, beta2, eps, alpha)
        add_adam_direction_(params, exp_avgs, second_moments, step_size, eps=eps_folded)

    @staticmethod
    def _scalars(
        step_counts: Sequence[Any], beta1: float, beta2: float, eps: float, alpha: float
    ) -> tuple[float | list[float], float | list[float]]:
        """Per-tensor ``(eps', step')`` such that ``alpha * m_hat / (sqrt(v_hat) + eps) == step' * m / (sqrt(v) +
        eps')``: the bias corrections ride on scalars, which saves a pass over v. Single floats when every tensor is
        at the same step (the usual case), so foreach ops take their cheaper scalar overloads."""
        ks = step_counts_as_floats(step_counts)
        if isinstance(k := uniform(ks), float):
            sqrt_bc2 = math.sqrt(1.0 - beta2**k)
            return eps * sqrt_bc2, alpha * sqrt_bc2 / (1.0 - beta1**k)
        sqrt_bc2s = [math.sqrt(1.0 - beta2**k) for k in ks]
        return [eps * c for c in sqrt_bc2s], [alpha * c / (1.0 - beta1**k) for c, k in zip(sqrt_bc2s, ks, strict=True)]

    def compiled_prediction(self) -> CompiledPrediction | None:
        if type(self).add_direction_ is not AdamRule.add_direction_:  # a subclass with its own direction
            return None
        return CompiledPrediction(adam_kernel, 2, self._kernel_scalars)

    def _kernel_scalars(
        self, columns: Sequence[list[Any]], group: dict[str, Any], alpha: float
    ) -> list[list[float]] | None:
        step_counts = columns[2]
        if on_accelerator(step_counts):
            return None  # reading accelerator steps would sync: the eager no-sync path instead
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, step = self._scalars(step_counts, beta1, beta2, self.outer_eps(group), alpha)
        n = len(step_counts)
        return [eps if isinstance(eps, list) else [eps] * n, step if isinstance(step, list) else [step] * n]

    @staticmethod
    def _add_with_device_steps(
        params: list[Tensor],
        exp_avgs: list[Tensor],
        second_moments: list[Tensor],
        step_counts: list[Tensor],
        beta1: float,
        beta2: float,
        eps: float,
        alpha: float,
    ) -> None:
        """Steps that live on the accelerator (capturable or fused Adam): bias corrections as tensors, no sync."""
        bc1 = torch._foreach_pow(beta1, step_counts)
        torch._foreach_neg_(bc1)
        torch._foreach_add_(bc1, 1.0)
        sqrt_bc2 = torch._foreach_pow(beta2, step_counts)
        torch._foreach_neg_(sqrt_bc2)
        torch._foreach_add_(sqrt_bc2, 1.0)
        torch._foreach_sqrt_(sqrt_bc2)
        torch._foreach_div_(bc1, alpha)  # bc1 / alpha: the divisor that turns m / denom into alpha * m_hat / denom
        add_adam_direction_(
            params, exp_avgs, second_moments, sqrt_bias_correction2=list(sqrt_bc2), eps=eps, divisors=list(bc1)
        )
