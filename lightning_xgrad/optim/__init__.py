"""Optimizers torch lacks, written like torch.optim's own; each has a state rule in ``lightning_xgrad.rules``."""

from .adam3 import AdaM3
from .cprop import CPropAdam, CPropSGD
from .heavy_ball import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD

__all__ = [
    "AdaM3",
    "AdaptiveHeavyBallAdam",
    "AdaptiveHeavyBallSGD",
    "CPropAdam",
    "CPropSGD",
]
