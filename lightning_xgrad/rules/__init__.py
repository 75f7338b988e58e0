"""How to predict: one rule per optimizer family, a registry from optimizer classes to rules, and the fallback.

Rules are pure torch and never import Lightning. The registry matches the optimizer's exact class: a subclass may
change the update, so it gets the trajectory rule (always correct) unless a rule is registered for it.
"""

from __future__ import annotations

import torch

from .adam import AdamRule
from .base import PredictionRule
from .momentum import MomentumBufferRule, RMSpropRule, SGDRule
from .trajectory import extrapolate_, rewind_

_REGISTRY: dict[type[torch.optim.Optimizer], PredictionRule] = {
    torch.optim.SGD: SGDRule(),
    torch.optim.Adam: AdamRule(),
    torch.optim.AdamW: AdamRule(),
    torch.optim.RMSprop: RMSpropRule(),
}


def register_rule(optimizer_class: type[torch.optim.Optimizer], rule: PredictionRule) -> None:
    """Teach XGrad how to read dW from ``optimizer_class``'s state (replaces any rule registered before)."""
    if not isinstance(optimizer_class, type):
        raise TypeError(f"register_rule: optimizer_class must be a class, got {optimizer_class!r}")
    if not isinstance(rule, PredictionRule):
        raise TypeError(f"register_rule: rule must be a PredictionRule, got {type(rule).__name__}")
    _REGISTRY[optimizer_class] = rule


def rule_for(optimizer: torch.optim.Optimizer) -> PredictionRule | None:
    """The state rule registered for this optimizer's exact class, or ``None`` for the trajectory rule."""
    return _REGISTRY.get(type(optimizer))


__all__ = [
    "AdamRule",
    "MomentumBufferRule",
    "PredictionRule",
    "RMSpropRule",
    "SGDRule",
    "extrapolate_",
    "register_rule",
    "rewind_",
    "rule_for",
]
