"""Reading hyper-parameters and per-parameter step counts as Python floats, without a device sync where possible."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["ScalarColumn", "as_float", "on_accelerator", "step_counts_as_floats", "uniform"]


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


def on_accelerator(step_counts: Sequence[Any]) -> bool:
    """Whether per-parameter step counts live on an accelerator (capturable or fused optimizers), where reading them
    on the host would wait for the device: the rules then compute their bias corrections with tensor ops instead."""
    return bool(step_counts) and isinstance(step_counts[0], Tensor) and step_counts[0].device.type != "cpu"


def step_counts_as_floats(step_counts: Sequence[Any]) -> list[float]:
    """Per-parameter step counts as floats (Python numbers, or tensors; a :class:`ScalarColumn` reads fastest)."""
    if isinstance(step_counts, ScalarColumn):
        return step_counts.floats()
    return [float(s) for s in step_counts]


def uniform(values: list[float]) -> float | list[float]:
    """One scalar when every value is the same (the usual case: a group's parameters share their step count), so
    foreach ops take their cheaper scalar overload; else the list."""
    first = values[0]
    return first if all(v == first for v in values) else values
