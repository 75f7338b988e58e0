"""The hooks between the package's components, declared: what each side provides and who calls it.

Components find each other through these protocols, never through each other's classes, so that none imports another
to cooperate with it (the callbacks do not import each other) and a third party can take either side: an optimizer of
your own can report its gradient point, a callback of your own can rescale updates under XGrad.

- :class:`GradientPointObserver`: an optimizer that needs the point where its gradients were taken (the adaptive
  heavy-ball secant). The predictor calls it while the parameters still hold the predicted weights.
- :class:`DirectionScaleProvider`: a callback that rescales each optimizer update elementwise after the step
  (CPropCallback). XGradCallback hands each of its predictors the live scales, so the prediction follows the update
  that is really applied.
- :class:`RealWeightsRestorer`: a callback that may leave predicted weights in the parameters until the update
  (XGradCallback). A callback that reads the weights in ``on_before_optimizer_step`` (CPropCallback) asks every
  restorer first, so the order of the callback list does not matter.

They are ``runtime_checkable``: ``isinstance`` checks that the method exists (not its signature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["DirectionScaleProvider", "DirectionScales", "GradientPointObserver", "RealWeightsRestorer"]

#: elementwise scales of an optimizer's updates by parameter: the scale tensor has the shape of the parameter's local
#: tensor (its shard under FSDP2), and is updated in place every step, so a mapping handed over once stays current
DirectionScales = Mapping[Tensor, Tensor]


@runtime_checkable
class GradientPointObserver(Protocol):
    """An optimizer that records where its gradients were taken (``AdaptiveHeavyBallSGD`` and ``...Adam``)."""

    def observe_gradient_point(self, chunk_bytes: int | None = None) -> None:
        """Record the parameters' current values as the point of this step's gradients; called before ``step``,
        while the parameters hold the predicted weights (a step then does not record them again). ``chunk_bytes``:
        the caller's budget for the temporaries (``None``: the default of the parameters' device)."""


@runtime_checkable
class DirectionScaleProvider(Protocol):
    """A callback that multiplies each update of an optimizer elementwise by a scale (``CPropCallback``)."""

    def xgrad_direction_scales(self, optimizer: Any) -> DirectionScales:
        """The live ``parameter -> scale of its last update`` mapping of ``optimizer`` (empty before its first step;
        a parameter without an entry is not scaled); the same mapping object for the same optimizer."""


@runtime_checkable
class RealWeightsRestorer(Protocol):
    """A callback that holds predicted weights in the parameters between a step's forward pass and its update
    (``XGradCallback``)."""

    def restore_real_weights(self, optimizer: Any) -> None:
        """Put the real weights of ``optimizer``'s parameters back now, ahead of its update (idempotent)."""
