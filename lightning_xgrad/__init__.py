"""XGrad weight prediction for PyTorch Lightning: gradients taken at predicted future weights, as one callback."""

from .callback import XGradCallback
from .cprop_callback import CPropCallback
from .predictor import OptimizerPredictor
from .rules import PredictionRule, register_rule

__version__ = "0.1.0.dev0"

__all__ = ["CPropCallback", "OptimizerPredictor", "PredictionRule", "XGradCallback", "__version__", "register_rule"]
