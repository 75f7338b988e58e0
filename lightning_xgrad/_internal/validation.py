"""Argument checks for every public constructor of the package: one set of checks, one message format.

Every refusal reads ``"<Owner>: `name` must be <what is allowed>, got <value!r>"`` and is a ``TypeError`` when the
value has the wrong type (a string, a bool where a number belongs, a float where an integer belongs) and a
``ValueError`` when it has the right type and the wrong value (out of range, not finite, not one of the choices).
Bools are never numbers here: ``steps=True`` is a mistake, not 1.

Real numbers must be finite. That includes learning rates: ``torch.optim`` refuses a negative lr and accepts an
infinite one, which can only turn the weights into inf or nan at the first step, so every optimizer and callback of
this package refuses it (``lr`` must be finite and >= 0).

Pure Python and torch; imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["argument_error", "check_choice", "check_flag", "check_int", "check_real", "check_real_pair"]


def _shown(value: Any) -> str:
    """``repr(value)``, shortened to ``ClassName(...)`` where the repr spans lines (optimizers, modules)."""
    text = repr(value)
    return f"{type(value).__name__}(...)" if "\n" in text else text


def argument_error(owner: str, name: str, allowed: str, value: Any, error: type[Exception] = ValueError) -> Exception:
    """The exception (not raised) for argument ``name`` of ``owner``, in the package's one message format."""
    return error(f"{owner}: `{name}` must be {allowed}, got {_shown(value)}")


def check_int(owner: str, name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> Any:
    """An integer (not a bool) ``>= minimum``, or ``None`` where allowed; returns ``value``."""
    if allow_none and value is None:
        return value
    allowed = "an integer" + ("" if minimum is None else f" >= {minimum}") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise argument_error(owner, name, allowed, value, TypeError)
    if minimum is not None and value < minimum:
        raise argument_error(owner, name, allowed, value)
    return value


def _bounds(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {_bounds(low, high, low_open, high_open)}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_real(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_tensor: bool = False,
) -> Any:
    """A finite real number (not a bool) within the bounds; with ``allow_tensor`` also a 1-element real tensor, as
    ``torch.optim`` accepts for ``lr``. Returns ``value`` unchanged."""
    allowed = _interval(low, high, low_open, high_open) + (" (or a 1-element tensor)" if allow_tensor else "")
    if allow_tensor and isinstance(value, Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise argument_error(owner, name, allowed, value, TypeError)
        if value.numel() != 1:
            raise argument_error(owner, name, allowed, value)
        number = float(value.item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise argument_error(owner, name, allowed, value, TypeError)
    within = math.isfinite(number)
    if low is not None:
        within = within and (number > low if low_open else number >= low)
    if high is not None:
        within = within and (number < high if high_open else number <= high)
    if not within:
        raise argument_error(owner, name, allowed, value)
    return value


def check_real_pair(
    owner: str, name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> tuple[float, float]:
    """A pair (tuple or list) of real numbers, each within the bounds (``betas``); returns it as two floats."""
    allowed = f"a pair of numbers in {_bounds(low, high, low_open, high_open)}"
    if not isinstance(value, (tuple, list)):
        raise argument_error(owner, name, allowed, value, TypeError)
    if len(value) != 2:
        raise argument_error(owner, name, allowed, value)
    for index, entry in enumerate(value):
        check_real(owner, f"{name}[{index}]", entry, low, high, low_open, high_open)
    return float(value[0]), float(value[1])


def check_flag(owner: str, name: str, value: Any, allow_none: bool = False) -> Any:
    """``True`` or ``False`` (or ``None`` where allowed); returns ``value``."""
    if allow_none and value is None:
        return value
    if not isinstance(value, bool):
        raise argument_error(owner, name, "None, True or False" if allow_none else "True or False", value, TypeError)
    return value


def check_choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of ``choices`` (strings in practice); a value of another type is a TypeError. Returns ``value``."""
    allowed = f"one of {tuple(choices)}"
    if not any(isinstance(value, type(choice)) for choice in choices):
        raise argument_error(owner, name, allowed, value, TypeError)
    if value not in choices:
        raise argument_error(owner, name, allowed, value)
    return value
