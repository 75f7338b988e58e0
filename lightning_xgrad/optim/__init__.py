"""Optimizers torch lacks, written like torch.optim's own; each has a state rule in ``lightning_xgrad.rules``."""

from .adam3 import AdaM3

__all__ = [
    "AdaM3",
]
