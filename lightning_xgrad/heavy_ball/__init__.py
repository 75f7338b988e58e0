"""Adaptive heavy-ball momentum (arXiv 2110.09057): the optimizers (:mod:`.optim`) and their XGrad rules
(:mod:`.rules`). Pure torch."""

from .optim import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD

__all__ = ["AdaptiveHeavyBallAdam", "AdaptiveHeavyBallSGD"]
