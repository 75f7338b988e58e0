"""A module ``state_dict`` post-hook that reports the real weights while predicted ones are in place.

Mid-step the parameters hold the predicted weights W_hat; every ``state_dict()`` of the module (a checkpoint, a
weights-only save, a mid-window save, an EMA copy) must still see the real weights W. The hook replaces each of its
module's own parameters in the returned dict by its real value, asked for at the time of the call. It survives
``torch.save(module)`` and ``copy.deepcopy(module)`` mid-step: the copy gets the real weights and an inert hook.
Pure torch.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._internal.sharding import DTensor, local_tensor

__all__ = ["RealWeightsHook", "register_real_weights_hooks"]

#: the real local values of the parameters holding a prediction now, by parameter
RealValues = Callable[[], Mapping[Tensor, Tensor]]


def register_real_weights_hooks(root: nn.Module, real_values: RealValues) -> list[RemovableHandle]:
    """Make every ``state_dict()`` of ``root`` and of its submodules report real values: a hook on each module that
    owns parameters, for its own ones. ``real_values`` is a bound method, held weakly (the hooks keep neither its
    owner nor the modules alive)."""
    return [
        module.register_state_dict_post_hook(RealWeightsHook(real_values, module))
        for module in root.modules()
        if any(True for _ in module.parameters(recurse=False))
    ]


class RealWeightsHook:
    """A module's ``state_dict`` post-hook: while a prediction is in place, the module's own parameters are reported
    with their real values (DTensors stay DTensors).

    A class rather than a closure, so that a module carrying it can be pickled (``torch.save(module)``) or deep-copied
    mid-window: the copy gets the real weights of the parameters this module owns, and an inert hook.
    """

    def __init__(self, real_values: RealValues | None, module: nn.Module | None) -> None:
        self._real_values = None if real_values is None else weakref.WeakMethod(real_values)
        self._module = None if module is None else weakref.ref(module)

    def _own_real_values(self) -> list[tuple[Tensor, Tensor]]:
        real_values = None if self._real_values is None else self._real_values()
        module = None if self._module is None else self._module()
        if real_values is None or module is None:
            return []
        real = real_values()
        if not real:
            return []
        return [(p, real[p]) for p in module.parameters(recurse=False) if p in real]

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        real = dict(self._own_real_values())
        if not real:
            return
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            key = prefix + name
            value = real.get(param)
            if value is None or key not in state_dict or state_dict[key] is param:  # keep_vars keeps vars
                continue
            if isinstance(param, DTensor):
                value = DTensor.from_local(
                    value,
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
            state_dict[key] = value.detach()

    def __deepcopy__(self, memo: dict[int, Any]) -> RealWeightsHook:
        # ``copy.deepcopy(param, memo)`` returns the copy the module's own copying made, or makes it now and leaves it
        # in the memo for the module to take (whichever of the two comes first): the copy gets the real values.
        with torch.no_grad():
            for param, value in self._own_real_values():
                local_tensor(copy.deepcopy(param, memo)).copy_(value)
        return RealWeightsHook(None, None)

    def __reduce__(self) -> tuple[Any, ...]:
        pairs = self._own_real_values()
        return (_with_real_values, (tuple(p for p, _ in pairs), tuple(v.detach().clone() for _, v in pairs)))


def _with_real_values(params: tuple[Tensor, ...], values: tuple[Tensor, ...]) -> RealWeightsHook:
    """Unpickling a module saved mid-window: its parameters get the real values, and the hook is inert."""
    with torch.no_grad():
        for param, value in zip(params, values, strict=True):
            local_tensor(param).copy_(value)
    return RealWeightsHook(None, None)
