"""An independent plain-PyTorch reference of CProp, written from the formulas alone, one tensor at a time.

It imports nothing from ``lightning_xgrad`` (only the window grouping and XGrad's base directions from the XGrad
reference, ``tests/reference.py``) and favours readability over speed. Per element, at the t-th gradient g::

    m = beta * m + (1 - beta) * g,  v = beta * v + (1 - beta) * g^2            (then t counts g)
    m_hat = m / (1 - beta^t),  v_hat = v / (1 - beta^t),  n = (1 - beta^t) / (1 - beta)
    se = sqrt(max(v_hat - m_hat^2, 0) / (n - 1 + eps)) + eps,  z = m_hat / se
    scale = min(1, c * |2 * Phi(-z) - 1|)
    Phi = the normal CDF, or the logistic fit 1 / (1 + exp(-(0.07056 z^3 + 1.5976 z)))

It is a float64 oracle of the *official* formulas: the statistics are kept in float64 whatever the dtype of the
gradients they see, and the training loops below are meant to run on a float64 copy of the model. In exact arithmetic
``v_hat - m_hat^2`` equals the exponentially weighted variance that ``lightning_xgrad.cprop.statistics`` keeps instead.
In float32 that difference keeps a few ulps of g^2 of rounding, which at t = 1 (exactly 0, divided by ``n - 1 + eps =
eps``) sets the scale anywhere in [0, 1]; in float64 the same rounding, about 1e-16 g^2, leaves ``z = m_hat / se`` above
5e3 at t = 1 wherever it matters, so the scale is the exact-arithmetic one (1 for any gradient far above eps, ``|2
Phi(-g / eps) - 1|`` for one near it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .reference import direction as base_direction
from .reference import state_rule, windows

Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor]


def phi(z: Tensor, cdf: str) -> Tensor:
    """The standard normal CDF at z, exact (``"normal"``) or Bowling et al.'s logistic fit (``"bft"``)."""
    if cdf == "normal":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    if cdf == "bft":
        return 1 / (1 + torch.exp(-(0.07056 * z**3 + 1.5976 * z)))
    raise ValueError(cdf)


def conformity_scale(m: Tensor, v: Tensor, t: int, beta: float, c: float, eps: float, cdf: str) -> Tensor:
    """CProp's scale from the uncorrected moving averages m, v after t gradients (computed in float64)."""
    m, v = m.double(), v.double()
    bias_correction = 1 - beta**t
    m_hat = m / bias_correction
    v_hat = v / bias_correction
    n = bias_correction / (1 - beta)
    se = ((v_hat - m_hat * m_hat).clamp(min=0) / (n - 1 + eps)).sqrt() + eps
    z = m_hat / se
    return (c * (2 * phi(-z, cdf) - 1).abs()).clamp(max=1)


class Conformity:
    """The per-parameter statistics, in float64: ``observe(p, g)`` folds in one gradient and returns the new scale."""

    def __init__(self, beta: float = 0.999, c: float = 1.0, eps: float = 1e-8, cdf: str = "bft") -> None:
        self.beta, self.c, self.eps, self.cdf = beta, c, eps, cdf
        self.m: dict[Tensor, Tensor] = {}
        self.v: dict[Tensor, Tensor] = {}
        self.t: dict[Tensor, int] = {}

    def observe(self, p: Tensor, g: Tensor) -> Tensor:
        """Fold in g (as float64); the scale comes back in g's dtype."""
        g64 = g.double()
        m = self.m.get(p, torch.zeros_like(g64))
        v = self.v.get(p, torch.zeros_like(g64))
        self.m[p] = self.beta * m + (1 - self.beta) * g64
        self.v[p] = self.beta * v + (1 - self.beta) * g64 * g64
        self.t[p] = self.t.get(p, 0) + 1
        scale = conformity_scale(self.m[p], self.v[p], self.t[p], self.beta, self.c, self.eps, self.cdf)
        return scale.to(g.dtype)


class CPropSGDReference:
    """SGD as torch's (momentum, dampening, Nesterov, L2) with ``p -= lr * scale * direction``; the statistics see
    the raw gradient, before the L2 term."""

    def __init__(
        self,
        params: Sequence[Tensor],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        **cprop: Any,
    ) -> None:
        self.params, self.lr, self.momentum, self.dampening = list(params), lr, momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.conformity = Conformity(**cprop)
        self.buffers: dict[Tensor, Tensor] = {}
        self.scales: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad
            self.scales[p] = self.conformity.observe(p, g)
            d = g.add(p, alpha=self.weight_decay) if self.weight_decay else g
            if self.momentum:
                if p not in self.buffers:
                    self.buffers[p] = d.clone()
                else:
                    self.buffers[p] = self.momentum * self.buffers[p] + (1 - self.dampening) * d
                d = d + self.momentum * self.buffers[p] if self.nesterov else self.buffers[p]
            p.sub_(self.lr * self.scales[p] * d)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def direction(self, p: Tensor, with_scale: bool = True) -> Tensor | None:
        """dW for XGrad: scale * momentum buffer (momentum, not Nesterov); None before the first step."""
        if p not in self.buffers:
            return None
        return self.scales[p] * self.buffers[p] if with_scale else self.buffers[p]


