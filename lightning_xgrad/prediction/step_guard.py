"""The step hooks an OptimizerPredictor puts on its optimizer: the real weights go back before the update, an update
that landed on W_hat is an error, and a requested measurement of the update runs after it.

The hooks hold the predictor weakly: the optimizer must not keep a finished predictor alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

from .._internal.optimizers import step_closure, with_closure
from .quality import HeldPrediction, PredictionQuality

if TYPE_CHECKING:
    from .predictor import OptimizerPredictor

__all__ = ["Measurement", "check_after_step", "measure_after_step", "restore_before_step"]


class Measurement:
    """A measurement of the next update asked for: where the result goes, the budget of the copy, the copy."""

    def __init__(self, report: Callable[[PredictionQuality], None], max_bytes: int | None, owner: str, name: str):
        self.report = report
        self.max_bytes = max_bytes
        self.owner = owner
        self.name = name
        self.held: HeldPrediction | None = None
        self.handles: list[RemovableHandle] = []
        self.done = False


def restore_before_step(predictor: OptimizerPredictor) -> Callable[..., Any]:
    """A step pre-hook: the real weights go back before the update. A step without a closure has its gradients
    already (a raw ``step()``, AMP's ``scaler.step``): restore now. A step with one computes them in the closure
    (Lightning's closure restores from ``on_before_optimizer_step`` inside it): restore once the closure returns."""
    reference = weakref.ref(predictor)

    def hook(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        live = reference()
        if live is None or live.phase == "idle":
            return None
        closure = step_closure(args, kwargs)
        if closure is None:
            live.restore(stepped=True)
            return None

        def closure_then_restore() -> Any:
            result = closure()
            again = reference()
            if again is not None:
                again.restore(stepped=True)
            return result

        return with_closure(args, kwargs, closure_then_restore)

    return hook


def check_after_step(predictor: OptimizerPredictor) -> Callable[..., None]:
    """A step post-hook: an update applied while the parameters still hold W_hat (an optimizer step that did not
    call its closure) would be discarded by the restore: an error rather than a silent loss."""
    reference = weakref.ref(predictor)

    def hook(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        live = reference()
        if live is not None and live.phase != "idle":
            raise RuntimeError(
                f"OptimizerPredictor: {type(live.optimizer).__name__} stepped while its parameters held predicted "
                "weights (its step did not call the closure it was given, after which the real weights go back), so "
                "its update was applied to W_hat and would be lost at the restore. Call restore() before the step."
            )

    return hook


def measure_after_step(predictor: OptimizerPredictor) -> Callable[..., None]:
    reference = weakref.ref(predictor)

    def hook(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        live = reference()
        if live is not None:
            live._measure()  # the predictor's own step hook, from its own folder

    return hook
