"""Noticing, at O(1) per step, that an optimizer's per-parameter state was replaced, removed or reloaded.

The predictor plans once which state tensors each parameter's dW is read from, and reuses that plan every step. A
plan goes stale when the optimizer stops holding those tensors: ``optimizer.state[p] = {}`` (a restart, a partial
state load), ``del optimizer.state[p]``, ``optimizer.state.clear()``, ``optimizer.load_state_dict(...)``. Comparing
every parameter's state dict with the planned one would cost a Python dict lookup per parameter per step (a tensor
key hashes through Python: about 0.4 us each), as much again as the prediction's own bookkeeping. Instead:

- the optimizer's ``state`` mapping is swapped for a :class:`WatchedState`, a ``defaultdict`` with the same entries
  that counts every change to its own entries (reads cost nothing extra: ``__getitem__`` is not overridden, and
  torch's optimizers only write this mapping when a parameter gets its first state);
- a load replaces the mapping object (torch's ``load_state_dict`` goes through ``__setstate__``), which the
  predictor sees by identity, and ``register_load_state_dict_post_hook`` covers subclasses that load in place.

The plan key is then the mapping's identity and its change count: two reads per step. Not seen: in-place edits of
one parameter's own state dict (``optimizer.state[p].clear()``, rebinding ``optimizer.state[p]["exp_avg"]``), which
no torch optimizer does; call ``OptimizerPredictor.invalidate()`` after such an edit.

The swap reaches the optimizer inside Lightning's and Fabric's wrappers (the only ones looked through, as
everywhere: ``unwrap_optimizer``) and needs ``state`` to be that optimizer's own attribute, a plain ``defaultdict``;
anything else is not watched, and the predictor compares each parameter's state dict instead. A pickled or
deep-copied optimizer gets a plain ``defaultdict`` back. The mapping is swapped once per mapping object (again after
a load replaced it) and left in place after training: it behaves as the ``defaultdict`` it replaced.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ._wrappers import unwrap_optimizer

__all__ = ["WatchedState", "watch_state"]


class WatchedState(defaultdict):
    """A ``defaultdict`` that counts changes to its entries in :attr:`version` (set, delete, clear, update, ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.version = 0

    def __setitem__(self, key: Any, value: Any) -> None:  # also reached by __missing__, for a new parameter
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.version += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.version += 1
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.version += 1
        return super().popitem()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.version += 1
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.version += 1
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> WatchedState:  # type: ignore[misc]  # typeshed's dict allows |= what | refuses
        self.version += 1
        return super().__ior__(other)

    def __reduce__(self) -> Any:
        # pickles and deep-copies as the plain defaultdict torch's optimizers hold
        return (defaultdict, (self.default_factory,), None, None, iter(self.items()))


def watch_state(optimizer: Any) -> WatchedState | None:
    """Make ``optimizer.state`` a :class:`WatchedState` (if it is a plain ``defaultdict``) and return it; ``None``
    when the state cannot be watched (a custom mapping, or not an attribute of the optimizer itself): the caller must
    then check otherwise. Lightning's and Fabric's wrappers are looked through."""
    owner = unwrap_optimizer(optimizer)
    state = vars(owner).get("state") if hasattr(owner, "__dict__") else None
    if state is None:
        return None
    if isinstance(state, WatchedState):
        return state
    if type(state) is not defaultdict:
        return None
    watched = WatchedState(state.default_factory, state)
    owner.__dict__["state"] = watched
    return watched
