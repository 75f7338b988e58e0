"""Reading hyper-parameters and per-parameter step counts as Python floats, without a device sync where possible."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepCounts", "as_float", "one_minus_powers", "uniform"]


def as_float(value: Any) -> float:
    """A hyper-parameter as a Python float; tensors kept on the CPU (torch's default for lr and step) cost no sync."""
    if isinstance(value, Tensor):
        return float(value.item())
    return float(value)


class StepCounts:
    """The step count of each tensor of a bucket, as the optimizer keeps it (torch: one 0-dim tensor per parameter),
    read as floats without a device sync.

    Counts on the CPU (torch's default) are read through NumPy views taken once, a tenth of what ``float()`` costs per
    tensor; the optimizer updates them in place, so the views keep showing the current counts. Counts on an
    accelerator (capturable or fused optimizers) cannot be read without waiting for the device: ``host_readable`` is
    then False and a rule computes its bias corrections from :attr:`tensors` with tensor ops instead.
    """

    def __init__(self, counts: Sequence[Any]) -> None:
        #: the counts as the optimizer holds them
        self.tensors = list(counts)
        on_device = any(isinstance(c, Tensor) and c.device.type != "cpu" for c in self.tensors)
        self._views: list[Any] | None = None
        if not on_device and all(isinstance(c, Tensor) and c.numel() == 1 and not c.is_complex() for c in counts):
            try:
                self._views = [c.detach().numpy() for c in self.tensors]
            except (RuntimeError, TypeError):  # no NumPy, or a tensor NumPy cannot view
                self._views = None
        self._on_device = on_device

    @property
    def host_readable(self) -> bool:
        """Whether :meth:`floats` can read the counts without a device sync (they are not on an accelerator)."""
        return not self._on_device

    def floats(self) -> list[float]:
        """The counts as Python floats (on an accelerator this waits for the device: check :attr:`host_readable`)."""
        if self._views is not None:
            return [float(v) for v in self._views]
        return [float(c) for c in self.tensors]

    def __len__(self) -> int:
        return len(self.tensors)


def one_minus_powers(base: float, exponents: Sequence[Tensor]) -> list[Tensor]:
    """``1 - base ** k`` for every 0-dim tensor ``k``, computed where the tensors are (no sync): the bias corrections
    of step counts kept on an accelerator."""
    powers = torch._foreach_pow(base, list(exponents))
    torch._foreach_neg_(powers)
    torch._foreach_add_(powers, 1.0)
    return list(powers)


def uniform(values: list[float]) -> float | list[float]:
    """One scalar when every value is the same (the usual case: a group's parameters share their step count), so
    foreach ops take their cheaper scalar overload; else the list."""
    first = values[0]
    return first if all(v == first for v in values) else values
