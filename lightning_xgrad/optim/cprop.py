"""CPropSGD and CPropAdam: SGD and Adam whose every update is scaled elementwise by CProp's gradient conformity.

Preechakul and Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past Gradient Conformity", 2019, arXiv
1912.11493; official code github.com/phizaz/cprop (``cprop/cprop_sgd.py``, ``cprop/cprop_adam.py``). The scale
and its statistics are in :mod:`lightning_xgrad.conformity`; to add CProp to any other optimizer, use
:class:`lightning_xgrad.cprop_callback.CPropCallback`. Written the way ``torch.optim``'s optimizers are: the class
collects each param group's tensors, and one multi-tensor function per optimizer applies the update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype, _view_as_real

from .._validation import argument_error, check_flag, check_real, check_real_pair
from ..conformity import (
    ConformityCDF,
    check_conformity_args,
    conformity_scale_,
    update_mean_,
    update_square_mean_,
    update_statistics_,
)
from ..rules._foreach import as_float, chunk_slices, steps_as_floats

__all__ = ["CPropAdam", "CPropSGD"]


def _new_step() -> Tensor:
    """A step counter as torch's optimizers keep it: a 0-dim float tensor on the CPU (reading it costs no sync)."""
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


def _increment(steps: list[Tensor]) -> None:
    if steps[0].is_cpu:
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


_SGD_STATE = ("cprop_exp_avg", "cprop_exp_avg_sq", "step", "cprop_scale")


