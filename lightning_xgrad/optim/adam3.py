"""AdaM3 (Wang et al., ICDM 2023; formerly AdaMomentum): Adam with the second moment of the momentum, not the gradient.

Written the way ``torch.optim.Adam`` is: the optimizer class collects each param group's tensors, and one function per
implementation (``_single_tensor_adam3``, ``_multi_tensor_adam3``) applies the update.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .._internal.adam_direction import add_adam_direction_, bias_corrected_step_sizes, sqrt_bias_corrections2
from .._internal.chunks import Chunks, TensorList, default_chunk_bytes
from .._internal.compat import group_by_device_and_dtype, new_step_count, view_as_real_
from .._internal.scalars import as_float
from .._internal.validation import check_flag, check_real, check_real_pair
from .base import BaseOptimizer, gradients, increment_step_counts_, use_foreach

__all__ = ["AdaM3", "adam3"]


class AdaM3(BaseOptimizer):
    r"""AdaM3: Adam whose second moment is the moving average of the squared *momentum* ``m``, not of ``g``.

    Wang, Kang, Qin, Wang, Xu, Zhang and Fu, "Momentum is All You Need for Data-Driven Adaptive Optimization",
    ICDM 2023 (earlier "Rethinking Adam: A Twofold Exponential Moving Average Approach", arXiv 2106.11514, where it
    was called AdaMomentum). Official code: github.com/wyzjack/AdaM3.

    Why: the momentum carries more reliable directional information than a single noisy gradient, so scaling the
    step by its second moment gives steadier per-coordinate learning rates; the paper reports Adam-like training
    speed with better generalisation than Adam (CNNs, LSTMs, Transformers and GANs in its experiments).

    The update, per parameter at step k (k counts this parameter's steps, starting at 1; ``m_0 = v_0 = 0``)::

        g   = -grad if maximize else grad
        if weight_decay != 0:
            if decoupled_weight_decay:  p = p * (1 - lr * weight_decay)   # AdamW-style, outside the moments
            else:                       g = g + weight_decay * p          # L2 penalty, inside the moments
        m   = beta1 * m + (1 - beta1) * g
        v   = beta2 * v + (1 - beta2) * m * m + eps                      # eps is added into the stored state
        p   = p - lr * (m / (1 - beta1**k)) / sqrt(v / (1 - beta2**k))   # no eps outside the square root

    This is exactly the non-rectified, non-AMSGrad path of the official code (``AdaM3.step`` in its
    ``Transformer_NMT/fairseq/optim/adam3.py``, ``SNGAN/AdaM3.py``, ``DCGAN_BigGAN/src/AdaM3.py``, all identical),
    which is derived from AdaBelief's: ``exp_avg_var.mul_(beta2).addcmul_(exp_avg, exp_avg, value=1 - beta2)``
    then ``denom = exp_avg_var.add_(eps).sqrt() / math.sqrt(bias_correction2)`` and
    ``p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)``. Because ``add_`` works in place, eps is not a
    one-off term in the denominator: it accumulates in the state, and after the bias correction its share is exactly
    ``eps / (1 - beta2)`` at every step (1000 * eps with beta2 = 0.999). The denominator is
    ``sqrt(exp_avg_sq / (1 - beta2**k))`` with nothing added outside the square root.

    Note that v averages the squares of the *biased* m and is corrected for beta2 only, so early steps are larger
    than Adam's: with a constant gradient and the default betas, 10 lr at the first step (``1 / (1 - beta1)``),
    2.2 lr at step 10, 1.07 lr at step 100. The official code behaves the same way.

    Differences from the official class: the state entry is called ``exp_avg_sq`` (official: ``exp_avg_var``) and
    ``step`` is a tensor as in torch's optimizers; the official options ``amsgrad``, ``rectify`` (a RAdam-style
    rectification; on in its GAN code and its fairseq options, off in its CIFAR script), ``fixed_decay`` and
    ``degenerated_to_sgd`` are not implemented; ``maximize`` and ``foreach`` are added; the L2 path does not modify
    ``p.grad`` in place (the official code does). The official class defaults to ``eps=1e-16`` while its CIFAR
    script and fairseq options use ``1e-8``; this class defaults to ``1e-8``.

    Args:
        params: the parameters to optimize, or dicts defining param groups.
        lr: learning rate, a finite number >= 0 or a 1-element tensor (default: 1e-3).
        betas: coefficients of the moving averages of the gradient (beta1) and of the squared momentum (beta2)
            (default: (0.9, 0.999)).
        eps: added to the second-moment state at every step, for numerical stability (default: 1e-8).
        weight_decay: weight decay coefficient (default: 0).
        decoupled_weight_decay: if True, decay the weights directly, ``p *= 1 - lr * weight_decay``, as AdamW and the
            official code's default ``weight_decouple=True``; if False, add ``weight_decay * p`` to the gradient (an
            L2 penalty, as the official CIFAR script uses) (default: True).
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: use the multi-tensor (``torch._foreach_*``) implementation; ``None`` picks it where torch would for
            Adam (on CUDA and other accelerators, not on CPU) (default: None).

    State per parameter: ``step`` (a 0-dim float tensor on the CPU, as torch's Adam keeps it), ``exp_avg`` (m) and
    ``exp_avg_sq`` (v, eps included). The last update direction per unit lr, without decoupled decay, is therefore
    ``(exp_avg / (1 - beta1**step)) / sqrt(exp_avg_sq / (1 - beta2**step))``: what
    :class:`lightning_xgrad.rules.adam3.AdaM3Rule` reads for XGrad.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        owner = "AdaM3"
        check_real(owner, "lr", lr, low=0.0, allow_tensor=True)
        betas = check_real_pair(owner, "betas", betas, low=0.0, high=1.0, high_open=True)
        check_real(owner, "eps", eps, low=0.0)
        check_real(owner, "weight_decay", weight_decay, low=0.0)
        check_flag(owner, "decoupled_weight_decay", decoupled_weight_decay)
        check_flag(owner, "maximize", maximize)
        check_flag(owner, "foreach", foreach, allow_none=True)

        defaults = dict(
            lr=lr,
            betas=(float(betas[0]), float(betas[1])),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                # Like torch's Adam: `step` stays on the CPU, so reading it costs no device sync.
                state["step"] = new_step_count()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adam3(
            params,
            gradients(params),
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            foreach=group["foreach"],
            has_complex=any(torch.is_complex(p) for p in params),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )


def adam3(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    has_complex: bool = False,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """Functional AdaM3: one step on the given tensors (see :class:`AdaM3` for the update)."""
    func = _multi_tensor_adam3 if use_foreach(foreach, params) else _single_tensor_adam3
    func(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        has_complex=has_complex,
        beta1=beta1,
        beta2=beta2,
        lr=as_float(lr),
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
    )


def _single_tensor_adam3(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    has_complex: bool,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True):
        grad = -grad if maximize else grad
        step_t += 1

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        if torch.is_complex(param):  # real and imaginary parts as independent real coordinates, as torch's Adam
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)

        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(exp_avg, exp_avg, value=1 - beta2).add_(eps)

        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)

        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _multi_tensor_adam3(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    has_complex: bool,
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    if len(params) == 0:
        return

    grouped = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps])
    for (device_params, grads_of_device, device_exp_avgs, device_exp_avg_sqs, device_steps), _ in grouped:
        if has_complex:
            view_as_real_(device_params, grads_of_device, device_exp_avgs, device_exp_avg_sqs)
        device_grads: TensorList = torch._foreach_neg(grads_of_device) if maximize else grads_of_device

        increment_step_counts_(device_steps)

        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(device_params, 1 - lr * weight_decay)
            elif maximize:  # device_grads is already a temporary: reuse it
                torch._foreach_add_(device_grads, device_params, alpha=weight_decay)
            else:
                device_grads = torch._foreach_add(device_grads, device_params, alpha=weight_decay)

        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        del device_grads
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_exp_avgs, device_exp_avgs, 1 - beta2)
        torch._foreach_add_(device_exp_avg_sqs, eps)

        ks = [s.item() for s in device_steps]
        add_adam_direction_(
            device_params,
            device_exp_avgs,
            device_exp_avg_sqs,
            bias_corrected_step_sizes(-lr, beta1, ks),
            sqrt_bias_correction2=sqrt_bias_corrections2(beta2, ks),
            chunks=Chunks(device_params, default_chunk_bytes(device_params[0].device)),
        )
