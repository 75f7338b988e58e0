"""The updates of CPropSGD and CPropAdam on one param group, one function per implementation, as ``torch.optim``
writes them: ``_single_tensor_*`` walks the tensors one at a time, ``_multi_tensor_*`` groups them by device and dtype
and uses foreach ops. The classes in :mod:`lightning_xgrad.cprop.optim` collect the tensors and call them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._internal.adam_direction import add_adam_direction_, bias_corrected_step_sizes, sqrt_bias_corrections2
from .._internal.chunks import Chunks, TensorList, default_chunk_bytes
from .._internal.compat import group_by_device_and_dtype, view_as_real_
from ..optim.base import increment_step_counts_
from .statistics import ConformityCDF, conformity_scale_, update_mean_, update_statistics_, update_variance_


def _real(tensor: Tensor) -> Tensor:
    """A complex tensor as its real view (real and imaginary parts as independent coordinates), else itself."""
    return torch.view_as_real(tensor) if torch.is_complex(tensor) else tensor


def _single_tensor_cprop_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_vars: list[Tensor],
    step_counts: list[Tensor],
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
    """One CPropSGD step on one param group, one tensor at a time; fills ``momentum_buffers``' ``None`` entries."""
    increment_step_counts_(step_counts)
    ts = [float(t) for t in step_counts]
    r_grads, r_exp_avgs, r_exp_vars, r_scales = (
        [_real(t) for t in column] for column in (grads, exp_avgs, exp_vars, scales)
    )
    # the statistics see the raw gradient, before weight decay (official order)
    update_statistics_(r_exp_avgs, r_exp_vars, r_grads, ts, cprop_beta, chunks=None)
    conformity_scale_(r_scales, r_exp_avgs, r_exp_vars, ts, cprop_beta, cprop_c, cprop_eps, cprop_cdf, chunks=None)
    for i, (param, grad, scale) in enumerate(zip(params, grads, r_scales, strict=True)):
        direction = grad if weight_decay == 0 else grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:  # first step: the buffer is the direction itself
                buf = momentum_buffers[i] = direction.detach().clone()
            else:
                buf.mul_(momentum).add_(direction, alpha=1 - dampening)
            direction = direction.add(buf, alpha=momentum) if nesterov else buf
        _real(param).addcmul_(_real(direction), scale, value=-lr)


def _multi_tensor_cprop_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    exp_avgs: list[Tensor],
    exp_vars: list[Tensor],
    step_counts: list[Tensor],
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
    grouped = group_by_device_and_dtype([params, grads, momentum_buffers, exp_avgs, exp_vars, step_counts, scales])
    for (d_params, d_grads, d_bufs, d_m, d_var, d_steps, d_scales), indices in grouped:
        if any(torch.is_complex(p) for p in d_params):  # real and imaginary parts as independent coordinates
            view_as_real_(d_params, d_grads, d_m, d_var, d_scales)

        increment_step_counts_(d_steps)
        ts = [float(t) for t in d_steps]
        chunks = Chunks(d_params, default_chunk_bytes(d_params[0].device))
        # the statistics see the raw gradient, before weight decay (official order)
        update_statistics_(d_m, d_var, d_grads, ts, cprop_beta, chunks=chunks)
        conformity_scale_(d_scales, d_m, d_var, ts, cprop_beta, cprop_c, cprop_eps, cprop_cdf, chunks=chunks)

        directions: TensorList = d_grads
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


def _single_tensor_cprop_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    step_counts: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_vars: list[Tensor],
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
    """One CPropAdam step on one param group, one tensor at a time (see :func:`_multi_tensor_cprop_adam`)."""
    shared_mean = cprop_exp_avgs[0] is exp_avgs[0]
    increment_step_counts_(step_counts)
    ks = [float(k) for k in step_counts]
    r_params, r_grads, r_m, r_v, r_vmax, r_cm, r_cv, r_scales = (
        [_real(t) for t in column]
        for column in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, cprop_exp_avgs, cprop_exp_vars, scales)
    )
    if weight_decay != 0:
        if decoupled_weight_decay:
            for param in r_params:
                param.mul_(1 - lr * weight_decay)
        else:  # L2: into the moments and the statistics, never into p.grad
            r_grads = [grad.add(param, alpha=weight_decay) for grad, param in zip(r_grads, r_params, strict=True)]
    update_variance_(r_cv, r_cm, r_grads, ks, cprop_beta, chunks=None)  # reads the mean before it moves
    update_mean_(r_m, r_grads, beta1, foreach=False)
    if not shared_mean:
        update_mean_(r_cm, r_grads, cprop_beta, foreach=False)
    for v, grad in zip(r_v, r_grads, strict=True):
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    del r_grads
    conformity_scale_(r_scales, r_cm, r_cv, ks, cprop_beta, cprop_c, cprop_eps, cprop_cdf, chunks=None)
    for param, m, v, vmax, scale, k in zip(r_params, r_m, r_v, r_vmax, r_scales, ks, strict=True):
        if amsgrad:
            torch.maximum(vmax, v, out=vmax)
        direction = vmax.sqrt().div_(math.sqrt(1.0 - beta2**k)).add_(eps).reciprocal_().mul_(m)  # m / denom
        param.addcmul_(direction, scale, value=-lr / (1.0 - beta1**k))


def _multi_tensor_cprop_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    step_counts: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_vars: list[Tensor],
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
    mean is ``exp_avgs`` itself where it is shared."""
    shared_mean = cprop_exp_avgs[0] is exp_avgs[0]
    columns = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step_counts, cprop_exp_avgs, cprop_exp_vars]
    for device_columns, _ in group_by_device_and_dtype([*columns, scales]):
        d_params, grads_of_device, d_m, d_v, d_vmax, d_steps, d_cm, d_cv, d_scales = device_columns
        if any(torch.is_complex(p) for p in d_params):  # real and imaginary parts as independent coordinates
            view_as_real_(d_params, grads_of_device, d_m, d_v, d_vmax, d_cm, d_cv, d_scales)

        increment_step_counts_(d_steps)
        ks = [float(k) for k in d_steps]
        chunks = Chunks(d_params, default_chunk_bytes(d_params[0].device))
        d_grads: TensorList = grads_of_device
        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(d_params, 1 - lr * weight_decay)
            else:  # L2: into the moments and the statistics, never into p.grad
                d_grads = torch._foreach_add(d_grads, d_params, alpha=weight_decay)
        update_variance_(d_cv, d_cm, d_grads, ks, cprop_beta, chunks=chunks)  # reads the mean before it moves
        update_mean_(d_m, d_grads, beta1, foreach=True)
        if not shared_mean:
            update_mean_(d_cm, d_grads, cprop_beta, foreach=True)
        torch._foreach_mul_(d_v, beta2)
        torch._foreach_addcmul_(d_v, d_grads, d_grads, value=1 - beta2)
        del d_grads
        conformity_scale_(d_scales, d_cm, d_cv, ks, cprop_beta, cprop_c, cprop_eps, cprop_cdf, chunks=chunks)
        if amsgrad:
            torch._foreach_maximum_(d_vmax, d_v)

        add_adam_direction_(
            d_params,
            d_m,
            d_vmax,
            bias_corrected_step_sizes(-lr, beta1, ks),
            sqrt_bias_correction2=sqrt_bias_corrections2(beta2, ks),
            eps=eps,
            scales=d_scales,
            chunks=chunks,
        )