class CPropAdamReference:
    """Adam (L2 or decoupled decay, amsgrad) with ``p -= lr * scale * m_hat / (sqrt(v_hat) + eps)``; the statistics
    see the gradient Adam's moments see."""

    def __init__(
        self,
        params: Sequence[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        decoupled_weight_decay: bool = False,
        **cprop: Any,
    ) -> None:
        self.params, self.lr, self.betas, self.eps = list(params), lr, betas, eps
        self.weight_decay, self.amsgrad, self.decoupled = weight_decay, amsgrad, decoupled_weight_decay
        self.conformity = Conformity(**cprop)
        self.m: dict[Tensor, Tensor] = {}
        self.v: dict[Tensor, Tensor] = {}
        self.v_max: dict[Tensor, Tensor] = {}
        self.k: dict[Tensor, int] = {}
        self.scales: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for p in self.params:
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay and self.decoupled:
                p.mul_(1 - self.lr * self.weight_decay)
            elif self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            self.k[p] = self.k.get(p, 0) + 1
            self.m[p] = beta1 * self.m.get(p, torch.zeros_like(g)) + (1 - beta1) * g
            self.v[p] = beta2 * self.v.get(p, torch.zeros_like(g)) + (1 - beta2) * g * g
            self.v_max[p] = torch.maximum(self.v_max.get(p, self.v[p]), self.v[p])
            self.scales[p] = self.conformity.observe(p, g)
            p.sub_(self.lr * self.scales[p] * self._adam_direction(p))

    def _adam_direction(self, p: Tensor) -> Tensor:
        beta1, beta2 = self.betas
        k = self.k[p]
        second = self.v_max[p] if self.amsgrad else self.v[p]
        return (self.m[p] / (1 - beta1**k)) / ((second / (1 - beta2**k)).sqrt() + self.eps)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def direction(self, p: Tensor, with_scale: bool = True) -> Tensor | None:
        """dW for XGrad: scale * m_hat / (sqrt(v_hat) + eps) (no decoupled decay); None before the first step."""
        if p not in self.k:
            return None
        return self.scales[p] * self._adam_direction(p) if with_scale else self._adam_direction(p)


def torch_direction(optimizer: torch.optim.Optimizer, p: Tensor) -> Tensor | None:
    """dW of a torch SGD (momentum) or Adam/AdamW from its state, as the XGrad reference reads it."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    state = optimizer.state[p]
    return base_direction(state_rule(optimizer, group), group, state) if state else None


def cprop_reference(
    net: nn.Module,
    optimizer: Any,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    conformity: Conformity | None = None,
    xgrad_steps: int | None = None,
    predict_with_scale: bool = True,
    trajectory: bool = False,
    accumulate: int = 1,
    epochs: int = 1,
) -> None:
    """Train ``net`` in place with ``optimizer`` (a torch optimizer or one of the references above).

    Per optimizer step:

    1. with ``xgrad_steps = s``: W_hat = W - s * lr * scale_prev * dW for every parameter the optimizer has state
       for, where dW is the optimizer's own direction (for the CProp optimizers it includes their own scale) and
       scale_prev is ``conformity``'s scale of the parameter's last step (1 when there is no ``conformity``);
       ``predict_with_scale=False`` leaves both scales out (a wrong prediction, to show that the scale matters);
       with ``trajectory=True`` (a constant lr): W_hat = W + s * (W - W_prev) instead, W_prev the weights before the
       last step, so the update extrapolated is the one applied, CProp's scale included (no scale applied again);
    2. forward and backward at W_hat for each micro-batch of the window, each loss divided by ``accumulate``;
    3. restore W, keep W_before, ``optimizer.step()``; with ``conformity``, for each parameter with a gradient:
       fold the gradient in, and W = W_before + scale * (W - W_before); then ``zero_grad()``.
    """
    params = list(net.parameters())
    scale_prev: dict[Tensor, Tensor] = {}
    step_start: dict[Tensor, Tensor] = {}  # trajectory: the weights before the last step
    for _ in range(epochs):
        for window in windows(len(batches), accumulate):
            real: dict[Tensor, Tensor] = {}
            if xgrad_steps is not None and trajectory:
                with torch.no_grad():
                    for p in params:
                        real[p] = p.detach().clone()
                        if p in step_start:
                            p.copy_(p + xgrad_steps * (p - step_start[p]))
                        step_start[p] = real[p]
            elif xgrad_steps is not None:
                with torch.no_grad():
                    for p in params:
                        if isinstance(optimizer, torch.optim.Optimizer):
                            d, lr = torch_direction(optimizer, p), optimizer.param_groups[0]["lr"]
                        else:
                            d, lr = optimizer.direction(p, predict_with_scale), optimizer.lr
                        if d is None:
                            continue
                        if p in scale_prev and predict_with_scale:
                            d = scale_prev[p] * d
                        real[p] = p.detach().clone()
                        p.copy_(p - xgrad_steps * lr * d)
            for index in window:
                (loss_fn(net, batches[index]) / accumulate).backward()
            with torch.no_grad():
                for p, value in real.items():
                    p.copy_(value)
                before = {p: p.detach().clone() for p in params if p.grad is not None}
            optimizer.step()
            if conformity is not None:
                with torch.no_grad():
                    for p, w_before in before.items():
                        scale_prev[p] = conformity.observe(p, p.grad)
                        p.copy_(w_before + (p - w_before) * scale_prev[p])
            optimizer.zero_grad()
