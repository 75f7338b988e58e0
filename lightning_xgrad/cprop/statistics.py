"""CProp's gradient-conformity statistics and scale, multi-tensor (``torch._foreach_*``) or one tensor at a time.

CProp (Preechakul and Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past Gradient Conformity", 2019,
arXiv 1912.11493, official code github.com/phizaz/cprop) shrinks each element's update when its recent gradients
disagree in sign. Per element, at the t-th gradient g, the official ``cprop_lib.py`` computes::

    m      = beta * m + (1 - beta) * g            v = beta * v + (1 - beta) * g^2     (updated first, then t += 1)
    m_hat  = m / (1 - beta^t)                     v_hat = v / (1 - beta^t)
    n      = (1 - beta^t) / (1 - beta)                                                (the effective sample count)
    se     = sqrt(max(v_hat - m_hat^2, 0) / (n - 1 + eps)) + eps                      (standard error of m_hat)
    scale  = min(1, c * |2 * Phi(-m_hat / se) - 1|)

Phi is the normal CDF (``cdf="normal"``) or Bowling et al.'s logistic fit ``1 / (1 + exp(-(0.07056 z^3 +
1.5976 z)))`` (``cdf="bft"``, the official default). |2 Phi(-z) - 1| equals ``erf(|z| / sqrt 2)`` for the normal
CDF and ``tanh(|0.07056 z^3 + 1.5976 z| / 2)`` for the fit; those forms are computed here: the same values (to
float rounding) with no overflow of exp and no cancellation near z = 0.

**Deviation from the official code: the variance.** ``v_hat - m_hat^2`` is the bias-corrected, exponentially
weighted variance of the gradients, but computed as that difference of two nearly equal numbers it is mostly
rounding once the spread is small against the mean. At t = 1 it is 0 in exact arithmetic while ``n - 1 + eps =
eps``, so its float32 rounding (a few ulps of g^2, nonzero for about a third of the elements, different for each
kernel and device) divided by 1e-8 sets the first step's scale anywhere in [0, 1]. Here the variance is kept
directly, as an exponential moving average of squared deviations from the running mean (the weighted form of
Welford's update, West 1979)::

    delta   = g - m_hat_{t-1}                  (m_hat_0 = 0: delta = g at t = 1)
    m       = beta * m + (1 - beta) * g        (the official mean, unchanged)
    exp_var = beta * exp_var + (1 - beta) * r_t * delta^2,     r_t = beta * (1 - beta^(t-1)) / (1 - beta^t)
    var     = exp_var / (1 - beta^t)           (= v_hat - m_hat^2 in exact arithmetic, for every t)
    se      = sqrt(var / (n - 1 + eps)) + eps

Why it is the same number: with weights w_i = (1 - beta) beta^(t-i), which sum to W_t = 1 - beta^t, m_hat is the
weighted mean and ``v_hat - m_hat^2 = sum_i w_i (g_i - m_hat)^2 / W_t``. Call the sum ``exp_var`` (it is
bias-corrected by W_t, as m is). Adding g_t scales the old weights by beta (total beta W_{t-1}) and adds weight
1 - beta; merging the two groups adds ``beta W_{t-1} (1 - beta) / W_t * (g_t - m_hat_{t-1})^2`` to their summed
squares, which is the update above. r_t tends to beta, so later steps are ``exp_var = beta exp_var + beta (1 - beta)
delta^2``; at t = 1, ``W_0 = 0`` makes r_1 = 0, so the variance is exactly 0 and se exactly eps, as in exact
arithmetic: the first scale is ``min(1, c * |2 Phi(-m_hat / eps) - 1|)``, 1 for any gradient far above eps. No
step subtracts two squares: the relative error of the variance is of order ulp * |g| / sigma rather than
ulp * g^2 / sigma^2 (sigma the gradients' spread), so the float32 result tracks the official formula evaluated in
float64: within 2e-6 of how far 20 steps moved the weights in the tests, where the official float32 arithmetic ends
5e-3 to 0.3 of it away.

The moving average m is the official one, so ``CPropAdam`` still shares Adam's ``exp_avg`` where the decays agree;
``exp_var`` replaces v (Adam's ``exp_avg_sq`` cannot double as a CProp statistic).

The functions take lists of tensors that share a device and dtype (the optimizers' and the callback's buckets) and work
in place. Given the ``chunks`` of the lists (:class:`~lightning_xgrad._internal.chunks.Chunks`), they run
``torch._foreach_*`` kernels chunk by chunk, with one temporary per tensor of a chunk; given ``None``, one tensor at a
time (the optimizers' single-tensor path)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .._internal.chunks import Chunks, TensorList
from .._internal.scalars import uniform
from .._internal.validation import argument_error, check_choice, check_real

__all__ = [
    "CDF_CHOICES",
    "ConformityCDF",
    "check_conformity_args",
    "conformity_scale_",
    "scale_applied_update_",
    "scale_from_z",
    "update_mean_",
    "update_statistics_",
    "update_variance_",
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
    check_real(owner, f"{prefix}eps", eps, low=0.0, low_open=True)  # eps = 0: se = 0 and z = 0/0 where g = 0
    check_choice(owner, f"{prefix}cdf", cdf, CDF_CHOICES)


@torch.no_grad()
def update_mean_(exp_avgs: list[Tensor], grads: TensorList, beta: float, *, foreach: bool) -> None:
    """``m = beta * m + (1 - beta) * g`` in place, with the official code's operations (``mul_`` then ``add_``)."""
    if foreach:
        if grads:
            torch._foreach_mul_(exp_avgs, beta)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta)
        return
    for exp_avg, grad in zip(exp_avgs, grads, strict=True):
        exp_avg.mul_(beta).add_(grad, alpha=1.0 - beta)


