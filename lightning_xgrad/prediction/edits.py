"""Noticing edits of W_hat: an in-place change of a predicted parameter between the prediction and the restore, which
the restore would silently discard (a WGAN clamp written at the top of ``training_step``).

The tensors' version counters are recorded after a prediction and compared before its restore. Comparing costs two
reads per predicted tensor, so not every prediction is checked: each of the first ones, then every
``EDIT_CHECK_PERIOD``-th. The first edit found is warned about once, naming the parameters and the remedy.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["EDIT_CHECKS_FIRST", "EDIT_CHECK_PERIOD", "EditWatch", "PredictedWeightsEditedWarning"]

#: W_hat is checked for in-place edits at every one of the first predictions, then at every this-many-th (a prime:
#: an edit made every p steps is caught for any p that is not a multiple of it); a check reads every predicted
#: tensor's version counter twice
EDIT_CHECKS_FIRST = 16
EDIT_CHECK_PERIOD = 17


class PredictedWeightsEditedWarning(UserWarning):
    """A predicted parameter was changed in place between the prediction and the restore, which puts the real weights
    back and so discards the change (an edit meant for the real weights, such as a WGAN clamp, made on W_hat)."""


class EditWatch:
    """Which predictions of one optimizer are checked for edits, and the one warning about them."""

    def __init__(self, optimizer: torch.optim.Optimizer, names: Mapping[Tensor, str], guards_step: bool) -> None:
        self._optimizer = optimizer
        self._names = names
        self._guards_step = guards_step
        self._predictions = 0
        self._warned = False
        #: whether the prediction in place is checked
        self.checking = False

    def on_prediction(self) -> bool:
        """A prediction was written: whether it is checked (none after the warning)."""
        count = self._predictions
        self._predictions += 1
        self.checking = not self._warned and (count < EDIT_CHECKS_FIRST or count % EDIT_CHECK_PERIOD == 0)
        return self.checking

    def report(self, edited: list[Tensor]) -> None:
        """Warn, once, about the parameters found edited."""
        if edited and not self._warned:
            self._warned = True
            warnings.warn(self._message(edited), PredictedWeightsEditedWarning, stacklevel=5)

    def _name(self, param: Tensor) -> str:
        """The parameter's name if one was given, else its param group, position and shape."""
        name = self._names.get(param)
        if name is not None:
            return name
        for group_index, group in enumerate(self._optimizer.param_groups):
            for position, p in enumerate(group["params"]):
                if p is param:
                    return f"parameter {position} of param group {group_index} (shape {tuple(param.shape)})"
        return f"a parameter of shape {tuple(param.shape)}"

    def _message(self, edited: list[Tensor]) -> str:
        names = [f"`{self._name(p)}`" for p in edited[:3]]
        listed = ", ".join(names) + (f" and {len(edited) - 3} more" if len(edited) > 3 else "")
        message = (
            f"{listed} changed in place while holding the predicted weights W_hat (after the prediction, before the "
            "restore), so the restore of the real weights discarded the change. To change the real weights during a "
            "step (a weight clamp, a re-normalisation), do it inside `with XGradCallback.real_weights(self): ...` in "
            "training_step, or, with OptimizerPredictor in your own loop, before predict() or after restore()."
        )
        if not self._guards_step:
            message += (
                f" If it was the optimizer's own step: {type(self._optimizer).__name__} runs no step hooks (it does "
                "not call torch.optim.Optimizer.__init__), so its step cannot restore the real weights first; call "
                "restore() before every step() (under Lightning, step through the LightningOptimizer)."
            )
        return message
