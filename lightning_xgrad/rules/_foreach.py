"""Small helpers shared by rules and the snapshot: chunking lists so temporaries stay small, scalar reads."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

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


class ScalarColumn(list):
    """A column of 0-dim CPU tensors (torch's per-parameter ``step``), read back in microseconds.

    The predictor builds its columns once per plan; optimizers update ``step`` in place, so NumPy views taken here
    keep showing the current counts. A Python float per tensor per step through ``.item()`` costs about 0.5 us each,
    the views a tenth of that.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        super().__init__(tensors)
        try:
            self._views: list[Any] | None = [t.detach().numpy() for t in tensors]
        except (RuntimeError, TypeError):  # no NumPy, or a tensor NumPy cannot view
            self._views = None

    @staticmethod
    def suits(column: Sequence[Any]) -> bool:
        """Whether every entry is a one-element tensor on the CPU."""
        return bool(column) and all(
            isinstance(t, Tensor) and t.device.type == "cpu" and t.numel() == 1 and not t.is_complex() for t in column
        )

    def floats(self) -> list[float]:
        if self._views is None:
            return [float(t) for t in self]
        return [float(v) for v in self._views]


def steps_as_floats(steps: Sequence[Any]) -> list[float]:
    """Per-parameter step counts as floats (Python numbers, or tensors; a :class:`ScalarColumn` reads fastest)."""
    if isinstance(steps, ScalarColumn):
        return steps.floats()
    return [float(s) for s in steps]


def uniform(values: list[float]) -> float | list[float]:
    """One scalar when every value is the same (the usual case: a group's parameters share their step count), so
    foreach ops take their cheaper scalar overload; else the list."""
    first = values[0]
    return first if all(v == first for v in values) else values
