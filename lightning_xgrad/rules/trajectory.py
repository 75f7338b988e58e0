"""The rule for any optimizer: dW * lr = the update the optimizer actually applied at its last step.

With ``W_prev`` the weights before the last step (still held by the snapshot) and ``W`` the weights now,
``lr_then * dW = W_prev - W``, so ``W_hat = W + steps * (lr_now / lr_then) * (W - W_prev)``. It includes everything
the optimizer did (decoupled decay, clipping, any custom logic); for Adam and SGD-momentum with a constant lr and no
decoupled decay it equals the state rule up to float rounding. A group whose lr is not a number (optimizers with a
relative step size keep ``lr=None``) is extrapolated without rescaling, ``W_hat = W + steps * (W - W_prev)``.

Nothing here divides: the caller forms the factor ``steps * lr_now / lr_then`` only for a nonzero ``lr_then``, and a
step that never happens is undone by keeping the displacement the prediction applied (:meth:`TrajectoryRule.rewind_`),
not by dividing it by the factor, which is 0 when the lr is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._internal.chunks import Chunks

__all__ = ["TRAJECTORY", "TrajectoryRule"]


class TrajectoryRule:
    """The trajectory rule: reads no state, so it handles every param group of every optimizer. Its memory (the
    weights before the last update and that update's lr) is kept by the caller, in the snapshot buffers."""

    name = "trajectory"
    #: the counterpart of the state rules' ``reads_state``
    reads_state = False

    def handles(self, group: dict[str, Any]) -> bool:
        return True

    @staticmethod
    def lr(value: Any) -> float:
        """The lr the rule rescales by: the group's lr when it is a number, else 1.0 (no rescaling: an optimizer that
        keeps ``lr=None`` sizes its steps itself, and the applied update already says how far it went)."""
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return 1.0

    @staticmethod
    def extrapolate_(params: list[Tensor], previous: list[Tensor], factor: float, chunks: Chunks) -> None:
        """In place: ``previous <- params`` (exactly) and ``params <- params + factor * (params - previous_old)``."""
        for part in chunks:
            delta = torch._foreach_sub(params[part], previous[part])
            torch._foreach_copy_(previous[part], params[part])
            torch._foreach_add_(params[part], delta, alpha=factor)
            del delta  # one chunk of temporaries alive at a time

    @staticmethod
    def rewind_(params: list[Tensor], previous: list[Tensor], chunks: Chunks) -> None:
        """Undo :meth:`extrapolate_` for a step that never happened, without dividing by its factor.

        In place: ``params <- previous`` (exactly: the real weights ``W``) and ``previous <- W - (W_hat - W)``. The
        displacement ``W - previous`` is then the one the prediction applied, ``factor`` times the last update: the
        caller books it at ``factor * lr_then = steps * lr_now``, so the next prediction extrapolates along the same
        update.
        """
        for part in chunks:
            delta = torch._foreach_sub(params[part], previous[part])
            torch._foreach_copy_(params[part], previous[part])
            torch._foreach_sub_(previous[part], delta)
            del delta

    def __repr__(self) -> str:
        return "TrajectoryRule()"


#: the one instance every caller shares
TRAJECTORY = TrajectoryRule()