def _variance_coefficients(step_counts: Sequence[float], beta: float) -> tuple[list[float], list[float]]:
    """Per tensor, for its t-th gradient: ``-1 / (1 - beta^(t-1))`` (0 at t = 1: m_hat_0 = 0), which turns m into
    -m_hat_{t-1}, and the weight ``(1 - beta) * r_t`` of delta^2, exactly 0 at t = 1."""
    mean_factors, weights = [], []
    for t in step_counts:
        previous = 1.0 - beta ** (t - 1.0)  # W_{t-1}: exactly 0 at t = 1
        mean_factors.append(-1.0 / previous if previous > 0.0 else 0.0)
        weights.append((1.0 - beta) * beta * previous / (1.0 - beta**t))
    return mean_factors, weights


@torch.no_grad()
def update_variance_(
    exp_vars: list[Tensor],
    exp_avgs: list[Tensor],
    grads: TensorList,
    step_counts: Sequence[float],
    beta: float,
    *,
    chunks: Chunks | None,
) -> None:
    """Fold g into the variance: ``exp_var = beta * exp_var + (1 - beta) * r_t * (g - m_hat_{t-1})^2`` in place.

    Call it *before* the mean is updated (it reads m_hat_{t-1} from ``exp_avgs``); ``step_counts[i]`` is t for tensor i,
    counting this gradient (t >= 1). Temporaries: delta for one chunk of ``chunks`` (those of the lists), or for one
    tensor with ``chunks=None``.
    """
    if not grads:
        return
    mean_factors, weights = _variance_coefficients(step_counts, beta)
    if chunks is None:
        columns = zip(exp_vars, exp_avgs, grads, mean_factors, weights, strict=True)
        for exp_var, exp_avg, grad, factor, weight in columns:
            delta = grad.add(exp_avg, alpha=factor)
            exp_var.mul_(beta).addcmul_(delta, delta, value=weight)
        return
    torch._foreach_mul_(exp_vars, beta)
    for part in chunks:
        mean_factor = uniform(mean_factors[part])
        if isinstance(mean_factor, float):
            deltas = torch._foreach_add(grads[part], exp_avgs[part], alpha=mean_factor)
        else:
            deltas = torch._foreach_mul(exp_avgs[part], mean_factor)
            torch._foreach_add_(deltas, grads[part])
        torch._foreach_addcmul_(exp_vars[part], deltas, deltas, uniform(weights[part]))
        del deltas  # one chunk of temporaries alive at a time


def update_statistics_(
    exp_avgs: list[Tensor],
    exp_vars: list[Tensor],
    grads: list[Tensor],
    step_counts: Sequence[float],
    beta: float,
    *,
    chunks: Chunks | None,
) -> None:
    """Fold one gradient per tensor into the mean and the variance; ``step_counts[i]`` is t for tensor i, counting this
    gradient (the caller counts it first: t += 1, then this). ``chunks``: as for :func:`update_variance_`."""
    update_variance_(exp_vars, exp_avgs, grads, step_counts, beta, chunks=chunks)
    update_mean_(exp_avgs, grads, beta, foreach=chunks is not None)


