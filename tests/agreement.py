"""How the tests compare trained weights: one agreement tolerance, one separation, one loss.

A Lightning fit and the plain-PyTorch reference loop that replays it (same initial weights, same batches) must end
within float32 rounding of each other: RTOL and ATOL (the largest difference observed over the equivalence cases is
below 1e-6, the prediction's rounding compounded over ~25 steps; many cases are bit-identical). Two runs that must
differ (with and without XGrad, a state rule against the trajectory rule) must end SEPARATION times that tolerance
apart, so a callback that silently stopped predicting cannot pass. Tests with other needs (float64 hand
computations, half precision) keep their own tolerances next to the reason.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

RTOL, ATOL = 1e-5, 1e-6
SEPARATION = 100


def assert_close(got: Tensor, expected: Tensor) -> None:
    """``got`` agrees with ``expected`` (cast to ``got``'s dtype) to the agreement tolerance."""
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=RTOL, atol=ATOL)


def assert_far(a: Tensor, b: Tensor, what: str, tolerance: float | None = None) -> None:
    """``a`` and ``b`` differ by more than SEPARATION times ``tolerance`` (by default the agreement tolerance at
    ``b``'s scale, ``ATOL + RTOL * max |b|``)."""
    if tolerance is None:
        tolerance = ATOL + RTOL * b.abs().max().item()
    gap = (a - b).abs().max().item()
    assert gap > SEPARATION * tolerance, (
        f"{what}: max |diff| {gap:.3g} is not > {SEPARATION} x tolerance {tolerance:.3g}"
    )


def mse(net: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The loss the reference loops train with, in the net's dtype: for float32 nets what
    ``toolkit.TinyModule.training_step`` computes; float64 references stay in float64."""
    x, y = batch
    return nn.functional.mse_loss(net(x), y)
