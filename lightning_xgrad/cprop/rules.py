"""Rules for CPropSGD and CPropAdam (``lightning_xgrad.cprop.optim``): their direction times the last step's scale.

Both optimizers keep the elementwise CProp scale of their last step as ``cprop_scale``, so dW is the base optimizer's
direction multiplied by it: ``cprop_scale * momentum_buffer`` for CPropSGD (momentum, not Nesterov) and
``cprop_scale * m_hat / (sqrt(v_hat) + eps)`` for CPropAdam (``max_exp_avg_sq`` with amsgrad; decoupled weight decay
left out, as for AdamW). Other CPropSGD groups (no momentum, Nesterov) get the trajectory rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._internal.adam_direction import add_adam_direction_, bias_corrected_step_sizes, sqrt_bias_corrections2
from .._internal.chunks import Chunks
from ..rules.adam import AdamRule
from ..rules.compiled import CompiledPrediction
from ..rules.momentum import SGDRule


class CPropSGDRule(SGDRule):
    """CPropSGD with momentum and without Nesterov: dW = ``cprop_scale * momentum_buffer``."""

    name = "cprop_sgd"

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "momentum_buffer" not in state or "cprop_scale" not in state:
            return None
        return state["momentum_buffer"], state["cprop_scale"]

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        buffers, scales = columns
        torch._foreach_addcmul_(params, buffers, scales, value=alpha)  # in place, no temporaries: one call

    def compiled_prediction(self) -> CompiledPrediction | None:
        return None  # the momentum kernel knows no scale


class CPropAdamRule(AdamRule):
    """CPropAdam (L2 or decoupled weight decay, amsgrad): dW = ``cprop_scale * m_hat / (sqrt(v_hat) + eps)``."""

    name = "cprop_adam"

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        adam = super().state_tensors(state)
        if adam is None or "cprop_scale" not in state:
            return None
        return (*adam, state["cprop_scale"])

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        exp_avgs, second_moments, steps, scales = columns
        beta1, beta2 = (float(b) for b in group["betas"])
        ks = steps.floats()  # CPropAdam keeps its step counts on the CPU
        add_adam_direction_(
            params,
            exp_avgs,
            second_moments,
            bias_corrected_step_sizes(alpha, beta1, ks),
            sqrt_bias_correction2=sqrt_bias_corrections2(beta2, ks),
            eps=self.outer_eps(group),
            scales=scales,
            chunks=chunks,
        )

    def compiled_prediction(self) -> CompiledPrediction | None:
        return None  # the Adam kernel knows no scale