def _scale_coefficients(step_counts: Sequence[float], beta: float, eps: float) -> tuple[list[float], list[float]]:
    """Per tensor: the bias correction ``1 - beta^t`` and the factor ``1 / ((1 - beta^t) (n - 1 + eps))`` that turns
    exp_var into (se - eps)^2 (0 where n - 1 + eps is 0, i.e. t = 1 with eps = 0: exp_var is exactly 0 there)."""
    corrections = [1.0 - beta**t for t in step_counts]
    factors = []
    for bc in corrections:
        dof = bc / (1.0 - beta) - 1.0 + eps  # n - 1 + eps, n = (1 - beta^t) / (1 - beta)
        factors.append(1.0 / (bc * dof) if dof > 0.0 else 0.0)
    return corrections, factors


@torch.no_grad()
def conformity_scale_(
    scales: list[Tensor],
    exp_avgs: list[Tensor],
    exp_vars: list[Tensor],
    step_counts: Sequence[float],
    beta: float,
    c: float,
    eps: float,
    cdf: ConformityCDF,
    *,
    chunks: Chunks | None,
) -> None:
    """Write CProp's scale into ``scales`` from the statistics and each tensor's gradient count ``step_counts`` (t >= 1,
    counting the gradient just folded in). The scale tensors double as the workspace for the standard error, so
    the only temporary is m_hat for one chunk of ``chunks`` (those of the lists), or for one tensor with
    ``chunks=None``."""
    if not scales:
        return
    corrections, factors = _scale_coefficients(step_counts, beta, eps)
    if chunks is None:
        for out, exp_avg, exp_var, bc, factor in zip(scales, exp_avgs, exp_vars, corrections, factors, strict=True):
            z = exp_avg.div(bc)  # m_hat
            torch.mul(exp_var, factor, out=out).sqrt_().add_(eps)  # se
            _tensor_scale_from_z_(out, z.div_(out), c, cdf)
        return
    for part in chunks:
        outs = scales[part]
        zs = torch._foreach_div(exp_avgs[part], uniform(corrections[part]))  # m_hat
        torch._foreach_copy_(outs, exp_vars[part])
        torch._foreach_mul_(outs, uniform(factors[part]))  # se^2 = var / (n - 1 + eps)
        torch._foreach_sqrt_(outs)
        torch._foreach_add_(outs, eps)  # se
        torch._foreach_div_(zs, outs)  # z = m_hat / se
        _scale_from_z_(outs, zs, c, cdf)
        del zs  # one chunk of temporaries alive at a time


def _scale_from_z_(out: TensorList, z: TensorList, c: float, cdf: ConformityCDF) -> None:
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
        raise argument_error("conformity scale", "cdf", f"one of {CDF_CHOICES}", cdf)
    torch._foreach_abs_(out)
    if c != 1.0:
        torch._foreach_mul_(out, c)
    torch._foreach_clamp_max_(out, 1.0)


def _tensor_scale_from_z_(out: Tensor, z: Tensor, c: float, cdf: ConformityCDF) -> None:
    """:func:`_scale_from_z_` for one tensor, with the same operations in the same order (``z`` is only read)."""
    if cdf == "bft":
        torch.mul(z, z, out=out).mul_(BFT_CUBIC).add_(BFT_LINEAR).mul_(z).mul_(0.5).tanh_()
    elif cdf == "normal":
        torch.mul(z, 1.0 / math.sqrt(2.0), out=out).erf_()
    else:
        raise argument_error("conformity scale", "cdf", f"one of {CDF_CHOICES}", cdf)
    out.abs_()
    if c != 1.0:
        out.mul_(c)
    out.clamp_max_(1.0)


@torch.no_grad()
def scale_from_z(z: Tensor, c: float = 1.0, cdf: ConformityCDF = "bft") -> Tensor:
    """``min(1, c * |2 Phi(-z) - 1|)`` for a tensor of z = m_hat / se: the last stage of :func:`conformity_scale_`."""
    out = torch.empty_like(z)
    _tensor_scale_from_z_(out, z, c, cdf)
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
