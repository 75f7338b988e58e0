"""Rule for torch's RAdam: the rectified Adam direction, or the bias-corrected momentum before rectification.

With k the step count, rho_inf = 2 / (1 - b2) - 1 and rho_k = rho_inf - 2 k b2^k / (1 - b2^k), torch's RAdam applies
``p -= lr * dW`` with

- rho_k > 5: ``dW = m_hat * r_k * sqrt(1 - b2^k) / (sqrt(v) + eps)``,
  ``r_k = sqrt((rho_k - 4)(rho_k - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_k))``;
- otherwise: ``dW = m_hat`` (momentum SGD while the variance estimate is unreliable),

where ``m_hat = m / (1 - b1^k)``. Decoupled weight decay is left out of dW; L2 decay is already inside m and v.
Step counts kept on an accelerator (capturable RAdam) are not read on the host: both forms are then computed there,
per tensor, as ``m * (A / (sqrt(v) + eps) + B)`` with one of A and B zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._internal.adam_direction import add_adam_direction_
from .._internal.chunks import chunk_bytes_of, chunk_slices
from .._internal.scalars import on_accelerator, step_counts_as_floats
from .base import PredictionRule


def _rectification(k: float, beta2: float) -> float | None:
    """r_k, or ``None`` while rho_k <= 5 (RAdam then applies the bias-corrected momentum alone)."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_k = rho_inf - 2.0 * k * beta2**k / (1.0 - beta2**k)
    if rho_k <= 5.0:
        return None
    return math.sqrt((rho_k - 4) * (rho_k - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_k))


class RAdamRule(PredictionRule):
    """torch.optim.RAdam (also capturable, with ``step`` on the accelerator: no host read)."""

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
        if on_accelerator(step_counts):
            _add_with_device_steps(params, exp_avgs, exp_avg_sqs, step_counts, beta1, beta2, eps, alpha)
            return
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
        chunk_bytes = chunk_bytes_of(params)
        if plain:
            targets, moments = _pick(plain, params, exp_avgs)
            for part in chunk_slices(targets, chunk_bytes):
                torch._foreach_add_(targets[part], torch._foreach_mul(moments[part], plain_sizes[part]))
        if rectified:
            targets, moments, second = _pick(rectified, params, exp_avgs, exp_avg_sqs)
            add_adam_direction_(targets, moments, second, rectified_sizes, eps=eps, chunk_bytes=chunk_bytes)


def _pick(indices: list[int], *columns: list[Any]) -> list[list[Any]]:
    """The entries at ``indices`` of each column; the columns themselves when that is all of them (the usual case:
    every tensor of a bucket is at the same step), so that planned lists keep their chunks."""
    if len(indices) == len(columns[0]):
        return list(columns)
    return [[column[i] for i in indices] for column in columns]


def _add_with_device_steps(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step_counts: list[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    alpha: float,
) -> None:
    """Step counts on the accelerator: ``p += m * (A / (sqrt(v) + eps) + B)`` per tensor, with
    ``A = alpha * r_k * sqrt(1 - b2^k) / (1 - b1^k)`` and ``B = 0`` where rho_k > 5, else ``A = 0`` and
    ``B = alpha / (1 - b1^k)``; the scalars computed on the device for all tensors at once (a few ops on one vector)."""
    if alpha == 0 or not params:
        return
    k = torch.stack(list(step_counts))
    bc1 = 1.0 - torch.pow(beta1, k)
    beta2_k = torch.pow(beta2, k)
    bc2 = 1.0 - beta2_k
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho = rho_inf - 2.0 * k * beta2_k / bc2
    rectify = rho > 5.0
    ratio = (rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho)
    r = torch.where(rectify, ratio, torch.ones_like(ratio)).sqrt()  # r_k where it is defined
    step_size = alpha / bc1
    adaptive = torch.where(rectify, step_size * r * bc2.sqrt(), torch.zeros_like(r)).unbind()
    momentum = torch.where(rectify, torch.zeros_like(r), step_size).unbind()
    for part in chunk_slices(params):
        factor = torch._foreach_sqrt(exp_avg_sqs[part])
        torch._foreach_add_(factor, eps)
        torch._foreach_reciprocal_(factor)
        torch._foreach_mul_(factor, adaptive[part])
        torch._foreach_add_(factor, momentum[part])
        torch._foreach_addcmul_(params[part], exp_avgs[part], factor)
        del factor  # one chunk of temporaries alive at a time
