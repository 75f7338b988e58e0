r"""Adaptive heavy-ball momentum (Sun, Ling, Shi, Li and Wang, arXiv 2110.09057) for SGD and for Adam.

"Training Deep Neural Networks with Adaptive Momentum Inspired by the Quadratic Optimization" picks the momentum
coefficient at every step from a curvature estimate instead of a tuned constant. For a quadratic with largest
curvature L, heavy ball with step lr converges fastest with ``beta = (1 - sqrt(lr * L))^2``; the method estimates L
from the last two gradients (a secant) and clips the result below 1. No official code is known. What is implemented
is the formula stated exactly below and in :class:`AdaptiveHeavyBallSGD` and :class:`AdaptiveHeavyBallAdam`: the
heavy-ball form and the Adam form it modifies are the ones the paper's introduction starts from; the details of the
paper's estimate of L_k (which gradients, per group or global, any smoothing) are not verified against its equations.

The momentum of step k, per param group (lr is per group, so the curvature is estimated per group)::

    L_k    = ||g_k - g_{k-1}|| / ||x_k - x_{k-1}||          # norms over all the group's parameters together
    beta_k = clip((1 - sqrt(lr * L_k))^2, 0, 1 - delta)

where ``g_k`` is the gradient of step k (``p.grad``: the loss's gradient, weight decay not included) and ``x_k`` the
point where it was taken. Without weight prediction that is the parameters at the step; with XGrad it is the
predicted W_hat, which the predictor reports through :meth:`observe_gradient_point` just before it restores the real
weights, so the secant pairs each gradient with its own point. ``beta = 0`` until two gradients exist (the first
step of each group), and when ``x_k == x_{k-1}`` (lr 0, or nothing moved) L is undefined and the previous beta is
kept. The lower clip at 0 never acts on a finite L (the formula is a square); it is kept as the formula states it.
For ``lr * L > 1`` the formula grows again (the quadratic-optimal momentum for a step that overshoots), and any
``lr * L`` above ``(1 + sqrt(1 - delta))^2`` is clipped at ``1 - delta``.

With mini-batch gradients, ``g_k - g_{k-1}`` holds the batch-to-batch noise as well as the curvature, and since
``||x_k - x_{k-1}|| = lr_{k-1} * ||buf_{k-1}||`` (SGD form, no prediction) ``lr * L_k`` is about
``||g_k - g_{k-1}|| / ||buf_{k-1}||``, which does not shrink with lr: on noisy batches beta stays small (a median of
0.03 over three epochs of the digits example with lr 0.05 or 0.01), close to plain SGD. That follows from the formula
as stated; whether the paper does something about it could not be checked.

Under data parallelism (DDP) every rank holds the same all-reduced gradients and parameters, so each computes the
same beta with no communication. With sharded (DTensor) parameters, FSDP2 or tensor parallelism, each rank sums the
squares of its local shards, replicated elements weighted by one over the ranks holding them, and one
``all_reduce`` per step (both squared norms of every group in one tensor) makes them global. beta stays a tensor on
the parameters' device: computing it needs no device-to-host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .._internal.adam_direction import add_adam_direction_, sqrt_bias_corrections2
from .._internal.chunks import Chunks, TensorList, budget_for, default_chunk_bytes
from .._internal.compat import new_step_count
from .._internal.scalars import as_float
from .._internal.sharding import DTensor, local_tensor, ranks_holding
from .._internal.validation import check_real
from ..optim.base import BaseOptimizer, gradients, increment_step_counts_

__all__ = ["AdaptiveHeavyBallAdam", "AdaptiveHeavyBallSGD", "add_heavy_ball_adam_direction_"]


class _AdaptiveHeavyBall(BaseOptimizer):
    """The secant and the momentum shared by both forms; subclasses apply the update with ``beta_k``.

    State per parameter: ``prev_point`` (the point of the last gradient) and ``prev_grad`` (that gradient). Per
    group: ``group["momentum"]``, the beta of the group's last step (0 before any step, a 0-dim tensor after), for
    logging, e.g. ``float(optimizer.param_groups[0]["momentum"])`` or Lightning's ``LearningRateMonitor(
    log_momentum=True)``. Both survive ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        #: squared distance between this step's gradient point and the last one, per group index (local sums)
        self._pending_distances: dict[int, Tensor | None] = {}
        #: whether this step's gradient point was recorded (by XGrad's predictor) before ``step``
        self._observed = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pending_distances = {}
        self._observed = False

    def _update(self) -> None:
        for group, beta in zip(self.param_groups, self._secant_betas(), strict=True):
            if beta is not None:
                self._apply(group, self._params_with_grad(group), beta)

    def _apply(self, group: dict[str, Any], params: list[Tensor], beta: Tensor) -> None:
        """Update ``params`` (the group's parameters with a gradient) with this step's momentum ``beta``."""
        raise NotImplementedError

    def _against_previous(
        self, params: list[Tensor], values: list[Tensor], name: str
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The parameters whose state already keeps a previous value under ``name``, with their current and previous
        local values; the others get a copy of their current value kept (their first one: nothing to compare)."""
        owners: list[Tensor] = []
        current: list[Tensor] = []
        previous: list[Tensor] = []
        for p, value in zip(params, values, strict=True):
            state = self.state[p]
            if name not in state:
                state[name] = value.detach().clone(memory_format=torch.preserve_format)
            else:
                owners.append(p)
                current.append(local_tensor(value))
                previous.append(local_tensor(state[name]))
        return owners, current, previous

    @torch.no_grad()
    def observe_gradient_point(self, chunk_bytes: int | None = None) -> None:
        """Record the current parameter values as the point where this step's gradients were taken.

        Stores, per group, ``||x_k - x_{k-1}||^2`` against the previously recorded point and makes the current values
        the new previous point. XGrad's predictor calls this while the parameters still hold the predicted W_hat;
        :meth:`step` calls it itself when nobody did. Further calls before the step are ignored: the first one saw
        the point (after a step skipped by AMP's scaler, the next prediction is the same point). The differences
        are formed in chunks of at most ``max(largest tensor, chunk_bytes)`` bytes (``None``: the default of the
        parameters' device; XGrad's predictor passes its own ``chunk_bytes``).
        """
        if self._observed:
            return
        self._observed = True
        for index, group in enumerate(self.param_groups):
            params = self._params_with_grad(group)
            owners, known, previous = self._against_previous(params, params, "prev_point")
            budget = budget_for(chunk_bytes, known)
            self._pending_distances[index] = _sum_of_squared_differences(owners, known, previous, budget)
            if previous:
                torch._foreach_copy_(previous, known)

    def _secant_betas(self) -> list[Tensor | None]:
        """``beta_k`` for every group (``None`` for a group without gradients), keeping ``prev_grad`` up to date."""
        if not self._observed:
            self.observe_gradient_point()
        distances: list[Tensor | None] = []
        differences: list[Tensor | None] = []
        for index, group in enumerate(self.param_groups):
            params = self._params_with_grad(group)
            owners, grads, previous = self._against_previous(params, gradients(params), "prev_grad")
            differences.append(_sum_of_squared_differences(owners, grads, previous, budget_for(None, grads)))
            distances.append(self._pending_distances.get(index))
            if previous:
                torch._foreach_copy_(previous, grads)
        self._pending_distances = {}
        self._observed = False
        _all_reduce_sums(self.param_groups, distances, differences)

        betas: list[Tensor | None] = []
        for group, distance, difference in zip(self.param_groups, distances, differences, strict=True):
            params = self._params_with_grad(group)
            if not params:
                betas.append(None)
                continue
            device = local_tensor(params[0]).device
            before = group.get("momentum", 0.0)  # a number before the first step, then a tensor on the device
            before = before.to(device) if isinstance(before, Tensor) else torch.full((), float(before), device=device)
            if distance is None or difference is None:  # fewer than two gradients: no secant yet
                beta = torch.zeros((), dtype=torch.float32, device=device)
            else:
                curvature = (difference / distance).sqrt()  # 0/0 and x/0 are masked below
                beta = (1.0 - (as_float(group["lr"]) * curvature).sqrt()).square().clamp(0.0, 1.0 - group["delta"])
                beta = torch.where(distance > 0, beta, before.to(beta.dtype))
            group["momentum"] = beta
            betas.append(beta)
        return betas


def _sum_of_squared_differences(
    owners: list[Tensor], values: list[Tensor], previous: list[Tensor], budget: int
) -> Tensor | None:
    """``sum_i ||values[i] - previous[i]||^2`` as a 0-dim tensor (float32 or wider), ``None`` for empty lists; the
    differences one chunk of at most ``max(largest tensor, budget)`` bytes at a time.

    For DTensor parameters (``owners``) the sum is this rank's share of the global one: each local shard's squares
    divided by the number of ranks holding the same elements, so that the all-reduce counts replicated elements once.
    """
    if not values:
        return None
    dtype = torch.float32  # at least: half-precision parameters sum their squares in float32
    for other in {value.dtype for value in values}:  # per dtype, not per tensor: each promotion is an ATen call
        dtype = torch.promote_types(dtype, other)
    norms: list[Tensor] = []
    for part in Chunks(values, budget):  # the differences of one chunk alive at a time
        norms.extend(torch._foreach_norm(torch._foreach_sub(values[part], previous[part]), 2, dtype=dtype))
    device = norms[0].device
    if any(n.device != device for n in norms):  # a group spread over devices
        norms = [n.to(device) for n in norms]
    squares = torch.stack(norms).square()
    if any(isinstance(p, DTensor) for p in owners) and torch.distributed.is_initialized():
        holding = torch.tensor([float(ranks_holding(p)) for p in owners])
        squares = squares / holding.to(device, non_blocking=True)  # a copy to the device, without waiting
    return squares.sum()


def _all_reduce_sums(groups: list[dict[str, Any]], *sums: list[Tensor | None]) -> None:
    """With DTensor parameters, replace the local sums of squares by the global ones, all in one all-reduce.

    Every rank takes part as long as the optimizer holds a DTensor with a gradient (the same on every rank); a
    group without gradients on this rank contributes nothing.
    """
    params = [p for g in groups for p in g["params"] if p.grad is not None]
    if not any(isinstance(p, DTensor) for p in params) or not torch.distributed.is_initialized():
        return
    # which groups have sums is the same on every rank: each holds a shard (maybe empty) of every parameter
    present = [(k, i) for k, values in enumerate(sums) for i, value in enumerate(values) if value is not None]
    if not present:
        return
    device = local_tensor(params[0]).device
    flat = torch.stack([sums[k][i].to(device) for k, i in present])  # type: ignore[union-attr]
    torch.distributed.all_reduce(flat)
    for j, (k, i) in enumerate(present):
        sums[k][i] = flat[j]


class AdaptiveHeavyBallSGD(_AdaptiveHeavyBall):
    r"""SGD with adaptive heavy-ball momentum: ``beta_k`` from the secant curvature (see the module docstring).

    The update, per param group at step k (``buf`` starts at 0, so the first step is plain SGD)::

        g    = p.grad + weight_decay * p                 # L2 weight decay, as torch's SGD (coupled)
        buf  = beta_k * buf + g
        p    = p - lr * buf

    With a constant lr this is exactly the heavy-ball form the paper analyses,
    ``x_{k+1} = x_k - lr * g_k + beta_k * (x_k - x_{k-1})``: ``lr * beta_k * buf_{k-1} = beta_k * (x_{k-1} - x_k)``.
    (With a changing lr the buffer form scales the old velocity by ``lr_k / lr_{k-1}``, as torch's SGD does.)

    The secant uses ``p.grad`` without the weight decay term: with XGrad the gradient is taken at W_hat while the
    decay acts on the real W, so only ``p.grad`` belongs to the recorded point. (The decay adds ``weight_decay`` to
    the curvature, negligible next to a typical L.)

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor (default: 0.01).
        delta: the momentum is clipped at ``1 - delta`` (default: 0.01), ``0 < delta <= 1``.
        weight_decay: L2 penalty coefficient, added to the gradient (default: 0).

    State per parameter: ``momentum_buffer`` (the direction of the last step per unit lr, what
    :class:`lightning_xgrad.heavy_ball.rules.HeavyBallSGDRule` reads for XGrad), ``prev_point``, ``prev_grad``; per
    group ``momentum``, the last ``beta_k``.
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 0.01, delta: float = 0.01, weight_decay: float = 0.0):
        owner = type(self).__name__
        check_real(owner, "lr", lr, low=0.0, allow_tensor=True)
        check_real(owner, "delta", delta, low=0.0, high=1.0, low_open=True)
        check_real(owner, "weight_decay", weight_decay, low=0.0)
        super().__init__(params, dict(lr=lr, delta=float(delta), weight_decay=float(weight_decay)))

    def _apply(self, group: dict[str, Any], params: list[Tensor], beta: Tensor) -> None:
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(local_tensor(state["momentum_buffer"]))
        local_params = [local_tensor(p) for p in params]
        weight_decay = group["weight_decay"]
        torch._foreach_mul_(buffers, beta)
        torch._foreach_add_(buffers, [local_tensor(p.grad) for p in params])
        if weight_decay != 0:
            torch._foreach_add_(buffers, local_params, alpha=weight_decay)
        torch._foreach_add_(local_params, buffers, alpha=-as_float(group["lr"]))


class AdaptiveHeavyBallAdam(_AdaptiveHeavyBall):
    r"""Adam whose first-moment coefficient is the adaptive heavy-ball momentum: ``b1 = beta_k`` at every step.

    The update, per parameter at step t (t counts this parameter's steps from 1; ``m_0 = v_0 = 0``)::

        p     = p * (1 - lr * weight_decay)             # decoupled weight decay, as AdamW
        m     = beta_k * m + (1 - beta_k) * g           # g = p.grad
        v     = beta2 * v + (1 - beta2) * g * g
        P_t   = beta_1 * beta_2 * ... * beta_t          # the product of the momenta used, kept in the state
        p     = p - lr * (m / (1 - P_t)) / (sqrt(v / (1 - beta2**t)) + eps)

    ``1 - P_t`` is the sum of the weights m gives to the gradients, so it is the bias correction of an EMA with
    varying coefficients (``1 - b1**t`` for a constant one). Since ``beta_1 = 0`` (no secant at the first step),
    ``m_1 = g_1`` and ``P_t = 0``: m starts unbiased and the correction is 1; the state keeps ``P_t`` so that the
    update and the XGrad rule stay exact for any sequence of momenta. The lr in ``beta_k``'s formula is the group's
    lr, not Adam's per-coordinate effective step ``lr / (sqrt(v_hat) + eps)``: the paper's Adam variant could not
    be checked on this point.

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor (default: 1e-3).
        beta2: coefficient of the second-moment moving average (default: 0.999), ``0 <= beta2 < 1``.
        eps: added to the denominator, outside the square root, as torch's Adam (default: 1e-8).
        delta: the momentum is clipped at ``1 - delta`` (default: 0.01), ``0 < delta <= 1``.
        weight_decay: decoupled (AdamW) weight decay coefficient (default: 0).

    State per parameter: ``step`` (a CPU float tensor, as torch's Adam), ``exp_avg`` (m), ``exp_avg_sq`` (v),
    ``beta1_product`` (P_t, a 0-dim tensor), ``prev_point`` and ``prev_grad``; per group ``momentum``, the last
    ``beta_k``. :class:`lightning_xgrad.heavy_ball.rules.HeavyBallAdamRule` reads dW from them for XGrad.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        beta2: float = 0.999,
        eps: float = 1e-8,
        delta: float = 0.01,
        weight_decay: float = 0.0,
    ) -> None:
        owner = type(self).__name__
        check_real(owner, "lr", lr, low=0.0, allow_tensor=True)
        check_real(owner, "beta2", beta2, low=0.0, high=1.0, high_open=True)
        check_real(owner, "eps", eps, low=0.0)
        check_real(owner, "delta", delta, low=0.0, high=1.0, low_open=True)
        check_real(owner, "weight_decay", weight_decay, low=0.0)
        defaults = dict(lr=lr, beta2=float(beta2), eps=float(eps), delta=float(delta), weight_decay=float(weight_decay))
        super().__init__(params, defaults)

    def _apply(self, group: dict[str, Any], params: list[Tensor], beta: Tensor) -> None:
        lr, beta2, eps = as_float(group["lr"]), group["beta2"], group["eps"]
        exp_avgs, exp_avg_sqs, step_counts, products = [], [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = new_step_count()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["beta1_product"] = torch.ones((), dtype=torch.float32, device=beta.device)
            exp_avgs.append(local_tensor(state["exp_avg"]))
            exp_avg_sqs.append(local_tensor(state["exp_avg_sq"]))
            step_counts.append(state["step"])
            products.append(state["beta1_product"])
        local_params = [local_tensor(p) for p in params]
        grads = [local_tensor(p.grad) for p in params]
        increment_step_counts_(step_counts)
        torch._foreach_mul_(products, beta.to(products[0].device))
        if group["weight_decay"] != 0:
            torch._foreach_mul_(local_params, 1.0 - lr * group["weight_decay"])
        # the weight stays a 0-dim tensor on the device, one per tensor (the List overload): passed alone it would bind
        # to the Scalar overload, a host read (.item()) of a device value at every step
        weight = (1.0 - beta).to(exp_avgs[0].dtype)
        torch._foreach_lerp_(exp_avgs, grads, [weight] * len(exp_avgs))
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
        steps = [float(k) for k in step_counts]
        chunks = Chunks(local_params, default_chunk_bytes(local_params[0].device))
        add_heavy_ball_adam_direction_(local_params, exp_avgs, exp_avg_sqs, steps, products, beta2, eps, -lr, chunks)


def add_heavy_ball_adam_direction_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[float],
    products: list[Tensor],
    beta2: float,
    eps: float,
    alpha: float,
    chunks: Chunks,
) -> None:
    """In place: ``params += alpha * (m / (1 - P)) / (sqrt(v / (1 - beta2**t)) + eps)``, per parameter: the direction
    of ``AdaptiveHeavyBallAdam``, whose optimizer applies it with ``alpha = -lr`` and whose XGrad rule adds it with
    ``alpha = -steps * lr``. The step counts t are floats (read on the host: CPU tensors, as torch's Adam keeps them);
    the momentum products P stay 0-dim tensors on their device. ``chunks`` are those of ``params``.
    """
    if alpha == 0:
        return
    sqrt_bc2 = sqrt_bias_corrections2(beta2, steps)
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
    add_adam_direction_(
        params, exp_avgs, exp_avg_sqs, sqrt_bias_correction2=sqrt_bc2, eps=eps, divisors=list(divisors), chunks=chunks
    )
