"""The arguments OptimizerPredictor and the callbacks built on it share: their types, and their checks with one
message format (a TypeError for a wrong type, a ValueError for a wrong value, naming both)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from .._internal.optimizers import unwrap_optimizer
from .._internal.validation import argument_error, check_choice, check_flag, check_int

__all__ = ["CLOSURE_REEVALUATING", "RULE_CHOICES", "RuleChoice", "check_optimizer", "check_prediction_args"]

RuleChoice = Literal["auto", "trajectory"]
RULE_CHOICES: tuple[str, ...] = get_args(RuleChoice)
#: optimizers whose step evaluates the closure several times: after the first evaluation the gradients would be
#: taken at the real weights, so XGrad cannot work with them
CLOSURE_REEVALUATING: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.LBFGS,)


def check_prediction_args(
    owner: str, steps: Any, rule: Any, compile: Any, chunk_bytes: Any, compile_min_bytes: Any
) -> None:
    """The checks of the arguments :class:`OptimizerPredictor` and the callbacks built on it share, with one
    message format: a TypeError for a wrong type, a ValueError for a wrong value, naming both."""
    check_int(owner, "steps", steps, minimum=1)
    check_choice(owner, "rule", rule, RULE_CHOICES)
    check_flag(owner, "compile", compile)
    check_int(owner, "chunk_bytes", chunk_bytes, minimum=0, allow_none=True)
    check_int(owner, "compile_min_bytes", compile_min_bytes, minimum=0)


def check_optimizer(owner: str, optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer inside Fabric's or Lightning's wrapper, if any; refuses what is not a ``torch.optim.Optimizer``
    (TypeError) and optimizers that re-evaluate the closure (ValueError)."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise argument_error(owner, "optimizer", "a torch.optim.Optimizer", optimizer, TypeError)
    if isinstance(inner, CLOSURE_REEVALUATING):
        raise argument_error(
            owner,
            "optimizer",
            "an optimizer whose step evaluates the closure at most once (LBFGS re-evaluates it, so its gradients "
            "would be taken at the real weights)",
            optimizer,
        )
    return inner
