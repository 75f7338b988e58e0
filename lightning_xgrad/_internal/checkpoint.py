"""How the package's callbacks keep their state in a Lightning checkpoint: one way, for both of them.

The state is written from ``on_save_checkpoint`` under ``checkpoint["callbacks"][state_key]``, not returned from
``state_dict()``: Lightning refuses two callbacks that have a ``state_dict`` and the same ``state_key`` already in
``Trainer.__init__``, with a message that does not say what to do, before any hook of ours could; the callbacks
refuse a second instance of themselves in ``setup`` instead, with one that does. On resume Lightning hands the entry
to ``load_state_dict`` before the optimizers exist, so it is kept until ``on_train_start`` applies it (and a
checkpoint saved before then writes it back unchanged). A checkpoint saved with other settings than the callback now
has is resumed with the new ones and one warning naming both. Nothing here imports Lightning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["CheckpointedState", "count_instances"]


class CheckpointedState:
    """A mixin for a Lightning callback: :meth:`checkpoint_state` is what goes into checkpoints,
    :meth:`settings` the options a resume compares, :meth:`take_loaded_state` what a resume brought."""

    state_key: str  # Lightning's Callback provides it
    #: how a resume with other settings is reported (a callback sets Lightning's ``rank_zero_warn``)
    warn: Callable[[str], Any] = staticmethod(warnings.warn)

    _loaded_state: dict[str, Any] | None = None

    def checkpoint_state(self) -> dict[str, Any]:
        """The state a checkpoint keeps: :meth:`settings` and what the callback needs to carry on."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The options that decide what the state means (compared on resume)."""
        raise NotImplementedError

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        state = self._loaded_state if self._loaded_state is not None else self.checkpoint_state()
        checkpoint.setdefault("callbacks", {})[self.state_key] = state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        current = self.settings()
        saved = {name: state_dict.get(name, value) for name, value in current.items()}
        if saved != current:
            self.warn(
                f"{type(self).__name__}: the checkpoint was saved with {_listed(saved, current)}; this run uses "
                f"{_listed(current, saved)}, which apply from the resumed step on."
            )
        self._loaded_state = state_dict

    def take_loaded_state(self) -> dict[str, Any] | None:
        """The state a resume loaded, once (``None`` when there is none)."""
        state, self._loaded_state = self._loaded_state, None
        return state


def count_instances(trainer: Any, cls: type) -> int:
    """How many callbacks of the Trainer are instances of ``cls``."""
    return sum(isinstance(callback, cls) for callback in getattr(trainer, "callbacks", None) or ())


def _listed(settings: dict[str, Any], other: dict[str, Any]) -> str:
    """``name=value`` for the settings that differ from ``other``."""
    return ", ".join(f"{name}={value!r}" for name, value in settings.items() if other[name] != value)
