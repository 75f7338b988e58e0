"""See through the optimizer wrappers of Lightning and Fabric to the optimizer that holds the state and the update.

``Fabric.setup`` returns a ``_FabricOptimizer`` and Lightning's ``self.optimizers()`` a ``LightningOptimizer``; both
build a class per optimizer class (``FabricAdamW``, ``LightningAdamW``) that derives from the wrapper and from the
optimizer's class, and keep the real optimizer in their ``optimizer`` property. Rules are matched on the exact class
of the real optimizer, so the wrapper must be taken off first. The wrappers are recognised by their class path, so
nothing here imports Lightning. Only these known wrappers are unwrapped: any other subclass of an optimizer (one a
user wrote) may change the update, so it stays what it is and gets the trajectory rule unless a rule is registered
for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap_optimizer"]

#: "module.QualName" of the wrapper classes whose ``optimizer`` property is the wrapped optimizer
_KNOWN_WRAPPERS = frozenset(
    {
        "lightning.fabric.wrappers._FabricOptimizer",
        "lightning_fabric.wrappers._FabricOptimizer",  # the standalone lightning-fabric package
        "lightning.pytorch.core.optimizer.LightningOptimizer",
        "pytorch_lightning.core.optimizer.LightningOptimizer",  # the standalone pytorch-lightning package
    }
)


def _is_known_wrapper(optimizer: Any) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" in _KNOWN_WRAPPERS for cls in type(optimizer).__mro__)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Fabric's and Lightning's wrappers (nested ones too); anything else unchanged."""
    while _is_known_wrapper(optimizer):
        optimizer = optimizer.optimizer
    return optimizer
