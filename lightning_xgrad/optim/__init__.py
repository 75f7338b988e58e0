"""AdaM3, an optimizer the XGrad paper uses that torch lacks, written like torch.optim's own; its state rule is in
:mod:`lightning_xgrad.rules`. The companion methods' optimizers live with their methods: CPropSGD and CPropAdam in
:mod:`lightning_xgrad.cprop`, the adaptive heavy-ball optimizers in :mod:`lightning_xgrad.heavy_ball`."""

from .adam3 import AdaM3

__all__ = ["AdaM3"]
