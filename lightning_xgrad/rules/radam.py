"""Rule for torch's RAdam: the rectified Adam direction, or the bias-corrected momentum before rectification.

With k the step count, rho_inf = 2 / (1 - b2) - 1 and rho_k = rho_inf - 2 k b2^k / (1 - b2^k), torch's RAdam applies
``p -= lr * dW`` with

- rho_k > 5: ``dW = m_hat * r_k * sqrt(1 - b2^k) / (sqrt(v) + eps)``,
  ``r_k = sqrt((rho_k - 4)(rho_k - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_k))``;
- otherwise: ``dW = m_hat`` (momentum SGD while the variance estimate is unreliable),

where ``m_hat = m / (1 - b1^k)``. Decoupled weight decay is left out of dW; L2 decay is already inside m and v.
Step counts kept on an accelerator (capturable RAdam) are not read on the host: both forms are then computed there,
per tensor, as ``m * (A / (sqrt(v) + eps) + B)`` with one of A and B zero. :func:`rectification` is the formula the
AdaBelief rule's rectified form uses too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from .._internal.adam_direction import add_adam_direction_
from .._internal.chunks import Chunks
from .._internal.scalars import StepCounts
from .base import PredictionRule

Number = TypeVar("Number", float, Tensor)


def rectification(k: Number, beta2: float) -> tuple[Number, Number]:
    """``(rho_k, r_k^2)`` of RAdam at step count ``k`` (a float, or a tensor of counts: the same operations):
    ``r_k^2`` is only meaningful where ``rho_k > 4``."""
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_k = beta2**k
    rho = rho_inf - 2.0 * k * beta2_k / (1.0 - beta2_k)
    return rho, (rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho)


class RAdamRule(PredictionRule):
    """torch.optim.RAdam (also capturable, with ``step`` on the accelerator: no host read)."""

    name = "radam"
    step_column = 2

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            return None
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        exp_avgs, exp_avg_sqs, steps = columns
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        if not steps.host_readable:
            _add_with_device_steps(params, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, alpha, chunks)
            return
        rectified: list[int] = []
        rectified_sizes: list[float] = []
        plain: list[int] = []
        plain_sizes: list[float] = []
        for i, k in enumerate(steps.floats()):
            step_size = alpha / (1.0 - beta1**k)
            rho, r_squared = rectification(k, beta2)
            if rho <= 5.0:
                plain.append(i)
                plain_sizes.append(step_size)
            else:
                rectified.append(i)
                rectified_sizes.append(step_size * math.sqrt(r_squared) * math.sqrt(1.0 - beta2**k))
        if plain:
            targets, moments = _pick(plain, params, exp_avgs)
            for part in chunks if targets is params else chunks.of(targets):
                torch._foreach_add_(targets[part], torch._foreach_mul(moments[part], plain_sizes[part]))
        if rectified:
            targets, moments, second = _pick(rectified, params, exp_avgs, exp_avg_sqs)
            add_adam_direction_(
                targets,
                moments,
                second,
                rectified_sizes,
                eps=eps,
                chunks=chunks if targets is params else chunks.of(targets),
            )


def _pick(indices: list[int], *columns: list[Any]) -> list[list[Any]]:
    """The entries at ``indices`` of each column; the columns themselves when that is all of them (the usual case:
    every tensor of a bucket is at the same step), so that the planned chunks still apply."""
    if len(indices) == len(columns[0]):
        return list(columns)
    return [[column[i] for i in indices] for column in columns]


def _add_with_device_steps(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: StepCounts,
    beta1: float,
    beta2: float,
    eps: float,
    alpha: float,
    chunks: Chunks,
) -> None:
    """Step counts on the accelerator: ``p += m * (A / (sqrt(v) + eps) + B)`` per tensor, with
    ``A = alpha * r_k * sqrt(1 - b2^k) / (1 - b1^k)`` and ``B = 0`` where rho_k > 5, else ``A = 0`` and
    ``B = alpha / (1 - b1^k)``; the scalars computed on the device for all tensors at once (a few ops on one vector)."""
    if alpha == 0 or not params:
        return
    k = torch.stack(steps.tensors)
    rho, r_squared = rectification(k, beta2)
    rectify = rho > 5.0
    r = torch.where(rectify, r_squared, torch.ones_like(r_squared)).sqrt()  # r_k where it is defined
    step_size = alpha / (1.0 - torch.pow(beta1, k))
    adaptive = torch.where(rectify, step_size * r * (1.0 - torch.pow(beta2, k)).sqrt(), torch.zeros_like(r)).unbind()
    momentum = torch.where(rectify, torch.zeros_like(r), step_size).unbind()
    for part in chunks:
        factor = torch._foreach_sqrt(exp_avg_sqs[part])
        torch._foreach_add_(factor, eps)
        torch._foreach_reciprocal_(factor)
        torch._foreach_mul_(factor, adaptive[part])
        torch._foreach_add_(factor, momentum[part])
        torch._foreach_addcmul_(params[part], exp_avgs[part], factor)
        del factor  # one chunk of temporaries alive at a time
