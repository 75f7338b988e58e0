"""Adam's update direction, ``m / (sqrt(v) + eps)`` with its bias corrections, as one chunked multi-tensor kernel.

The rules read it to predict (``alpha * dW`` with ``alpha = -steps * lr``) and the optimizers apply it (``-lr * dW``):
Adam, AdaM3, AdaBelief, RAdam (rectified), CProp's Adam form and the adaptive heavy-ball Adam all end in the same
sqrt -> bias correction -> eps -> addcdiv sequence, and differ only in where their scalars come from. Each caller
computes its scalars; this module runs the elementwise part, one foreach op per stage and chunk, always in the same
order, so an optimizer and the rule that predicts it compute dW with the same rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .chunks import Chunks

__all__ = ["add_adam_direction_", "bias_corrected_step_sizes", "sqrt_bias_corrections2"]


def bias_corrected_step_sizes(scale: float, beta1: float, steps: Sequence[float]) -> list[float]:
    """``scale / (1 - beta1**k)`` at every step count k: the step size that bias-corrects the first moment."""
    return [scale / (1.0 - beta1**k) for k in steps]


def sqrt_bias_corrections2(beta2: float, steps: Sequence[float]) -> list[float]:
    """``sqrt(1 - beta2**k)`` at every step count k: the bias correction of the second moment's square root."""
    return [math.sqrt(1.0 - beta2**k) for k in steps]


def add_adam_direction_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    second_moments: list[Tensor],
    step_size: float | list[float] = 1.0,
    *,
    sqrt_bias_correction2: float | list[float] | list[Tensor] = 1.0,
    eps: float | list[float] = 0.0,
    divisors: list[Tensor] | None = None,
    scales: list[Tensor] | None = None,
    chunks: Chunks,
) -> None:
    """In place, per tensor i: ``params[i] += step_size[i] * scales[i] * m[i] / denom[i]`` with
    ``denom = (sqrt(v) / sqrt_bias_correction2 + eps) * divisors``.

    Every scalar argument is one number for all tensors or one per tensor (``sqrt_bias_correction2`` may be 0-dim
    tensors on the parameters' device, so that bias corrections of step counts kept there cost no sync);
    ``divisors`` are optional per-tensor 0-dim tensors (a bias correction over the step size, kept on the device);
    ``scales`` optional elementwise factors (CProp's conformity scale). ``chunks`` are those of ``params``: one chunk of
    temporaries (the denominators) is alive at a time.
    """
    # each choice made once, so that per chunk the Python work stays what the callers' own loops had
    bc_each: list[float] | list[Tensor] | None = None
    bc_all: float | None = None
    if isinstance(sqrt_bias_correction2, list):
        bc_each = sqrt_bias_correction2
    elif sqrt_bias_correction2 != 1.0:
        bc_all = sqrt_bias_correction2
    eps_each: list[float] | None = None
    eps_all: float | None = None
    if isinstance(eps, list):
        eps_each = eps
    elif eps:
        eps_all = eps
    size_each, size_all = (step_size, 1.0) if isinstance(step_size, list) else (None, step_size)
    for part in chunks:
        denom = torch._foreach_sqrt(second_moments[part])
        if bc_each is not None:
            torch._foreach_div_(denom, bc_each[part])
        elif bc_all is not None:
            torch._foreach_div_(denom, bc_all)
        if eps_each is not None:
            torch._foreach_add_(denom, eps_each[part])
        elif eps_all is not None:
            torch._foreach_add_(denom, eps_all)
        if divisors is not None:
            torch._foreach_mul_(denom, divisors[part])
        if scales is not None:
            torch._foreach_reciprocal_(denom)
            torch._foreach_mul_(denom, exp_avgs[part])  # m / denom
            if size_each is not None:
                torch._foreach_addcmul_(params[part], denom, scales[part], size_each[part])
            else:
                torch._foreach_addcmul_(params[part], denom, scales[part], value=size_all)
        elif size_each is not None:
            torch._foreach_addcdiv_(params[part], exp_avgs[part], denom, size_each[part])
        else:
            torch._foreach_addcdiv_(params[part], exp_avgs[part], denom, value=size_all)
        del denom  # before the next chunk allocates: one chunk of temporaries alive at a time
