"""The predictors of a Trainer's optimizers, one per optimizer, sharing one snapshot: XGradCallback's view of them.

They follow the optimizers the strategy holds (a callback may assign ``trainer.strategy.optimizers`` during fit): a
known optimizer keeps its predictor (and so the trajectory rule's memory), a new one gets a predictor, a dropped one's
predictor is closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ._internal.compat import trainer_callbacks
from .callback_checks import check_optimizers
from .prediction.arguments import RuleChoice
from .prediction.predictor import OptimizerPredictor, restore_all
from .prediction.snapshot import ParameterSnapshot
from .protocols import DirectionScaleProvider, DirectionScales

__all__ = ["Predictors"]


class Predictors:
    """One :class:`OptimizerPredictor` per optimizer of the Trainer, in the order of ``trainer.optimizers``."""

    def __init__(
        self, steps: int, rule: RuleChoice, compile: bool, chunk_bytes: int | None, compile_min_bytes: int
    ) -> None:
        self.steps = steps
        self.rule: RuleChoice = rule
        self.compile = compile
        self.chunk_bytes = chunk_bytes
        self.compile_min_bytes = compile_min_bytes
        self._snapshot = ParameterSnapshot()
        self._by_optimizer: dict[int, OptimizerPredictor] = {}

    def __iter__(self) -> Iterator[OptimizerPredictor]:
        return iter(list(self._by_optimizer.values()))

    def of(self, optimizer: torch.optim.Optimizer) -> OptimizerPredictor | None:
        """The predictor of ``optimizer``; ``None`` for one that appeared since the last :meth:`follow`."""
        return self._by_optimizer.get(id(optimizer))

    def follow(self, trainer: Any) -> list[int]:
        """Match ``trainer.optimizers`` (checked first); returns the indices of the optimizers that got a predictor
        now. A no-op when the optimizers did not change."""
        optimizers = list(trainer.optimizers)
        if [id(predictor.optimizer) for predictor in self] == [id(optimizer) for optimizer in optimizers]:
            return []
        check_optimizers(optimizers)
        known = self._by_optimizer
        for key, dropped in known.items():
            if key not in {id(optimizer) for optimizer in optimizers}:
                dropped.close()
        names: dict[Tensor, str] = {p: name for name, p in trainer.lightning_module.named_parameters()}
        self._by_optimizer = {}
        new: list[int] = []
        for index, optimizer in enumerate(optimizers):
            predictor = known.get(id(optimizer))
            if predictor is None:
                scales = direction_scales(trainer_callbacks(trainer), optimizer)
                predictor = OptimizerPredictor(
                    optimizer, self.steps, self.rule, self._snapshot, self.compile, scales, self.chunk_bytes, names,
                    self.compile_min_bytes,
                )  # fmt: skip
                new.append(index)
            self._by_optimizer[id(optimizer)] = predictor
        return new

    def restore(self, stepped: bool, predictors: Iterable[OptimizerPredictor] | None = None) -> None:
        """Restore every predictor (or those given), each even if another fails."""
        restore_all(self if predictors is None else predictors, stepped)

    def predicted(self) -> list[OptimizerPredictor]:
        """The predictors whose parameters hold predicted weights now."""
        return [predictor for predictor in self if predictor.phase == "predicted"]

    def idle(self) -> bool:
        """Whether no predictor holds a prediction (every one restored)."""
        return all(predictor.phase == "idle" for predictor in self)

    def real_values(self) -> dict[Tensor, Tensor]:
        """``parameter -> its real weights`` for the parameters that hold predicted weights now."""
        return {p: real for predictor in self for p, _, real in predictor.predicted_params()}

    def state_dicts(self) -> list[dict[str, Any]]:
        return [predictor.state_dict() for predictor in self]

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        for predictor, state in zip(self, states, strict=False):
            predictor.load_state_dict(state)

    def close(self) -> None:
        """Close every predictor and free the snapshot (the end of fit)."""
        for predictor in self:
            predictor.close()
        self._by_optimizer = {}
        self._snapshot.clear()


def direction_scales(callbacks: Iterable[Any], optimizer: torch.optim.Optimizer) -> DirectionScales | None:
    """The live elementwise scales a callback applies to ``optimizer``'s updates (CPropCallback), so the prediction
    follows the update the optimizer will really apply; ``None`` without such a callback."""
    scales = None
    for callback in callbacks:
        if isinstance(callback, DirectionScaleProvider):
            scales = callback.xgrad_direction_scales(optimizer)
    return scales
