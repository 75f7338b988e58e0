"""CProp's gradient-conformity statistics and scale, as multi-tensor (``torch._foreach_*``) functions. Pure torch.

CProp (Preechakul and Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past Gradient Conformity", 2019,
arXiv 1912.11493, official code github.com/phizaz/cprop) shrinks each element's update when its recent gradients
disagree in sign. Per element, at the t-th gradient g (the official ``cprop_lib.py``, step for step)::

    m      = beta * m + (1 - beta) * g            v = beta * v + (1 - beta) * g^2     (updated first, then t += 1)
    m_hat  = m / (1 - beta^t)                     v_hat = v / (1 - beta^t)
    n      = (1 - beta^t) / (1 - beta)                                                (the effective sample count)
    se     = sqrt(max(v_hat - m_hat^2, 0) / (n - 1 + eps)) + eps                      (standard error of m_hat)
    scale  = min(1, c * |2 * Phi(-m_hat / se) - 1|)

Phi is the normal CDF (``cdf="normal"``) or Bowling et al.'s logistic fit ``1 / (1 + exp(-(0.07056 z^3 +
1.5976 z)))`` (``cdf="bft"``, the official default). |2 Phi(-z) - 1| equals ``erf(|z| / sqrt 2)`` for the normal
CDF and ``tanh(|0.07056 z^3 + 1.5976 z| / 2)`` for the fit; those forms are computed here: the same values (to
float rounding) with no overflow of exp and no cancellation near z = 0.

At t = 1 the variance is 0 in exact arithmetic but ``n - 1 + eps = eps``, so the float rounding of
``v_hat - m_hat^2`` (a few ulps of g^2, nonzero for about a third of the elements in float32) divided by eps sets
the first step's scale. The official code behaves the same way; the operations below are the official ones, in its
order, so the result is reproducible and equals a per-tensor implementation of the formulas bit for bit there.

The functions take lists of tensors that share a device and dtype (the optimizers' and the callback's buckets) and
work in place; temporaries are at most two tensors per chunk of the lists, never one per parameter of the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ._validation import check_choice, check_real
from .rules._foreach import chunk_slices

__all__ = [
    "CDF_CHOICES",
    "ConformityCDF",
    "check_conformity_args",
    "conformity_scale_",
    "scale_applied_update_",
    "scale_from_z",
    "update_mean_",
    "update_square_mean_",
    "update_statistics_",
]

ConformityCDF = Literal["normal", "bft"]
CDF_CHOICES: tuple[str, ...] = ("normal", "bft")
#: Bowling et al. (2009), "A Logistic Approximation to the Cumulative Normal Distribution": Phi(z) ~ 1/(1+exp(-u)),
#: u = BFT_CUBIC * z^3 + BFT_LINEAR * z (max abs error 1.4e-4)
BFT_CUBIC = 0.07056
BFT_LINEAR = 1.5976


def check_conformity_args(owner: str, beta: Any, c: Any, eps: Any, cdf: Any, prefix: str = "") -> None:
    """Refuse bad CProp settings in the package's one format (``prefix`` as in ``cprop_beta``): a TypeError for a
    wrong type, a ValueError for a wrong value, naming the argument, the value and what is allowed."""
    check_real(owner, f"{prefix}beta", beta, low=0.0, high=1.0, high_open=True)
    check_real(owner, f"{prefix}c", c, low=0.0)
    check_real(owner, f"{prefix}eps", eps, low=0.0)
    check_choice(owner, f"{prefix}cdf", cdf, CDF_CHOICES)


@torch.no_grad()
def update_mean_(exp_avgs: list[Tensor], grads: list[Tensor], beta: float) -> None:
    """``m = beta * m + (1 - beta) * g`` in place, with the official code's operations (``mul_`` then ``add_``)."""
    if grads:
        torch._foreach_mul_(exp_avgs, beta)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta)


@torch.no_grad()
def update_square_mean_(exp_avg_sqs: list[Tensor], grads: list[Tensor], beta: float) -> None:
    """``v = beta * v + (1 - beta) * g^2`` in place, with the official code's operations (``mul_`` then
    ``addcmul_``)."""
    if grads:
        torch._foreach_mul_(exp_avg_sqs, beta)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta)


