"""The fallback rule for any optimizer: dW * lr = the update the optimizer actually applied at its last step.

With ``W_prev`` the weights before the last step (still held by the snapshot) and ``W`` the weights now,
``lr_then * dW = W_prev - W``, so ``W_hat = W + steps * (lr_now / lr_then) * (W - W_prev)``. It includes everything
the optimizer did (decoupled decay, clipping, any custom logic); for Adam and SGD-momentum with a constant lr and no
decoupled decay it equals the state rule up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._foreach import chunk_slices


def extrapolate_(params: list[Tensor], previous: list[Tensor], factor: float) -> None:
    """In place: ``previous <- params`` (exactly) and ``params <- params + factor * (params - previous_old)``."""
    for part in chunk_slices(params):
        delta = torch._foreach_sub(params[part], previous[part])
        torch._foreach_copy_(previous[part], params[part])
        torch._foreach_add_(params[part], delta, alpha=factor)
        del delta  # one chunk of temporaries alive at a time


def rewind_(params: list[Tensor], previous: list[Tensor], factor: float) -> None:
    """Undo :func:`extrapolate_` for a step that never happened: ``params <- previous`` (exactly, the real weights) and
    ``previous <- previous - (params_old - previous) / factor``, the weights before the last step again up to rounding,
    so the next prediction can still extrapolate along the last applied update."""
    for part in chunk_slices(params):
        delta = torch._foreach_sub(params[part], previous[part])
        torch._foreach_copy_(params[part], previous[part])
        torch._foreach_add_(previous[part], delta, alpha=-1.0 / factor)
        del delta
