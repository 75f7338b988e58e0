"""Adam's update direction, ``m / (sqrt(v) + eps)`` with its bias corrections, as one chunked multi-tensor kernel.

The rules read it to predict (``alpha * dW`` with ``alpha = -steps * lr``) and the optimizers apply it (``-lr * dW``):
Adam, AdaM3, AdaBelief, RAdam (rectified), CProp's Adam form and the adaptive heavy-ball Adam all end in the same
sqrt -> bias correction -> eps -> addcdiv sequence, and differ only in where their scalars come from. Each caller
computes its scalars; this module runs the elementwise part, one foreach op per stage and chunk, in the order the
callers always used, so their results are unchanged to the last bit. The adaptive heavy-ball Adam's scalars (its
first-moment bias correction is a product of varying momenta, kept as a tensor) are computed here too, since both its
optimizer and its rule need them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._foreach import TensorList, chunk_slices
from ._scalars import step_counts_as_floats

__all__ = ["add_adam_direction_", "add_heavy_ball_adam_direction_"]


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
    chunk_bytes: int | None = None,
) -> None:
    """In place, per tensor i: ``params[i] += step_size[i] * scales[i] * m[i] / denom[i]`` with
    ``denom = (sqrt(v) / sqrt_bias_correction2 + eps) * divisors``.

    Every scalar argument is one number for all tensors or one per tensor (``sqrt_bias_correction2`` may be 0-dim
    tensors on the parameters' device, so that bias corrections of step counts kept there cost no sync);
    ``divisors`` are optional per-tensor 0-dim tensors (a bias correction over the step size, kept on the device);
    ``scales`` optional elementwise factors (CProp's conformity scale). The lists are walked in chunks of at most
    ``max(largest tensor, chunk_bytes)`` bytes (:func:`~lightning_xgrad._foreach.chunk_slices`: by default the
    budget ``params`` was planned with, or the package default), which bounds the temporaries (the denominators).
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
    for part in chunk_slices(params, chunk_bytes):
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


def add_heavy_ball_adam_direction_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    step_counts: Sequence[Tensor],
    products: list[Tensor],
    beta2: float,
    eps: float,
    alpha: float,
) -> None:
    """In place: ``params += alpha * (m / (1 - P)) / (sqrt(v / (1 - beta2**t)) + eps)``, per parameter: the direction
    of ``AdaptiveHeavyBallAdam``, whose optimizer applies it with ``alpha = -lr`` and whose XGrad rule adds it with
    ``alpha = -steps * lr``. The step counts t are read on the host (CPU tensors, as torch's Adam keeps them); the
    momentum products P stay 0-dim tensors on their device.
    """
    if alpha == 0:
        return
    sqrt_bc2 = [(1.0 - beta2**k) ** 0.5 for k in step_counts_as_floats(step_counts)]
    # (1 - P) / alpha, the divisor that turns m / denom into alpha * m_hat / denom: a few foreach ops on the 0-dim
    # products, whatever their number
    divisors: TensorList = torch._foreach_neg(products)
    torch._foreach_add_(divisors, 1.0)
    torch._foreach_div_(divisors, alpha)
    dtype = exp_avg_sqs[0].dtype if exp_avg_sqs else None
    if products and products[0].dtype != dtype:  # in the moments' dtype
        if len({p.device for p in products}) == 1:  # in three calls
            divisors = torch.stack(divisors).to(dtype).unbind()
        else:
            divisors = [d.to(dtype) for d in divisors]
    add_adam_direction_(params, exp_avgs, exp_avg_sqs, sqrt_bias_correction2=sqrt_bc2, eps=eps, divisors=list(divisors))
