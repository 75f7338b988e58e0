"""The private torch and Lightning APIs the package relies on, each behind one function here.

Tested from torch 2.6 and Lightning 2.5 (the floors in pyproject.toml) to torch 2.14 and Lightning 2.6:
``tools/compat.py`` runs the suite on those stacks, and tests/test_compat.py checks each accessor against what the
package assumes of it. Each function names what it reaches into and why no public API does the job; when a release
moves one of them, this module is the one to change.
Nothing here imports Lightning: the Lightning accessors take the Trainer they are given, so the optimizers, the rules
and the predictor import with torch alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import _default_to_fused_or_foreach, _get_scalar_dtype, _view_as_real

__all__ = [
    "TESTED_LIGHTNING",
    "TESTED_TORCH",
    "backward_is_skipped",
    "batches_that_stepped",
    "foreach_by_default",
    "group_by_device_and_dtype",
    "new_step_count",
    "should_accumulate",
    "trainer_callbacks",
    "view_as_real_",
]

#: the oldest and the newest minor releases these accessors are tested with (tools/compat.py's stacks)
TESTED_TORCH = ("2.6", "2.14")
TESTED_LIGHTNING = ("2.5", "2.6")


# ---------------------------------------------------------------------------------------------------------- torch
def foreach_by_default(params: list[Tensor]) -> bool:
    """Whether torch's own optimizers would pick their foreach implementation for ``params`` (on CUDA and other
    accelerators, not on the CPU): ``torch.optim.optimizer._default_to_fused_or_foreach``."""
    return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]


def new_step_count() -> Tensor:
    """A step counter as torch's optimizers keep it: a 0-dim float tensor on the CPU (reading it costs no device sync),
    float64 when that is the default dtype (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.tensor(0.0, dtype=_get_scalar_dtype())


def view_as_real_(params: list[Tensor], *others: list[Tensor]) -> None:
    """In place, in every list: each complex tensor (by ``params``) becomes its real view, real and imaginary parts as
    independent coordinates, as torch's optimizers treat them (``torch.optim.optimizer._view_as_real``)."""
    _view_as_real(params, *others)


def group_by_device_and_dtype(
    columns: Sequence[Sequence[Tensor | None]],
) -> list[tuple[list[list[Any]], list[int]]]:
    """The columns (parallel lists, one entry per parameter) split by the device and dtype of the first column's
    tensors, each part with the indices its entries had: ``Optimizer._group_tensors_by_device_and_dtype``, which
    torch's foreach optimizers use (``None`` entries, such as missing momentum buffers, are kept)."""
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        cast(list[list[Tensor | None]], [list(column) for column in columns]), with_indices=True
    )
    return [(cast(list[list[Any]], tensors), indices) for tensors, indices in grouped.values()]


# ------------------------------------------------------------------------------------------------------ Lightning
def should_accumulate(trainer: Any) -> bool:
    """Whether the batch the Trainer is on does not end an accumulation window (no optimizer step follows it):
    ``fit_loop.epoch_loop._should_accumulate()``, which decides it in Lightning itself."""
    return bool(trainer.fit_loop.epoch_loop._should_accumulate())


def backward_is_skipped(trainer: Any) -> bool:
    """Whether this epoch runs no backward pass and no optimizer step (StochasticWeightAveraging's last epoch only
    recomputes BatchNorm statistics): ``fit_loop._skip_backward``."""
    return bool(trainer.fit_loop._skip_backward)


def batches_that_stepped(trainer: Any) -> int:
    """The step Lightning labels this batch's own logged metrics with (what LearningRateMonitor logs at):
    ``fit_loop.epoch_loop._batches_that_stepped``."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def trainer_callbacks(trainer: Any) -> list[Any]:
    """``trainer.callbacks`` (public, but set outside ``Trainer.__init__``'s annotations, so type checkers miss it);
    an empty list for anything without callbacks."""
    return list(getattr(trainer, "callbacks", None) or ())
