"""Rules for the adaptive heavy-ball optimizers (``lightning_xgrad.heavy_ball.optim``): dW includes the latest beta_k.

``AdaptiveHeavyBallSGD`` applies ``p -= lr * buf`` with ``buf = beta_k * buf + g``, so dW is the momentum buffer, as
for torch's SGD. ``AdaptiveHeavyBallAdam`` applies ``p -= lr * m_hat / (sqrt(v_hat) + eps)`` with
``m_hat = m / (1 - P_t)``, P_t the product of the momenta it used (kept in the state as ``beta1_product``), and
``v_hat = v / (1 - beta2^t)``. Both directions are those of the last step, so the prediction uses the beta_k that step
computed; the next beta is not known before the next gradient. Decoupled weight decay is left out of dW, as for AdamW.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .._internal.chunks import Chunks
from ..rules.base import PredictionRule
from ..rules.momentum import MomentumBufferRule
from .optim import add_heavy_ball_adam_direction_


class HeavyBallSGDRule(MomentumBufferRule):
    """``AdaptiveHeavyBallSGD``: dW = ``state["momentum_buffer"]`` (every param group)."""

    name = "heavy_ball_sgd"


class HeavyBallAdamRule(PredictionRule):
    """``AdaptiveHeavyBallAdam``: dW = ``(m / (1 - P_t)) / (sqrt(v / (1 - beta2^t)) + eps)``."""

    name = "heavy_ball_adam"
    step_column = 2

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "step" not in state:
            return None
        return state["exp_avg"], state["exp_avg_sq"], state["step"], state["beta1_product"]

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        exp_avgs, exp_avg_sqs, steps, products = columns
        beta2, eps = group["beta2"], group["eps"]
        add_heavy_ball_adam_direction_(
            params, exp_avgs, exp_avg_sqs, steps.floats(), products, beta2, eps, alpha, chunks
        )
