"""An independent plain-PyTorch reference of the adaptive heavy-ball optimizers and of XGrad with them.

Written from the formulas alone (arXiv 2110.09057 as stated in ``shared/DESIGN.md``), one tensor at a time, sums in
float64; it imports nothing from ``lightning_xgrad``. Per param group, at step k::

    L_k    = ||g_k - g_{k-1}|| / ||x_k - x_{k-1}||      (norms over the group's parameters; x = where g was taken)
    beta_k = 0                                        at the first step (one gradient only)
           = beta_{k-1}                               if x_k == x_{k-1}
           = min(max((1 - sqrt(lr * L_k))^2, 0), 1 - delta)   otherwise

SGD form: ``buf = beta_k * buf + (g + weight_decay * p); p -= lr * buf`` (buf starts at 0).
Adam form: ``p *= 1 - lr * weight_decay; m = beta_k * m + (1 - beta_k) * g; v = beta2 * v + (1 - beta2) * g^2;
p -= lr * (m / (1 - beta_1 * ... * beta_t)) / (sqrt(v / (1 - beta2^t)) + eps)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class HeavyBallReference:
    """The optimizer, for groups given as dicts: ``params`` (tensors), ``lr``, ``delta``, ``weight_decay`` and, for
    ``kind="adam"``, ``beta2`` and ``eps``. Every parameter must have a gradient at every step."""

    def __init__(self, groups: list[dict[str, Any]], kind: str) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(kind)
        self.kind = kind
        self.groups = groups
        self.beta = [0.0 for _ in groups]  # the last beta of each group
        self.previous_grad: list[list[Tensor] | None] = [None for _ in groups]
        self.previous_point: list[list[Tensor] | None] = [None for _ in groups]
        self.buf: dict[int, Tensor] = {}  # SGD momentum buffer / Adam m, by id of the parameter
        self.v: dict[int, Tensor] = {}
        self.product: dict[int, float] = {}  # beta_1 * ... * beta_t
        self.t = 0

    def secant_beta(self, index: int, points: list[Tensor], grads: list[Tensor]) -> float:
        """beta_k of a group from this step's points and gradients (also remembers them for the next step)."""
        group = self.groups[index]
        previous_points, previous_grads = self.previous_point[index], self.previous_grad[index]
        self.previous_point[index] = [x.detach().clone() for x in points]
        self.previous_grad[index] = [g.detach().clone() for g in grads]
        if previous_points is None or previous_grads is None:
            return 0.0
        distance = sum(
            float((x.double() - y.double()).square().sum()) for x, y in zip(points, previous_points, strict=True)
        )
        difference = sum(
            float((g.double() - h.double()).square().sum()) for g, h in zip(grads, previous_grads, strict=True)
        )
        if distance == 0:
            return self.beta[index]
        curvature = math.sqrt(difference / distance)
        return min(max((1 - math.sqrt(group["lr"] * curvature)) ** 2, 0.0), 1 - group["delta"])

    @torch.no_grad()
    def step(self, points: list[list[Tensor]] | None = None) -> None:
        """One step with the gradients in ``p.grad``; ``points[i][j]``: where parameter j of group i got it (default:
        the parameters themselves)."""
        self.t += 1
        for index, group in enumerate(self.groups):
            params = group["params"]
            grads = [p.grad.detach().clone() for p in params]
            group_points = [p.detach() for p in params] if points is None else points[index]
            beta = self.beta[index] = self.secant_beta(index, group_points, grads)
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p, g in zip(params, grads, strict=True):
                key = id(p)
                if self.kind == "sgd":
                    g = g + weight_decay * p
                    self.buf[key] = beta * self.buf.get(key, torch.zeros_like(p)) + g
                    p -= lr * self.buf[key]
                else:
                    p *= 1 - lr * weight_decay
                    self.buf[key] = beta * self.buf.get(key, torch.zeros_like(p)) + (1 - beta) * g
                    self.v[key] = group["beta2"] * self.v.get(key, torch.zeros_like(p)) + (1 - group["beta2"]) * g * g
                    self.product[key] = self.product.get(key, 1.0) * beta
                    p -= lr * self.direction(group, p)

    def direction(self, group: dict[str, Any], p: Tensor) -> Tensor:
        """dW per unit lr of the last step: buf (SGD), the bias-corrected Adam direction (Adam)."""
        key = id(p)
        if self.kind == "sgd":
            return self.buf[key]
        m_hat = self.buf[key] / (1 - self.product[key])
        v_hat = self.v[key] / (1 - group["beta2"] ** self.t)
        return m_hat / (v_hat.sqrt() + group["eps"])


LossFn = Callable[[nn.Module, Any], Tensor]


def heavy_ball_xgrad_reference(
    net: nn.Module,
    optimizer: HeavyBallReference,
    batches: Sequence[Any],
    loss_fn: LossFn,
    steps: int | None,
    epochs: int = 1,
    secant_at: str = "gradient_point",
) -> None:
    """Train ``net`` with XGrad over ``optimizer`` (a reference whose groups hold ``net``'s parameters).

    Per batch: once a step was taken, W_hat = W - s * lr * dW; loss and gradient at W_hat; restore W; step, with the
    secant at W_hat (``secant_at="gradient_point"``) or, to show that the choice matters, at the real W
    (``secant_at="real"``). ``steps=None`` trains without prediction.
    """
    for _ in range(epochs):
        for batch in batches:
            real: list[list[Tensor]] = [[p.detach().clone() for p in g["params"]] for g in optimizer.groups]
            if steps is not None and optimizer.t > 0:
                with torch.no_grad():
                    for group in optimizer.groups:
                        for p in group["params"]:
                            p -= steps * group["lr"] * optimizer.direction(group, p)
            loss_fn(net, batch).backward()
            points = [[p.detach().clone() for p in g["params"]] for g in optimizer.groups]
            with torch.no_grad():
                for group, values in zip(optimizer.groups, real, strict=True):
                    for p, value in zip(group["params"], values, strict=True):
                        p.copy_(value)
            optimizer.step(points if secant_at == "gradient_point" else real)
            net.zero_grad()
