"""Rule for pytorch-optimizer's AdaBelief: dW = m_hat / (sqrt(s_hat) + eps), the direction its update applies.

What it reads: per parameter ``exp_avg`` (m), ``exp_avg_var`` (s) and, with ``ams_bound``, ``max_exp_avg_var``;
from the param group the step count k (``group["step"]``, one Python int per group: AdaBelief keeps no
per-parameter step, so a parameter whose state was created late is still bias-corrected with the group's k, as
AdaBelief does itself), ``betas``, ``eps``, ``rectify``, ``ams_bound`` and the extra option ``adam_debias``.

AdaBelief's step (pytorch_optimizer 4.1.0, ``optimizer/adabelief.py``; both the foreach and the per-tensor path):
``k += 1``; ``g = -g`` with ``maximize``; decay; ``m = b1*m + (1-b1)*g``; ``s = b2*s + (1-b2)*(g-m)^2 + eps``;
with ``ams_bound`` ``v = max(v_max, s)`` kept in ``max_exp_avg_var``, else ``v = s``; then, with
``c1 = 1 - b1^k`` (``c1 = 1`` with ``adam_debias=True``) and ``c2 = 1 - b2^k``, dW per unit lr is

- ``rectify=False`` (default): ``dW = (m / c1) / (sqrt(v) / sqrt(c2) + eps)``, i.e. ``m_hat / (sqrt(v_hat) + eps)``;
- ``rectify=True``, with ``rho_inf = 2/(1-b2) - 1`` and ``rho = rho_inf - 2*k*b2^k / c2`` (RAdam):

  - ``rho >= n_sma_threshold``: ``dW = r/c1 * m / (sqrt(v) + eps)``, ``r = sqrt(c2 * (rho-4)(rho-2) rho_inf /
    ((rho_inf-4)(rho_inf-2) rho))`` (eps on ``sqrt(v)``, before the bias correction, unlike the default form);
  - below it, ``degenerated_to_sgd=True``: ``dW = m / c1`` (momentum SGD);
  - below it, ``degenerated_to_sgd=False``: ``dW = 0`` (AdaBelief skips the update; decay still happens).

Options that need nothing more: L2 decay (``weight_decouple=False``) is added to g before the moments, so it is
inside m and s; decoupled decay (``weight_decouple=True``, the default: ``p *= 1 - lr*wd``; ``fixed_decay``:
``p *= 1 - wd``), applied before the update, is left out of dW as for AdamW; ``maximize`` negates g before the
moments, so m already points the applied way; ``adanorm`` rescales the g that enters m, which the state holds.
Complex parameters are handled, like AdaBelief does, as real views (real and imaginary parts separately).

``rectify=True``: AdaBelief keeps ``n_sma_threshold`` and ``degenerated_to_sgd`` on the optimizer object, not in
the param group or the state, and they decide which of the three rectified forms was applied, so the predictor
binds the rule to each optimizer (:meth:`AdaBeliefRule.bind`). An unbound rule does not guess: it sends
``rectify=True`` groups to the trajectory rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._internal.adam_direction import add_adam_direction_
from .._internal.chunks import Chunks
from .._internal.scalars import as_float
from .base import PredictionRule
from .radam import rectification


class AdaBeliefRule(PredictionRule):
    """``pytorch_optimizer.AdaBelief`` (also with ``ams_bound``, L2 or decoupled decay, ``maximize``, ``foreach``).

    Args:
        n_sma_threshold: the optimizer's ``n_sma_threshold``, needed for ``rectify=True`` groups.
        degenerated_to_sgd: the optimizer's ``degenerated_to_sgd``, needed for ``rectify=True`` groups.

    Built without them the rule sends ``rectify=True`` groups to the trajectory rule; the predictor always uses
    :meth:`bind`, which reads them from the optimizer.
    """

    name = "adabelief"

    def __init__(self, n_sma_threshold: float | None = None, degenerated_to_sgd: bool | None = None) -> None:
        self.n_sma_threshold = n_sma_threshold
        self.degenerated_to_sgd = degenerated_to_sgd

    def bind(self, optimizer: Any) -> AdaBeliefRule:
        """A rule that also handles ``rectify=True``, with ``optimizer``'s rectification settings (AdaBelief keeps
        them on the optimizer object, not in its param groups)."""
        return type(self)(n_sma_threshold=optimizer.n_sma_threshold, degenerated_to_sgd=optimizer.degenerated_to_sgd)

    def handles(self, group: dict[str, Any]) -> bool:
        if group.get("rectify", False):
            return self.n_sma_threshold is not None and self.degenerated_to_sgd is not None
        return True

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "exp_avg_var" not in state:
            return None
        return state["exp_avg"], state["exp_avg_var"], state.get("max_exp_avg_var")

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        exp_avgs, exp_avg_vars, max_exp_avg_vars = columns
        k = as_float(group.get("step", 0))
        if k <= 0:  # no step taken yet: no direction
            return
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        bias_correction1 = 1.0 if group.get("adam_debias", False) else 1.0 - beta1**k
        bias_correction2 = 1.0 - beta2**k
        if group.get("ams_bound", False):
            second = [s if v is None else v for s, v in zip(exp_avg_vars, max_exp_avg_vars, strict=True)]
        else:
            second = list(exp_avg_vars)

        if not group.get("rectify", False):
            sqrt_bc2, step_size = math.sqrt(bias_correction2), alpha / bias_correction1
        else:
            rho, r_squared = rectification(k, beta2)
            if rho < float(self.n_sma_threshold):  # type: ignore[arg-type]  # handles() guarantees it is set
                if self.degenerated_to_sgd:
                    torch._foreach_add_(params, exp_avgs, alpha=alpha / bias_correction1)
                return
            r = math.sqrt(bias_correction2 * r_squared)
            sqrt_bc2, step_size = 1.0, alpha * r / bias_correction1
        add_adam_direction_(params, exp_avgs, second, step_size, sqrt_bias_correction2=sqrt_bc2, eps=eps, chunks=chunks)
