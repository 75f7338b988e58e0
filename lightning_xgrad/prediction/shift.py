"""How far a prediction moved the weights: ``||W_hat - W|| / ||W||`` over every predicted parameter, on all ranks.

Computed from the local tensors each rank holds; with sharded (DTensor) parameters the squared norms are summed over
the ranks (one ``all_reduce``), counting replicated elements once. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .._internal.chunks import chunk_slices
from .._internal.sharding import sum_over_ranks

__all__ = ["relative_shift"]


@torch.no_grad()
def relative_shift(predicted: Sequence[tuple[Tensor, Tensor, Tensor]], chunk_bytes: int | None = None) -> float:
    """``||W_hat - W|| / ||W||`` from ``(parameter, predicted local tensor, real local value)`` triples (what
    :meth:`~lightning_xgrad.OptimizerPredictor.predicted_params` returns); needs at least one triple. The differences
    are formed one chunk of at most ``max(largest tensor, chunk_bytes)`` bytes at a time (by default the
    budget of the tensors' device)."""
    predicted_values = [local for _, local, _ in predicted]
    real = [value for _, _, value in predicted]
    shift = torch.stack([d.float().square().sum() for d in _differences(predicted_values, real, chunk_bytes)])
    norm = torch.stack([r.float().square().sum() for r in real])
    # logging steps only: with sharded parameters, one all_reduce of the two sums (replicated elements counted once)
    shift_squares, real_squares = sum_over_ranks([p for p, _, _ in predicted], torch.stack([shift, norm], dim=1))
    return float(shift_squares.sqrt() / real_squares.sqrt().clamp_min(1e-30))


def _differences(values: list[Tensor], real: list[Tensor], chunk_bytes: int | None) -> Iterator[Tensor]:
    """``values[i] - real[i]`` in order, one chunk of them alive at a time."""
    for part in chunk_slices(values, chunk_bytes):
        yield from torch._foreach_sub(values[part], real[part])
