"""Tensor lists for foreach ops: their type, and walking them in chunks so that out-of-place temporaries stay small."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor

__all__ = ["TensorList", "chunk_slices"]

#: what torch's foreach ops take, and return (out-of-place ones return tuples)
TensorList = list[Tensor] | tuple[Tensor, ...]


def chunk_slices(tensors: Sequence[Tensor], budget_numel: int | None = None) -> Iterator[slice]:
    """Consecutive slices of ``tensors`` whose element count stays within a budget.

    Out-of-place foreach ops allocate one temporary per input tensor; walking the list in chunks keeps the
    transient memory at most the budget, by default the largest single tensor, while still launching one foreach
    kernel per chunk rather than one per tensor.
    """
    if not tensors:
        return
    numels = [t.numel() for t in tensors]
    budget = max(numels) if budget_numel is None else max(budget_numel, max(numels))
    start, used = 0, 0
    for i, n in enumerate(numels):
        if used + n > budget and i > start:
            yield slice(start, i)
            start, used = i, 0
        used += n
    yield slice(start, len(tensors))
