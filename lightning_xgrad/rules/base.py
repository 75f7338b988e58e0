"""The contract every state rule fulfils: add ``alpha * dW`` to parameters, read from the optimizer's state.

dW is the optimizer's most recent update direction per unit learning rate, without decoupled weight decay, so the
predicted weights are ``W_hat = W + alpha * dW`` with ``alpha = -steps * lr``. Rules are pure torch: they can be
tested, and reused, in a plain PyTorch loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .._internal.chunks import Chunks

if TYPE_CHECKING:
    from .compiled import CompiledPrediction


class PredictionRule(ABC):
    """How to read dW for one optimizer family from its per-parameter state.

    The caller (the predictor, or any training loop) collects, once per change of the optimizer's state, the tuple
    :meth:`state_tensors` returns for each parameter, transposes them into columns (the column at
    :attr:`step_column`, if any, as a :class:`~lightning_xgrad._internal.scalars.StepCounts`), and then calls
    :meth:`add_direction_` every step with the parameters of one param group that share a device and dtype.
    """

    #: short name shown in logs and in the table of docs/optimizers.md
    name: str = "rule"
    #: state rules read dW from the optimizer's state (the trajectory rule, its counterpart, does not)
    reads_state: bool = True
    #: the position in :meth:`state_tensors` of the per-parameter step count, which the caller then hands over as a
    #: :class:`~lightning_xgrad._internal.scalars.StepCounts` (read without device syncs); ``None``: no step column
    step_column: int | None = None

    def bind(self, optimizer: Any) -> PredictionRule:
        """The rule to use for this optimizer instance: itself, unless the optimizer keeps options outside its param
        groups that the update depends on (the predictor calls this once per optimizer)."""
        return self

    def handles(self, group: dict[str, Any]) -> bool:
        """Whether this group's hyper-parameters let the state hold dW (else the trajectory rule is used)."""
        return True

    @abstractmethod
    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        """The state entries dW is computed from, or ``None`` while the state cannot give dW (no step yet)."""

    @abstractmethod
    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        """In place: ``params[i] += alpha * dW[i]``; ``columns[j][i]`` is entry j of :meth:`state_tensors`.
        ``chunks`` are those of ``params``: the bound on the temporaries of out-of-place foreach ops."""

    def compiled_prediction(self) -> CompiledPrediction | None:
        """A :class:`~lightning_xgrad.rules.compiled.CompiledPrediction` that snapshots and predicts in one pass, or
        ``None`` (the default): the predictor then copies and calls :meth:`add_direction_`. A subclass that changes
        :meth:`add_direction_` overrides this too (returning ``None`` unless it has a kernel of its own)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
