"""Rule for AdaM3 (``lightning_xgrad.optim.AdaM3``): dW = m_hat / sqrt(v / (1 - b2^k)), the direction it applies.

``m_hat = m / (1 - b1^k)`` at the current step count k; v is the state's ``exp_avg_sq``, which already holds
``b2 * v + (1 - b2) * m^2 + eps`` (AdaM3 adds eps into its state, as the official code does), so there is no eps
outside the square root: this is Adam's direction with eps = 0, read from the same state names. Coupled (L2) weight
decay and ``maximize`` are already inside m; decoupled decay is left out of dW, as for AdamW.
"""

from __future__ import annotations

from typing import Any

from .adam import AdamRule


class AdaM3Rule(AdamRule):
    """AdaM3 (any weight decay mode, ``maximize``, ``foreach``)."""

    name = "adam3"

    def outer_eps(self, group: dict[str, Any]) -> float:
        return 0.0
