"""Where XGradCallback's metrics go: ``xgrad/relative_shift``, ``xgrad/prediction_cosine`` and
``xgrad/prediction_error``, measured in the windows its ``log_every_n_steps`` picks.

They go to the Trainer's loggers directly, at the step Lightning labels the window's batch with (as
LearningRateMonitor does): ``self.log`` from a batch-start hook would reach them only at the Trainer's cadence,
repeated until overwritten. And they go to ``trainer.callback_metrics``, through ``self.log(..., logger=False)`` at the
end of the batch they were computed in, where ``ModelCheckpoint`` and ``EarlyStopping`` read them (and the progress
bar, with ``prog_bar``). With several optimizers each name ends in ``/optimizer_<index>``. Nothing here imports
Lightning: the callback hands over its Trainer's loggers and its module.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from .prediction.predictor import OptimizerPredictor
from .prediction.quality import PredictionQuality, relative_shift

__all__ = ["MetricsLog", "per_optimizer"]


def per_optimizer(name: str, index: int, count: int) -> str:
    """A logged name for optimizer ``index`` of ``count``: ``name`` itself with one optimizer, else
    ``name/optimizer_<index>`` (the index in ``trainer.optimizers``)."""
    return name if count == 1 else f"{name}/optimizer_{index}"


class MetricsLog:
    """The metrics of the logging windows (opened at a window's first micro-batch, measured when each optimizer
    updates, published at batch end), and the rule each optimizer predicts with, as hyperparameters.

    Args:
        every_n_steps: a window is measured every this many optimizer steps (``None``: never).
        max_bytes: the budget of the copy of W_hat each optimizer holds from its restore to its update
            (:meth:`~lightning_xgrad.OptimizerPredictor.measure_next_update`).
        prog_bar: whether ``trainer.callback_metrics`` entries also show in the progress bar.
    """

    def __init__(self, every_n_steps: int | None, max_bytes: int | None, prog_bar: bool) -> None:
        self.every_n_steps = every_n_steps
        self.max_bytes = max_bytes
        self.prog_bar = prog_bar
        #: the step the open window's metrics are logged at; ``None`` outside a logging window
        self.step: int | None = None
        self._loggers: list[Any] = []
        self._unpublished: dict[str, float] = {}
        self._hyperparams: set[str] = set()  # each key once per fit (some loggers refuse a changed value)

    def log_rules(self, loggers: Sequence[Any], rules: dict[int, str], count: int, steps: int) -> None:
        """The loggers' hyperparameters ``xgrad/rule`` (``xgrad/rule/optimizer_<i>`` with several optimizers) and
        ``xgrad/steps``, for the optimizers ``rules`` maps (index -> the rule each predicts with), each key once per
        fit: an optimizer replaced later at the same index keeps its first entry (MLflow, for one, refuses a
        parameter whose value changes)."""
        hyperparams: dict[str, Any] = {per_optimizer("xgrad/rule", i, count): rule for i, rule in rules.items()}
        if hyperparams:
            hyperparams["xgrad/steps"] = steps
        hyperparams = {key: value for key, value in hyperparams.items() if key not in self._hyperparams}
        if hyperparams:
            self._hyperparams.update(hyperparams)
            for logger in loggers:
                logger.log_hyperparams(hyperparams)

    def wants(self, global_step: int) -> bool:
        """Whether the window starting at ``global_step`` is measured."""
        return self.every_n_steps is not None and global_step % self.every_n_steps == 0

    def unrecorded_warning(self, loggers: Sequence[Any]) -> str | None:
        """What to tell a user who asked for metrics that no logger records."""
        if self.every_n_steps is None or loggers:
            return None
        return (
            f"XGradCallback(log_every_n_steps={self.every_n_steps}): the Trainer has no logger (logger=False), so the "
            "xgrad/* metrics reach trainer.callback_metrics only (ModelCheckpoint and EarlyStopping can monitor them "
            "there). Give the Trainer a logger to record them, or set log_every_n_steps=None to measure nothing."
        )

    def open_window(
        self, step: int, loggers: Sequence[Any], predictors: Sequence[OptimizerPredictor], predicted: Sequence[int]
    ) -> None:
        """A window to measure begins, to be logged at ``step``: log the relative shift of every optimizer that
        predicted (``predicted``: their indices), and have each measure its prediction against its next update."""
        self.step = step
        self._loggers = list(loggers)
        count = len(predictors)
        self._publish(
            {
                per_optimizer("xgrad/relative_shift", i, count): relative_shift(
                    predictors[i].predicted_params(), predictors[i].chunk_bytes
                )
                for i in predicted
            },
            step,
        )
        self.measure(predictors, predicted)

    def measure(self, predictors: Sequence[OptimizerPredictor], indices: Sequence[int]) -> None:
        """Have the predictors at ``indices`` measure the prediction in place against their next update (again after
        ``XGradCallback.real_weights`` remade it)."""
        for index in indices:
            report = partial(self._report, index, len(predictors), self.step)
            predictors[index].measure_next_update(report, self.max_bytes, "XGradCallback", "metrics_max_bytes")

    def close_window(self) -> None:
        """The window is over: updates measured from now on belong to no logging window."""
        self.step = None

    def publish(self, pl_module: Any) -> None:
        """At batch end: the values measured since the last call into ``trainer.callback_metrics``."""
        metrics, self._unpublished = self._unpublished, {}
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, prog_bar=self.prog_bar)

    def clear(self) -> None:
        """The end of fit: nothing left to publish, and the next fit logs its hyperparameters again."""
        self.step = None
        self._loggers, self._unpublished, self._hyperparams = [], {}, set()

    def _report(self, index: int, count: int, step: int | None, quality: PredictionQuality) -> None:
        self._publish(
            {
                per_optimizer("xgrad/prediction_cosine", index, count): quality.cosine,
                per_optimizer("xgrad/prediction_error", index, count): quality.error,
            },
            step,
        )

    def _publish(self, metrics: dict[str, float], step: int | None) -> None:
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)
        self._unpublished.update(metrics)