class CPropSGD(Optimizer):
    r"""SGD (with momentum, dampening, Nesterov and L2 weight decay, as ``torch.optim.SGD``) with CProp's scale.

    Per parameter, with g its gradient (the official ``CPropSGD.step``)::

        s   = conformity scale after folding the raw g into the statistics   (before weight decay)
        d   = g + weight_decay * p
        buf = d at the first step, else momentum * buf + (1 - dampening) * d (if momentum != 0)
        d   = d + momentum * buf if nesterov else buf                         (if momentum != 0)
        p   = p - lr * s * d

    Differences from the official class: the weight decay is not written into ``p.grad`` (the official code adds it
    in place); ``lr`` defaults to 1e-3 as torch's SGD (official: required); the state names follow torch's
    (official: ``cprop_m``, ``cprop_v``, ``cprop_t``). The statistics have the parameter's dtype, as in the
    official code: with bfloat16 parameters an average with beta = 0.999 barely moves, so keep float32 parameters
    (``bf16-mixed``) there.

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor (default: 1e-3).
        momentum: momentum factor (default: 0).
        dampening: dampening of the momentum (default: 0).
        weight_decay: L2 penalty added to the gradient after the statistics (default: 0).
        nesterov: Nesterov momentum (default: False).
        cprop_beta: decay of the moving averages of g and g^2 behind the conformity scale (default: 0.999).
        cprop_c: the scale is ``min(1, cprop_c * |2 Phi(-z) - 1|)``; larger values scale down fewer elements
            (default: 1).
        cprop_eps: added to the effective sample count and to the standard error (default: 1e-8).
        cprop_cdf: ``"bft"`` (a logistic fit of the normal CDF, the official default) or ``"normal"`` (default:
            ``"bft"``).

    State per parameter: ``momentum_buffer`` (with momentum), ``cprop_exp_avg`` and ``cprop_exp_avg_sq`` (the moving
    averages of g and g^2), ``step`` (their gradient count t; named as torch names it, so that ``load_state_dict``
    keeps it a float32 CPU tensor instead of casting it to the parameter's dtype) and ``cprop_scale`` (the scale of
    the last step).
    XGrad's rule (:class:`lightning_xgrad.rules.cprop.CPropSGDRule`) reads dW = ``cprop_scale * momentum_buffer``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cprop_cdf: ConformityCDF = "bft",
    ) -> None:
        owner = "CPropSGD"
        check_real(owner, "lr", lr, low=0.0, allow_tensor=True)
        check_real(owner, "momentum", momentum, low=0.0)
        check_real(owner, "dampening", dampening, low=0.0)
        check_real(owner, "weight_decay", weight_decay, low=0.0)
        check_flag(owner, "nesterov", nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            allowed = (
                f"False with momentum={momentum!r} and dampening={dampening!r} (Nesterov needs momentum > 0 and "
                "dampening = 0)"
            )
            raise argument_error(owner, "nesterov", allowed, nesterov)
        check_conformity_args(owner, cprop_beta, cprop_c, cprop_eps, cprop_cdf, prefix="cprop_")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            cprop_beta=cprop_beta,
            cprop_c=cprop_c,
            cprop_eps=cprop_eps,
            cprop_cdf=cprop_cdf,
        )
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], columns: dict[str, list[Any]]) -> None:
        """Collect the parameters with a gradient and their state (created lazily) into ``columns``."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CPropSGD does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                state["step"] = _new_step()
                state["cprop_exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["cprop_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["cprop_scale"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            columns["params"].append(p)
            columns["grads"].append(p.grad)
            columns["momentum_buffers"].append(state.get("momentum_buffer"))
            for name in _SGD_STATE:
                columns[name].append(state[name])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        names = ("params", "grads", "momentum_buffers", *_SGD_STATE)
        for group in self.param_groups:
            columns: dict[str, list[Any]] = {name: [] for name in names}
            self._init_group(group, columns)
            if not columns["params"]:
                continue
            _multi_tensor_cprop_sgd(
                *(columns[name] for name in names),
                lr=as_float(group["lr"]),
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                cprop_beta=group["cprop_beta"],
                cprop_c=group["cprop_c"],
                cprop_eps=group["cprop_eps"],
                cprop_cdf=group["cprop_cdf"],
            )
            if group["momentum"] != 0:
                for p, buf in zip(columns["params"], columns["momentum_buffers"], strict=True):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _multi_tensor_cprop_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    scales: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cprop_cdf: ConformityCDF,
) -> None:
    """One CPropSGD step on one param group; fills ``momentum_buffers``' ``None`` entries with new buffers."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffers, exp_avgs, exp_avg_sqs, steps, scales],  # type: ignore[list-item]
        with_indices=True,
    )
    for (d_params, d_grads, d_bufs_, d_m, d_v, d_steps, d_scales), indices in grouped.values():
        d_params, d_grads = cast(list[Tensor], d_params), cast(list[Tensor], d_grads)
        d_m, d_v, d_scales = cast(list[Tensor], d_m), cast(list[Tensor], d_v), cast(list[Tensor], d_scales)
        d_steps, d_bufs = cast(list[Tensor], d_steps), cast(list[Tensor | None], d_bufs_)
        complex_views = any(torch.is_complex(p) for p in d_params)
        if complex_views:  # real and imaginary parts as independent coordinates, as torch's optimizers do
            _view_as_real(d_params, d_grads, d_m, d_v, d_scales)

        # the statistics see the raw gradient, before weight decay (official order)
        update_statistics_(d_m, d_v, d_grads, cprop_beta)
        _increment(d_steps)
        conformity_scale_(d_scales, d_m, d_v, steps_as_floats(d_steps), cprop_beta, cprop_c, cprop_eps, cprop_cdf)

        directions = d_grads
        if weight_decay != 0:
            directions = torch._foreach_add(d_grads, d_params, alpha=weight_decay)
        if momentum != 0:
            bufs: list[Tensor] = []
            for i, (buf, direction) in enumerate(zip(d_bufs, directions, strict=True)):
                if buf is None:  # first step: the buffer is the direction itself
                    buf = direction.detach().clone()
                    complex_param = torch.is_complex(params[indices[i]])
                    momentum_buffers[indices[i]] = torch.view_as_complex(buf) if complex_param else buf
                else:
                    buf = torch.view_as_real(buf) if torch.is_complex(buf) else buf
                    buf.mul_(momentum).add_(direction, alpha=1 - dampening)
                bufs.append(buf)
            if nesterov:
                if directions is d_grads:  # never write into p.grad
                    directions = torch._foreach_add(d_grads, bufs, alpha=momentum)
                else:
                    torch._foreach_add_(directions, bufs, alpha=momentum)
            else:
                directions = bufs
        torch._foreach_addcmul_(d_params, directions, d_scales, value=-lr)


class CPropAdam(Optimizer):
    r"""Adam (with L2 or decoupled weight decay and AMSGrad) whose update is scaled by CProp's conformity scale.

    Per parameter at step k, with g its gradient (the official ``CPropAdam.step``)::

        g     = g + weight_decay * p                       (L2, the official behaviour)
        p     = p * (1 - lr * weight_decay)                (instead, with decoupled_weight_decay=True, as AdamW)
        m     = beta1 * m + (1 - beta1) * g                v = beta2 * v + (1 - beta2) * g^2
        s     = conformity scale of g (after the L2 term; its statistics are m or v themselves when cprop_beta
                equals beta1 or beta2, as the official code shares them, otherwise their own moving averages)
        v'    = max(v' , v) with amsgrad, else v
        p     = p - lr * s * (m / (1 - beta1^k)) / (sqrt(v' / (1 - beta2^k)) + eps)

    Differences from the official class: ``decoupled_weight_decay`` is an addition (the official code has L2 only);
    the L2 term is not written into ``p.grad`` (the official code adds it in place); with the default betas the
    official code shares v with the statistics and so does this class, which changes no value.

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor (default: 1e-3).
        betas: decays of Adam's moving averages of g and g^2 (default: (0.9, 0.999)).
        eps: added to the denominator, outside the square root (default: 1e-8).
        weight_decay: weight decay coefficient (default: 0).
        amsgrad: use the maximum of the second moments so far in the denominator (default: False).
        decoupled_weight_decay: decay the weights directly, as AdamW, instead of the L2 term in g; the statistics
            then see the raw gradient (default: False).
        cprop_beta: decay of the moving averages of g and g^2 behind the conformity scale (default: 0.999).
        cprop_c: the scale is ``min(1, cprop_c * |2 Phi(-z) - 1|)``; larger values scale down fewer elements
            (default: 1).
        cprop_eps: added to the effective sample count and to the standard error (default: 1e-8).
        cprop_cdf: ``"bft"`` (a logistic fit of the normal CDF, the official default) or ``"normal"`` (default:
            ``"bft"``).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) as torch's Adam;
    ``cprop_exp_avg`` / ``cprop_exp_avg_sq`` only where ``cprop_beta`` differs from beta1 / beta2; ``cprop_scale``,
    the scale of the last step. XGrad's rule (:class:`lightning_xgrad.rules.cprop.CPropAdamRule`) reads
    dW = ``cprop_scale * m_hat / (sqrt(v_hat) + eps)``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = False,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cprop_cdf: ConformityCDF = "bft",
    ) -> None:
        owner = "CPropAdam"
        check_real(owner, "lr", lr, low=0.0, allow_tensor=True)
        betas = check_real_pair(owner, "betas", betas, low=0.0, high=1.0, high_open=True)
        check_real(owner, "eps", eps, low=0.0)
        check_real(owner, "weight_decay", weight_decay, low=0.0)
        check_flag(owner, "amsgrad", amsgrad)
        check_flag(owner, "decoupled_weight_decay", decoupled_weight_decay)
        check_conformity_args(owner, cprop_beta, cprop_c, cprop_eps, cprop_cdf, prefix="cprop_")
        defaults = dict(
            lr=lr,
            betas=(float(betas[0]), float(betas[1])),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            decoupled_weight_decay=decoupled_weight_decay,
            cprop_beta=cprop_beta,
            cprop_c=cprop_c,
            cprop_eps=cprop_eps,
            cprop_cdf=cprop_cdf,
        )
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], columns: dict[str, list[Any]]) -> None:
        """Collect the parameters with a gradient and their state (created lazily) into ``columns``; the CProp
        statistics are Adam's own moving averages where the decays agree."""
        beta1, beta2 = group["betas"]
        shared_mean, shared_square = beta1 == group["cprop_beta"], beta2 == group["cprop_beta"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("CPropAdam does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step()
                for name in ("exp_avg", "exp_avg_sq", "cprop_scale"):
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not shared_mean and "cprop_exp_avg" not in state:
                state["cprop_exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not shared_square and "cprop_exp_avg_sq" not in state:
                state["cprop_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            columns["params"].append(p)
            columns["grads"].append(p.grad)
            for name in ("exp_avg", "exp_avg_sq", "step", "cprop_scale"):
                columns[name].append(state[name])
            columns["max_exp_avg_sq"].append(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
            columns["cprop_exp_avg"].append(state["exp_avg"] if shared_mean else state["cprop_exp_avg"])
            columns["cprop_exp_avg_sq"].append(state["exp_avg_sq"] if shared_square else state["cprop_exp_avg_sq"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        names = (
            "params",
            "grads",
            "exp_avg",
            "exp_avg_sq",
            "max_exp_avg_sq",
            "step",
            "cprop_exp_avg",
            "cprop_exp_avg_sq",
            "cprop_scale",
        )
        for group in self.param_groups:
            columns: dict[str, list[Any]] = {name: [] for name in names}
            self._init_group(group, columns)
            if not columns["params"]:
                continue
            beta1, beta2 = group["betas"]
            _multi_tensor_cprop_adam(
                *(columns[name] for name in names),
                lr=as_float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                cprop_beta=group["cprop_beta"],
                cprop_c=group["cprop_c"],
                cprop_eps=group["cprop_eps"],
                cprop_cdf=group["cprop_cdf"],
            )
        return loss


def _multi_tensor_cprop_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor],
    scales: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled_weight_decay: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cprop_cdf: ConformityCDF,
) -> None:
    """One CPropAdam step on one param group. ``max_exp_avg_sqs`` is ``exp_avg_sqs`` without amsgrad, and the CProp
    statistics are ``exp_avgs`` / ``exp_avg_sqs`` themselves where they are shared."""
    shared_mean, shared_square = cprop_exp_avgs[0] is exp_avgs[0], cprop_exp_avg_sqs[0] is exp_avg_sqs[0]
    tensors = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cprop_exp_avgs, cprop_exp_avg_sqs, scales]
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensors)  # type: ignore[arg-type]
    for device_tensors, _ in grouped.values():
        d_params, d_grads, d_m, d_v, d_vmax, d_steps, d_cm, d_cv, d_scales = (
            cast(list[Tensor], column) for column in device_tensors
        )
        if any(torch.is_complex(p) for p in d_params):  # real and imaginary parts as independent coordinates
            _view_as_real(d_params, d_grads, d_m, d_v, d_vmax, d_cm, d_cv, d_scales)

        _increment(d_steps)
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(d_params, 1 - lr * weight_decay)
            else:  # L2: into the moments and the statistics, never into p.grad
                d_grads = torch._foreach_add(d_grads, d_params, alpha=weight_decay)
        update_mean_(d_m, d_grads, beta1)
        update_square_mean_(d_v, d_grads, beta2)
        if not shared_mean:
            update_mean_(d_cm, d_grads, cprop_beta)
        if not shared_square:
            update_square_mean_(d_cv, d_grads, cprop_beta)
        del d_grads
        ks = steps_as_floats(d_steps)
        conformity_scale_(d_scales, d_cm, d_cv, ks, cprop_beta, cprop_c, cprop_eps, cprop_cdf)
        if amsgrad:
            torch._foreach_maximum_(d_vmax, d_v)

        neg_step_sizes = [-lr / (1.0 - beta1**k) for k in ks]
        sqrt_bc2 = [math.sqrt(1.0 - beta2**k) for k in ks]
        for part in chunk_slices(d_params):
            direction = torch._foreach_sqrt(d_vmax[part])
            torch._foreach_div_(direction, sqrt_bc2[part])
            torch._foreach_add_(direction, eps)
            torch._foreach_reciprocal_(direction)
            torch._foreach_mul_(direction, d_m[part])  # m / denom
            torch._foreach_addcmul_(d_params[part], direction, d_scales[part], neg_step_sizes[part])
            del direction  # one chunk of temporaries alive at a time
