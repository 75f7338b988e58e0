"""Renamed :mod:`lightning_xgrad.rules.compiled` (its kernels are ``torch.compile``d, not fused in torch.optim's
sense); this alias keeps the old import path working, with a ``DeprecationWarning``, until the first release."""

from __future__ import annotations

import warnings

from .compiled import CompiledPrediction, ScalarsOf, adam_kernel, momentum_kernel

__all__ = ["CompiledPrediction", "ScalarsOf", "adam_kernel", "momentum_kernel"]

warnings.warn(
    "lightning_xgrad.rules.fused was renamed lightning_xgrad.rules.compiled; import from there",
    DeprecationWarning,
    stacklevel=2,
)
