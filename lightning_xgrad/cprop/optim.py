"""CPropSGD and CPropAdam: SGD and Adam whose every update is scaled elementwise by CProp's gradient conformity.

Preechakul and Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past Gradient Conformity", 2019, arXiv
1912.11493; official code github.com/phizaz/cprop (``cprop/cprop_sgd.py``, ``cprop/cprop_adam.py``). The scale
and its statistics are in :mod:`lightning_xgrad.cprop.statistics` (which also says why the variance is kept as an exact
moving variance rather than the official ``v_hat - m_hat^2``); to add CProp to any other optimizer, use
:class:`lightning_xgrad.cprop.callback.CPropCallback`. Written the way ``torch.optim``'s optimizers are: the class
collects each param group's tensors, and one function per implementation (``_single_tensor_*``,
``_multi_tensor_*``, in :mod:`lightning_xgrad.cprop.functional`) applies the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from .._internal.compat import new_step_count
from .._internal.optimizers import flat_params
from .._internal.scalars import as_float
from .._internal.validation import argument_error, check_flag, check_real, check_real_pair
from ..optim.base import BaseOptimizer, use_foreach
from .statistics import (
    ConformityCDF,
    check_conformity_args,
)

__all__ = ["CPropAdam", "CPropSGD"]

from .functional import (
    _multi_tensor_cprop_adam,
    _multi_tensor_cprop_sgd,
    _single_tensor_cprop_adam,
    _single_tensor_cprop_sgd,
)

__all__ = ["CPropAdam", "CPropSGD"]


def _refuse_a_foreign_state(optimizer: Optimizer, owner: str) -> None:
    """A loaded state_dict that is not this optimizer's (torch's Adam's, or one without CProp's statistics) is refused
    at load, instead of CProp starting again from zero statistics or failing with a KeyError at the next step."""
    for index, group in enumerate(optimizer.param_groups):
        if "cprop_beta" not in group:
            raise ValueError(
                f"{owner}: the loaded state_dict is not a {owner}'s: param group {index} has no 'cprop_beta' "
                f"(its options: {sorted(k for k in group if k != 'params')})"
            )
    for index, p in enumerate(flat_params(optimizer)):
        state = optimizer.state.get(p)
        if state and "step" in state and "cprop_exp_var" not in state:
            raise ValueError(
                f"{owner}: the loaded state of parameter {index} has no CProp statistics: expected 'cprop_exp_var', "
                f"got {sorted(state)}"
            )


_SGD_STATE = ("cprop_exp_avg", "cprop_exp_var", "step", "cprop_scale")


class CPropSGD(BaseOptimizer):
    r"""SGD (with momentum, dampening, Nesterov and L2 weight decay, as ``torch.optim.SGD``) with CProp's scale.

    Per parameter, with g its gradient (the official ``CPropSGD.step``)::

        s   = conformity scale after folding the raw g into the statistics   (before weight decay)
        d   = g + weight_decay * p
        buf = d at the first step, else momentum * buf + (1 - dampening) * d (if momentum != 0)
        d   = d + momentum * buf if nesterov else buf                         (if momentum != 0)
        p   = p - lr * s * d

    Differences from the official class: the variance behind s is an exact moving variance, not ``v_hat - m_hat^2``
    (equal in exact arithmetic; see :mod:`lightning_xgrad.cprop.statistics`: the official form makes the first step's
    scale float rounding noise); the weight decay is not written into ``p.grad`` (the official code adds it in
    place); ``lr`` defaults to 1e-3 as torch's SGD (official: required); ``foreach`` is added; the state names
    follow torch's (official: ``cprop_m``, ``cprop_v``, ``cprop_t``). The statistics have the parameter's dtype, as
    in the official code: with bfloat16 parameters an average with beta = 0.999 barely moves, so keep float32
    parameters (``bf16-mixed``) there.

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor (default: 1e-3).
        momentum: momentum factor (default: 0).
        dampening: dampening of the momentum (default: 0).
        weight_decay: L2 penalty added to the gradient after the statistics (default: 0).
        nesterov: Nesterov momentum (default: False).
        cprop_beta: decay of the moving mean and variance of g behind the conformity scale (default: 0.999).
        cprop_c: the scale is ``min(1, cprop_c * |2 Phi(-z) - 1|)``; larger values scale down fewer elements
            (default: 1).
        cprop_eps: added to the effective sample count and to the standard error; must be > 0 (default: 1e-8).
        cprop_cdf: ``"bft"`` (a logistic fit of the normal CDF, the official default) or ``"normal"`` (default:
            ``"bft"``).
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; ``None`` picks it where torch would for
            SGD (on CUDA and other accelerators, not on CPU) (default: None).

    State per parameter: ``momentum_buffer`` (with momentum), ``cprop_exp_avg`` (the moving average m of g),
    ``cprop_exp_var`` (the moving variance, bias-corrected as m: ``cprop_exp_var / (1 - cprop_beta^step)`` is the
    official ``v_hat - m_hat^2``), ``step`` (their gradient count t; named as torch names it, so that
    ``load_state_dict`` keeps it a float32 CPU tensor instead of casting it to the parameter's dtype) and
    ``cprop_scale`` (the scale of the last step). XGrad's rule (:class:`lightning_xgrad.cprop.rules.CPropSGDRule`) reads
    dW = ``cprop_scale * momentum_buffer``."""

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
        foreach: bool | None = None,
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
        check_flag(owner, "foreach", foreach, allow_none=True)
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
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # what load_state_dict ends with
        _refuse_a_foreign_state(self, "CPropSGD")

    def _init_group(self, params: list[Tensor], columns: dict[str, list[Any]]) -> None:
        """Collect the parameters and their state (created lazily) into ``columns``."""
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = new_step_count()
                for name in ("cprop_exp_avg", "cprop_exp_var", "cprop_scale"):
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            columns["params"].append(p)
            columns["grads"].append(p.grad)
            columns["momentum_buffers"].append(state.get("momentum_buffer"))
            for name in _SGD_STATE:
                columns[name].append(state[name])

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        names = ("params", "grads", "momentum_buffers", *_SGD_STATE)
        columns: dict[str, list[Any]] = {name: [] for name in names}
        self._init_group(params, columns)
        step_fn = _multi_tensor_cprop_sgd if use_foreach(group["foreach"], params) else _single_tensor_cprop_sgd
        step_fn(
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
            for p, buf in zip(params, columns["momentum_buffers"], strict=True):
                self.state[p]["momentum_buffer"] = buf


_ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "cprop_exp_avg", "cprop_exp_var", "cprop_scale")


class CPropAdam(BaseOptimizer):
    r"""Adam (with L2 or decoupled weight decay and AMSGrad) whose update is scaled by CProp's conformity scale.

    Per parameter at step k, with g its gradient (the official ``CPropAdam.step``)::

        g     = g + weight_decay * p                       (L2, the official behaviour)
        p     = p * (1 - lr * weight_decay)                (instead, with decoupled_weight_decay=True, as AdamW)
        m     = beta1 * m + (1 - beta1) * g                v = beta2 * v + (1 - beta2) * g^2
        s     = conformity scale of g (after the L2 term; its mean is m itself when cprop_beta equals beta1, as the
                official code shares it, otherwise its own moving average)
        v'    = max(v' , v) with amsgrad, else v
        p     = p - lr * s * (m / (1 - beta1^k)) / (sqrt(v' / (1 - beta2^k)) + eps)

    Differences from the official class: the variance behind s is an exact moving variance, not
    ``v_hat - m_hat^2`` (equal in exact arithmetic; see :mod:`lightning_xgrad.cprop.statistics`: the official form makes
    the first step's scale float rounding noise), so it is one tensor per parameter of its own where the official
    code shares Adam's v (with the default betas); ``decoupled_weight_decay`` and ``foreach`` are additions (the
    official code has L2 only); the L2 term is not written into ``p.grad`` (the official code adds it in place).

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor (default: 1e-3).
        betas: decays of Adam's moving averages of g and g^2 (default: (0.9, 0.999)).
        eps: added to the denominator, outside the square root (default: 1e-8).
        weight_decay: weight decay coefficient (default: 0).
        amsgrad: use the maximum of the second moments so far in the denominator (default: False).
        decoupled_weight_decay: decay the weights directly, as AdamW, instead of the L2 term in g; the statistics
            then see the raw gradient (default: False).
        cprop_beta: decay of the moving mean and variance of g behind the conformity scale (default: 0.999).
        cprop_c: the scale is ``min(1, cprop_c * |2 Phi(-z) - 1|)``; larger values scale down fewer elements
            (default: 1).
        cprop_eps: added to the effective sample count and to the standard error; must be > 0 (default: 1e-8).
        cprop_cdf: ``"bft"`` (a logistic fit of the normal CDF, the official default) or ``"normal"`` (default:
            ``"bft"``).
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; ``None`` picks it where torch would for
            Adam (on CUDA and other accelerators, not on CPU) (default: None).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) as torch's Adam;
    ``cprop_exp_avg`` only where ``cprop_beta`` differs from beta1; ``cprop_exp_var`` (the moving variance,
    bias-corrected as the mean: ``cprop_exp_var / (1 - cprop_beta^step)`` is the official ``v_hat - m_hat^2``);
    ``cprop_scale``, the scale of the last step. XGrad's rule (:class:`lightning_xgrad.cprop.rules.CPropAdamRule`) reads
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
        foreach: bool | None = None,
    ) -> None:
        owner = "CPropAdam"
        check_real(owner, "lr", lr, low=0.0, allow_tensor=True)
        betas = check_real_pair(owner, "betas", betas, low=0.0, high=1.0, high_open=True)
        check_real(owner, "eps", eps, low=0.0)
        check_real(owner, "weight_decay", weight_decay, low=0.0)
        check_flag(owner, "amsgrad", amsgrad)
        check_flag(owner, "decoupled_weight_decay", decoupled_weight_decay)
        check_conformity_args(owner, cprop_beta, cprop_c, cprop_eps, cprop_cdf, prefix="cprop_")
        check_flag(owner, "foreach", foreach, allow_none=True)
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
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # what load_state_dict ends with
        _refuse_a_foreign_state(self, "CPropAdam")

    def _init_group(self, group: dict[str, Any], params: list[Tensor], columns: dict[str, list[Any]]) -> None:
        """Collect the parameters and their state (created lazily) into ``columns``; the CProp mean is Adam's own
        where the decays agree."""
        shared_mean = group["betas"][0] == group["cprop_beta"]
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step_count()
                for name in ("exp_avg", "exp_avg_sq", "cprop_exp_var", "cprop_scale"):
                    state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not shared_mean and "cprop_exp_avg" not in state:
                state["cprop_exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            columns["params"].append(p)
            columns["grads"].append(p.grad)
            for name in ("exp_avg", "exp_avg_sq", "step", "cprop_exp_var", "cprop_scale"):
                columns[name].append(state[name])
            columns["max_exp_avg_sq"].append(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"])
            columns["cprop_exp_avg"].append(state["exp_avg"] if shared_mean else state["cprop_exp_avg"])

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        names = ("params", "grads", *_ADAM_STATE)
        columns: dict[str, list[Any]] = {name: [] for name in names}
        self._init_group(group, params, columns)
        step_fn = _multi_tensor_cprop_adam if use_foreach(group["foreach"], params) else _single_tensor_cprop_adam
        beta1, beta2 = group["betas"]
        step_fn(
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
