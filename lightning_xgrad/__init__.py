"""XGrad weight prediction for PyTorch Lightning: gradients taken at predicted future weights, as one callback.

The public names are imported on first use (PEP 562), so tools that need no Lightning (``lightning_xgrad.sweep``,
the rules and optimizers) start without importing it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callback import XGradCallback
    from .cprop.callback import CPropCallback
    from .prediction.edits import PredictedWeightsEditedWarning
    from .prediction.predictor import OptimizerPredictor
    from .rules import PredictionRule, register_rule

#: the package's version, its one source: pyproject.toml reads it from here
__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "XGradCallback": ".callback",
    "CPropCallback": ".cprop.callback",
    "OptimizerPredictor": ".prediction.predictor",
    "PredictedWeightsEditedWarning": ".prediction.edits",
    "PredictionRule": ".rules",
    "register_rule": ".rules",
}

__all__ = [
    "CPropCallback",
    "OptimizerPredictor",
    "PredictedWeightsEditedWarning",
    "PredictionRule",
    "XGradCallback",
    "__version__",
    "register_rule",
]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
