"""Small helpers shared by rules and the snapshot: chunking lists so temporaries stay small, scalar reads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


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


def as_float(value: Any) -> float:
    """A hyper-parameter as a Python float; tensors kept on the CPU (torch's default for lr and step) cost no sync."""
    if isinstance(value, Tensor):
        return float(value.item())
    return float(value)


def steps_as_floats(steps: Sequence[Any]) -> list[float]:
    """Per-parameter step counts as floats, read in one op when they are tensors (torch keeps ``step`` as one)."""
    if steps and isinstance(steps[0], Tensor):
        return torch.stack([s.detach().reshape(()).to("cpu", torch.float64) for s in steps]).tolist()
    return [float(s) for s in steps]