def update_statistics_(exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor], beta: float) -> None:
    """Fold one gradient per tensor into both moving averages (the caller then counts it: t += 1)."""
    update_mean_(exp_avgs, grads, beta)
    update_square_mean_(exp_avg_sqs, grads, beta)


@torch.no_grad()
def conformity_scale_(
    scales: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[float],
    beta: float,
    c: float,
    eps: float,
    cdf: ConformityCDF,
) -> None:
    """Write CProp's scale into ``scales`` from the (uncorrected) moments and each tensor's gradient count ``steps``.

    ``steps[i]`` is t for tensor i, counting the gradient just folded into the moments (t >= 1). The scale tensors
    double as the workspace for the standard error, so the temporaries are m_hat and m_hat^2 for one chunk.
    """
    if not scales:
        return
    corrections = [1.0 - beta**t for t in steps]
    dofs = [bc / (1.0 - beta) - 1.0 + eps for bc in corrections]  # n - 1 + eps, n = (1 - beta^t) / (1 - beta)
    for part in chunk_slices(scales):
        out, bcs = scales[part], corrections[part]
        m_hat = torch._foreach_div(exp_avgs[part], bcs)
        torch._foreach_copy_(out, exp_avg_sqs[part])
        torch._foreach_div_(out, bcs)  # v_hat
        torch._foreach_sub_(out, torch._foreach_mul(m_hat, m_hat))  # v_hat - m_hat^2, with the official roundings
        torch._foreach_clamp_min_(out, 0.0)
        torch._foreach_div_(out, dofs[part])
        torch._foreach_sqrt_(out)
        torch._foreach_add_(out, eps)  # se
        torch._foreach_div_(m_hat, out)  # z = m_hat / se
        _scale_from_z_(out, m_hat, c, cdf)


def _scale_from_z_(out: list[Tensor], z: list[Tensor], c: float, cdf: ConformityCDF) -> None:
    """``out = min(1, c * |2 Phi(-z) - 1|)``; ``z`` is consumed (overwritten)."""
    if cdf == "bft":
        # |2 / (1 + exp(u)) - 1| = tanh(|u| / 2), u = 0.07056 z^3 + 1.5976 z
        torch._foreach_copy_(out, z)
        torch._foreach_mul_(out, z)
        torch._foreach_mul_(out, BFT_CUBIC)
        torch._foreach_add_(out, BFT_LINEAR)
        torch._foreach_mul_(out, z)
        torch._foreach_mul_(out, 0.5)
        torch._foreach_tanh_(out)
    elif cdf == "normal":
        # |2 Phi(-z) - 1| = |erf(z / sqrt 2)|
        torch._foreach_mul_(z, 1.0 / math.sqrt(2.0))
        torch._foreach_erf_(z)
        torch._foreach_copy_(out, z)
    else:
        raise ValueError(f"conformity scale: `cdf` must be one of {CDF_CHOICES}, got {cdf!r}")
    torch._foreach_abs_(out)
    if c != 1.0:
        torch._foreach_mul_(out, c)
    torch._foreach_clamp_max_(out, 1.0)


@torch.no_grad()
def scale_from_z(z: Tensor, c: float = 1.0, cdf: ConformityCDF = "bft") -> Tensor:
    """``min(1, c * |2 Phi(-z) - 1|)`` for a tensor of z = m_hat / se: the last stage of :func:`conformity_scale_`."""
    out = torch.empty_like(z)
    _scale_from_z_([out], [z.clone()], c, cdf)
    return out


@torch.no_grad()
def scale_applied_update_(params: list[Tensor], befores: list[Tensor], scales: list[Tensor]) -> None:
    """``W = W_before + scale * (W - W_before)`` in place: the update an optimizer just applied, scaled elementwise
    (the official ``CProp`` wrapper's ``before + (after - before) * scale``)."""
    if not params:
        return
    torch._foreach_sub_(params, befores)
    torch._foreach_mul_(params, scales)
    torch._foreach_add_(params, befores)
