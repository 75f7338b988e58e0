"""What the package reads off a user's optimizer, feature-detected, without changing it.

- **Wrappers**: ``Fabric.setup`` returns a ``_FabricOptimizer`` and Lightning's ``self.optimizers()`` a
  ``LightningOptimizer``; both build a class per optimizer class (``FabricAdamW``, ``LightningAdamW``) that derives
  from the wrapper and from the optimizer's class, and keep the real optimizer in their ``optimizer`` property. Rules
  are matched on the exact class of the real optimizer, so these wrappers are taken off first (recognised by class
  path, so nothing here imports Lightning). Any other subclass (one a user wrote) may change the update: it stays what
  it is, and gets the trajectory rule unless a rule is registered for it.
- **Parameters**: the flat list in param-group order, the numbering ``optimizer.state_dict()`` uses.
- **Step hooks**: torch runs the hooks of ``register_step_pre_hook`` and ``register_step_post_hook`` from the
  wrapper that ``Optimizer.__init__`` puts around the class's ``step`` (``Optimizer._patch_step_function``, which marks
  it ``hooked``). An optimizer that subclasses ``torch.optim.Optimizer`` without calling its ``__init__`` (timm's
  ``Lookahead``) has no hook registries, and one that makes its own registries without patching ``step`` has hooks
  that never run. Such optimizers are usually wrappers: their ``step`` calls an inner optimizer's, and the inner one
  shares their param groups, so its hooks run around the update of the very same parameters. The owner of the hooks
  is therefore the optimizer itself where its hooks are live, else such an inner optimizer (an attribute of the
  wrapper, looked for recursively), else nobody: the caller then does without. Nothing is added to the user's
  objects.

Pure torch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = [
    "StepHook",
    "flat_params",
    "register_step_hooks",
    "step_closure",
    "step_hook_owner",
    "unwrap_optimizer",
    "with_closure",
]

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


def flat_params(optimizer: Any) -> list[Tensor]:
    """Every parameter of ``optimizer`` in param-group order: position i is parameter i of its ``state_dict()``."""
    return [p for group in optimizer.param_groups for p in group["params"]]


#: ``hook(optimizer, args, kwargs)``, as torch calls step hooks (a pre-hook may return new ``(args, kwargs)``)
StepHook = Callable[[torch.optim.Optimizer, tuple[Any, ...], dict[str, Any]], Any]


def _hooks_are_live(optimizer: Any) -> bool:
    """Whether ``optimizer.step()`` runs the optimizer's own step hooks: it has both registries and its class's
    ``step`` is the hook-running wrapper."""
    registries = (
        getattr(optimizer, name, None) for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
    )
    return all(isinstance(registry, dict) for registry in registries) and bool(
        getattr(type(optimizer).step, "hooked", False)
    )


def _shares_param_groups(inner: torch.optim.Optimizer, outer: Any) -> bool:
    """Whether ``inner`` holds the same param groups as ``outer`` (the same list, or the same group dicts)."""
    inner_groups, outer_groups = getattr(inner, "param_groups", None), getattr(outer, "param_groups", None)
    if inner_groups is None or outer_groups is None:
        return False
    if inner_groups is outer_groups:
        return True
    return len(inner_groups) == len(outer_groups) and all(map(operator.is_, inner_groups, outer_groups))


def step_hook_owner(optimizer: Any, _seen: frozenset[int] = frozenset()) -> torch.optim.Optimizer | None:
    """The optimizer whose step hooks run around the update of ``optimizer``'s parameters: ``optimizer`` itself
    when its hooks are live, else an inner optimizer it holds as an attribute that shares its param groups (nested
    wrappers are searched through), else ``None``."""
    if _hooks_are_live(optimizer):
        return optimizer
    seen = _seen | {id(optimizer)}
    for value in getattr(optimizer, "__dict__", {}).values():
        if (
            isinstance(value, torch.optim.Optimizer)
            and id(value) not in seen
            and _shares_param_groups(value, optimizer)
        ):
            owner = step_hook_owner(value, seen)
            if owner is not None:
                return owner
    return None


def register_step_hooks(
    optimizer: Any, pre: StepHook | None = None, post: StepHook | None = None
) -> list[RemovableHandle] | None:
    """Register ``pre`` and ``post`` (either may be ``None``) on :func:`step_hook_owner`'s optimizer; the handles,
    or ``None`` when no optimizer runs hooks around ``optimizer``'s updates (nothing is registered then). The hooks
    receive the owner as their first argument and that owner's step arguments."""
    owner = step_hook_owner(optimizer)
    if owner is None:
        return None
    handles = []
    if pre is not None:
        handles.append(owner.register_step_pre_hook(pre))
    if post is not None:
        handles.append(owner.register_step_post_hook(post))
    return handles


def step_closure(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The closure a ``step(closure)`` call was given (``args[0]`` is the optimizer), or ``None``."""
    return kwargs.get("closure", args[1] if len(args) > 1 else None)


def with_closure(args: tuple[Any, ...], kwargs: dict[str, Any], closure: Callable[[], Any]) -> tuple[Any, Any]:
    """The step arguments with ``closure`` in place of the one given, as a pre-hook returns them."""
    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure}
    return (args[0], closure, *args[2:]), kwargs
