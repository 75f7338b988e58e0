"""How to predict: one rule per optimizer family, a registry from optimizer classes to rules, and the fallback.

Rules are pure torch and never import Lightning. The registry matches the optimizer's exact class: a subclass may
change the update, so it gets the trajectory rule (always correct) unless a rule is registered for it. Fabric's and
Lightning's optimizer wrappers (``FabricAdamW``, ``LightningAdamW``) are subclasses too, but known ones that change
nothing: the lookup takes the optimizer inside them (recognised by class path, without importing Lightning). Rules for
optimizers of other packages are registered by the optimizer's class path and imported on first use, so
lightning_xgrad never imports those packages itself.
"""

from __future__ import annotations

import importlib

import torch

from .._internal.optimizers import unwrap_optimizer
from .._internal.validation import argument_error
from .adam import AdamRule
from .adamax import AdamaxRule
from .base import PredictionRule
from .momentum import MomentumBufferRule, RMSpropRule, SGDRule
from .radam import RAdamRule
from .trajectory import TRAJECTORY, TrajectoryRule

_REGISTRY: dict[type[torch.optim.Optimizer], PredictionRule] = {
    torch.optim.SGD: SGDRule(),
    torch.optim.Adam: AdamRule(),
    torch.optim.AdamW: AdamRule(),
    torch.optim.RMSprop: RMSpropRule(),
    torch.optim.Adamax: AdamaxRule(),
    torch.optim.RAdam: RAdamRule(),
}

#: "module.Class" of an optimizer -> "module:RuleClass", resolved when an optimizer of that class first shows up
_BY_CLASS_PATH: dict[str, str] = {
    "lightning_xgrad.optim.adam3.AdaM3": "lightning_xgrad.rules.adam3:AdaM3Rule",
    "pytorch_optimizer.optimizer.adabelief.AdaBelief": "lightning_xgrad.rules.adabelief:AdaBeliefRule",
    "lightning_xgrad.cprop.optim.CPropSGD": "lightning_xgrad.cprop.rules:CPropSGDRule",
    "lightning_xgrad.cprop.optim.CPropAdam": "lightning_xgrad.cprop.rules:CPropAdamRule",
    "lightning_xgrad.heavy_ball.optim.AdaptiveHeavyBallSGD": "lightning_xgrad.heavy_ball.rules:HeavyBallSGDRule",
    "lightning_xgrad.heavy_ball.optim.AdaptiveHeavyBallAdam": "lightning_xgrad.heavy_ball.rules:HeavyBallAdamRule",
}


def register_rule(optimizer_class: type[torch.optim.Optimizer], rule: PredictionRule) -> None:
    """Teach XGrad how to read dW from ``optimizer_class``'s state (replaces any rule registered before)."""
    if not isinstance(optimizer_class, type):
        raise argument_error("register_rule", "optimizer_class", "a class", optimizer_class, TypeError)
    if not isinstance(rule, PredictionRule):
        raise argument_error("register_rule", "rule", "a PredictionRule", rule, TypeError)
    _REGISTRY[optimizer_class] = rule


def rule_for(optimizer: torch.optim.Optimizer) -> PredictionRule | None:
    """The state rule registered for this optimizer's exact class, or ``None`` when none is (the trajectory rule then
    applies); Fabric's and Lightning's wrappers are looked through. The caller binds it
    (:meth:`PredictionRule.bind`)."""
    cls = type(unwrap_optimizer(optimizer))
    rule = _REGISTRY.get(cls)
    if rule is None and (target := _BY_CLASS_PATH.get(f"{cls.__module__}.{cls.__qualname__}")) is not None:
        module_name, _, rule_name = target.partition(":")
        rule = getattr(importlib.import_module(module_name), rule_name)()
        _REGISTRY[cls] = rule
    return rule


__all__ = [
    "TRAJECTORY",
    "AdamRule",
    "AdamaxRule",
    "MomentumBufferRule",
    "PredictionRule",
    "RAdamRule",
    "RMSpropRule",
    "SGDRule",
    "TrajectoryRule",
    "register_rule",
    "rule_for",
]
