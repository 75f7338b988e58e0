"""XGradCallback: Lightning's lifecycle around weight prediction - when to predict, when to restore.

At the first micro-batch of every optimizer step the callback writes ``W_hat = W - steps * lr * dW`` into the
module, forward and backward run there, and ``on_before_optimizer_step`` (after AMP unscaling, before clipping and
the update) puts the real weights back, so the optimizer updates W with the gradient taken at W_hat. Predicted
weights never leave a training step: validation, checkpoints (through a ``state_dict`` hook, so weights-only and
mid-window saves too), ``torch.save`` and ``copy.deepcopy`` of the module, exceptions and the end of fit all see the
real weights; code inside ``training_step`` reads and edits them in :meth:`XGradCallback.real_weights`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._internal.compat import backward_is_skipped, batches_that_stepped, should_accumulate, trainer_callbacks
from ._internal.sharding import model_parallel_unsupported
from ._internal.validation import argument_error, check_flag, check_int
from .prediction.predictor import CLOSURE_REEVALUATING, OptimizerPredictor, RuleChoice, check_prediction_args
from .prediction.quality import DEFAULT_METRICS_MAX_BYTES, PredictionQuality
from .prediction.shift import relative_shift
from .prediction.snapshot import ParameterSnapshot
from .prediction.state_dict_hook import register_real_weights_hook
from .protocols import DirectionScaleProvider, DirectionScales

_REFUSED_STRATEGIES = {
    FSDPStrategy: (
        "outside forward its parameters are views of flat shards, and changes written through them may not persist "
        "(pytorch issue 117742), so the prediction and the restore could be silently lost. Use "
        "ModelParallelStrategy with `fully_shard` (FSDP2) in `configure_model`: XGrad predicts its DTensor shards "
        "locally, with no communication."
    ),
    DeepSpeedStrategy: (
        "its optimizer is a ZeRO wrapper over flat fp32 partitions and it accumulates gradients itself, so the "
        "module's parameters are not what the optimizer updates. Use ModelParallelStrategy with `fully_shard` "
        "(FSDP2) or strategy='ddp'."
    ),
}
if (_no_model_parallel := model_parallel_unsupported()) is not None:  # a torch without DTensor
    _REFUSED_STRATEGIES[ModelParallelStrategy] = _no_model_parallel


class XGradCallback(Callback):
    r"""Train with gradients taken at predicted future weights (XGrad, Guan et al., TPAMI 2024).

    Works with the optimizer(s) the LightningModule configures. dW comes from the optimizer's own state where a rule
    knows it (torch's SGD and RMSprop with momentum, Adam, AdamW, Adamax and RAdam; this package's AdaM3, CPropSGD,
    CPropAdam, AdaptiveHeavyBallSGD and AdaptiveHeavyBallAdam; pytorch-optimizer's AdaBelief; any optimizer a rule
    was registered for with :func:`~lightning_xgrad.register_rule`), otherwise from the update the optimizer applied
    at its last step (the trajectory rule, exact for any optimizer). The README's table "Supported optimizers and
    their dW" has the formulas.

    Args:
        steps: how many future updates to predict (the paper's s).
        rule: ``"auto"`` uses the optimizer's state where a rule is registered, else the trajectory rule;
            ``"trajectory"`` uses the trajectory rule for every optimizer.
        start_step: no prediction before this global step.
        log_every_n_steps: every n optimizer steps, log per optimizer ``xgrad/relative_shift``
            (``||W_hat - W|| / ||W||``), ``xgrad/prediction_cosine`` (the cosine between the prediction ``W_hat - W``
            and the update the optimizer then applies, ``W_next - W``) and ``xgrad/prediction_error``
            (``||(W_hat - W) - steps * (W_next - W)|| / ||steps * (W_next - W)||``), to the Trainer's loggers at the
            step they belong to (whatever the Trainer's own ``log_every_n_steps``); with several optimizers each name
            ends in ``/optimizer_<index>``. On those steps only, a copy of the predicted weights (at most
            ``metrics_max_bytes``) is held from the restore to the update. The values are also put in
            ``trainer.callback_metrics`` (``self.log(..., logger=False)`` from ``on_train_batch_end``), so that
            ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them. ``None`` measures and logs nothing.
        compile: snapshot and predict in one ``torch.compile``d pass per tensor instead of several eager foreach
            passes, for the Adam, AdamW, AdaM3 and momentum rules (others stay eager). Costs a compilation at the
            first predicted step (seconds, up to a minute on a small CPU; inductor caches it for later runs), so it
            is off by default; see benchmarks/results/overhead.md for what it saves.
        chunk_bytes: the memory budget of the prediction's temporaries, in bytes. Out-of-place foreach ops (Adam's
            denominators, the trajectory rule's differences) walk the parameters in chunks of at most
            ``max(largest tensor, chunk_bytes)``, one call per op and chunk: fewer calls for larger chunks, less
            transient memory for smaller ones. ``None``: 32 MiB on an accelerator, which fits the many small tensors
            of most models in one call per op, and 1 MiB on the CPU, where cache-sized chunks are faster and calls
            cost no launch; ``0``: chunks as small as the largest tensor.
        metrics_max_bytes: the most memory, in bytes per rank and optimizer, that the prediction metrics hold on a
            logging step. They compare W_hat with the update applied after it, so W_hat is kept aside from the
            restore to the update: all of it when the predicted parameters fit in the budget (exact values), else a
            systematic sample that fits (tensors smaller than an equal share of the budget whole, every m-th element
            of the larger ones), and the cosine and error are estimates from it. Default 32 MiB;
            ``None``: always exact (one full copy of the predicted parameters). A budget below one element per
            predicted tensor raises a ValueError at the first logging step.
        prog_bar: show the ``xgrad/*`` metrics in the progress bar too (as ``self.log(..., prog_bar=True)``).

    The rule each optimizer got is logged once at INFO and as logger hyperparameters (``xgrad/rule``, or
    ``xgrad/rule/optimizer_<index>``, and ``xgrad/steps``).

    Add it once: two instances would predict on top of each other, so a second one is refused at the start of fit.
    Its checkpoint state (what the trajectory rule needs after a resume) is written from ``on_save_checkpoint`` under
    ``checkpoint["callbacks"]["XGradCallback"]`` rather than from ``state_dict()``: Lightning rejects two callbacks
    with a ``state_dict`` and the same ``state_key`` in ``Trainer.__init__``, with a message that does not say what
    to do, before any hook of ours could.

    Example::

        trainer = Trainer(callbacks=[XGradCallback(steps=1)])
    """

    def __init__(
        self,
        steps: int = 1,
        rule: RuleChoice = "auto",
        start_step: int = 0,
        log_every_n_steps: int | None = None,
        compile: bool = False,
        chunk_bytes: int | None = None,
        metrics_max_bytes: int | None = DEFAULT_METRICS_MAX_BYTES,
        prog_bar: bool = False,
    ) -> None:
        check_prediction_args("XGradCallback", steps, rule, compile, chunk_bytes)  # the predictor's checks, messages
        check_int("XGradCallback", "start_step", start_step, minimum=0)
        check_int("XGradCallback", "log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        check_int("XGradCallback", "metrics_max_bytes", metrics_max_bytes, minimum=1, allow_none=True)
        check_flag("XGradCallback", "prog_bar", prog_bar)
        self.steps = steps
        self.rule: RuleChoice = rule
        self.start_step = start_step
        self.log_every_n_steps = log_every_n_steps
        self.compile = compile
        self.chunk_bytes = chunk_bytes
        self.metrics_max_bytes = metrics_max_bytes
        self.prog_bar = prog_bar
        self._snapshot = ParameterSnapshot()
        self._predictors: dict[int, OptimizerPredictor] = {}
        self._loaded_state: dict[str, Any] | None = None
        self._module_hooks: list[RemovableHandle] = []
        self._window_open = False  # between an optimizer step's first micro-batch and its update
        self._window_enabled = True  # whether this window predicts (start_step, a step-less batch)
        self._holding_real_weights = False  # inside real_weights()
        self._logging_step: int | None = None  # in a window whose metrics are logged: the step they are logged at
        self._trainer_loggers: list[Any] = []  # where the logging window's metrics go
        self._unpublished: dict[str, float] = {}  # metrics measured, not yet in trainer.callback_metrics
        self._logged_hyperparams: set[str] = set()  # each key once per fit (some loggers refuse a changed value)

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for strategy_class, reason in _REFUSED_STRATEGIES.items():
            if isinstance(trainer.strategy, strategy_class):
                raise MisconfigurationException(
                    f"XGradCallback does not support {type(trainer.strategy).__name__}: {reason}"
                )
        count = sum(isinstance(callback, XGradCallback) for callback in trainer_callbacks(trainer))
        if count > 1:
            raise MisconfigurationException(
                f"XGradCallback was added {count} times to the Trainer's callbacks; add it once (each would predict "
                "on top of the others). With LightningCLI this happens when the config already lists it and the "
                "command line appends another with `--trainer.callbacks+=lightning_xgrad.XGradCallback`: set the "
                "arguments of the one in the config instead (`init_args: {steps: 2}`), or remove it from the config."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach_optimizers(trainer)
        # after configure_model and the strategy's setup: the final modules, and FSDP2's DTensor parameters
        self._register_state_dict_hooks(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first hook where a resumed optimizer's state is in place (loaded after on_fit_start).
        predictors = list(self._predictors.values())
        if self._loaded_state is not None:
            for predictor, state in zip(predictors, self._loaded_state.get("optimizers", []), strict=False):
                predictor.load_state_dict(state)
            self._loaded_state = None
        for predictor in predictors:
            predictor.invalidate()
        if not any(optimizer.param_groups for optimizer in trainer.optimizers):
            rank_zero_warn("XGradCallback: the model has no optimizer, so XGrad has nothing to predict.")
        self._logged_hyperparams = set()
        self._announce(trainer, range(len(trainer.optimizers)))
        if self.log_every_n_steps is not None and not trainer.loggers:  # after every callback's on_fit_start
            rank_zero_warn(
                f"XGradCallback(log_every_n_steps={self.log_every_n_steps}): the Trainer has no logger "
                "(logger=False), so the xgrad/* metrics reach trainer.callback_metrics only (ModelCheckpoint and "
                "EarlyStopping can monitor them there). Give the Trainer a logger to record them, or set "
                "log_every_n_steps=None to measure nothing."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self._restore_all(stepped=False)
        finally:
            for handle in self._module_hooks:
                handle.remove()
            self._module_hooks = []
            self._unpublished = {}
            for predictor in self._predictors.values():
                predictor.close()
            self._predictors = {}
            self._snapshot.clear()

    # ------------------------------------------------------------------ optimizers
    def _attach_optimizers(self, trainer: pl.Trainer) -> list[int]:
        """Predictors and step hooks for ``trainer.optimizers``, keeping those of optimizers already known; returns
        the indices of the new ones. Runs at the start of fit and whenever the optimizers changed (a callback may
        assign ``trainer.strategy.optimizers`` during fit)."""
        optimizers = list(trainer.optimizers)
        _check_optimizers(optimizers)
        known = {id(predictor.optimizer): predictor for predictor in self._predictors.values()}
        current = {id(optimizer) for optimizer in optimizers}
        for key, predictor in known.items():
            if key not in current:
                predictor.close()
        self._predictors = {}
        new: list[int] = []
        names: dict[Tensor, str] = {p: name for name, p in trainer.lightning_module.named_parameters()}
        for index, optimizer in enumerate(optimizers):
            kept = known.get(id(optimizer))
            if kept is None:
                kept = OptimizerPredictor(
                    optimizer,
                    self.steps,
                    self.rule,
                    self._snapshot,
                    self.compile,
                    _direction_scales(trainer, optimizer),
                    self.chunk_bytes,
                    names,
                )
                new.append(index)
            self._predictors[id(optimizer)] = kept
        return new

    def _follow_optimizer_changes(self, trainer: pl.Trainer) -> None:
        """At the start of a window: predict for the optimizers the strategy holds now (O(number of optimizers))."""
        optimizers = trainer.optimizers
        predictors = self._predictors.values()
        if len(optimizers) == len(predictors) and all(
            predictor.optimizer is optimizer for predictor, optimizer in zip(predictors, optimizers, strict=True)
        ):
            return
        self._announce(trainer, self._attach_optimizers(trainer))

    def _announce(self, trainer: pl.Trainer, indices: Any) -> None:
        """Log, once per optimizer, which rule it predicts with: a line at INFO, and the loggers' hyperparameters
        ``xgrad/rule`` (``xgrad/rule/optimizer_<i>`` with several optimizers) and ``xgrad/steps``; and warn about
        what an optimizer without step hooks cannot do."""
        count = len(trainer.optimizers)
        hyperparams: dict[str, Any] = {}
        for index in indices:
            optimizer = trainer.optimizers[index]
            if not optimizer.param_groups:  # Lightning's stand-in when configure_optimizers returns None
                continue
            predictor = self._predictors[id(optimizer)]
            if not predictor.guards_step:
                self._warn_no_step_hooks(index, predictor, trainer.lightning_module.automatic_optimization)
            rule = predictor.describe()
            rank_zero_info(
                f"XGradCallback: optimizer {index} ({type(optimizer).__name__}) predicts with the {rule} rule, "
                f"steps={self.steps}"
            )
            hyperparams[_per_optimizer("xgrad/rule", index, count)] = rule
        if hyperparams:
            hyperparams["xgrad/steps"] = self.steps
        # A key is logged once per fit: an optimizer replaced later at the same index is announced by the line above
        # only (MLflow, for one, refuses a parameter whose value changes).
        hyperparams = {key: value for key, value in hyperparams.items() if key not in self._logged_hyperparams}
        if hyperparams:
            self._logged_hyperparams.update(hyperparams)
            for logger in trainer.loggers:
                logger.log_hyperparams(hyperparams)

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_open:  # a later micro-batch of the window; carry on after a validation if one ran
            for predictor in self._predictors.values():
                predictor.resume()
            return
        self._follow_optimizer_changes(trainer)
        self._window_open = True
        # No prediction where no gradient will be taken: StochasticWeightAveraging's last epoch only recomputes
        # BatchNorm statistics (at the averaged weights), with backward skipped.
        self._window_enabled = trainer.global_step >= self.start_step and not backward_is_skipped(trainer)
        enabled = self._window_enabled
        # every predictor predicts; the indices of those that moved a parameter
        predicted = [i for i, predictor in enumerate(self._predictors.values()) if predictor.predict(enabled)]
        if predicted and self._should_log(trainer):
            self._start_logging_window(trainer, predicted)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._restore_for_step(optimizer)

    def restore_real_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the real weights of ``optimizer``'s parameters back now, ahead of its update (idempotent).

        For other callbacks that read the weights in ``on_before_optimizer_step`` (CPropCallback): calling this
        first makes them independent of the order of the callback list.
        """
        self._restore_for_step(optimizer)

    def _restore_for_step(self, optimizer: torch.optim.Optimizer) -> None:
        # With several optimizers (manual optimization) each step restores its own optimizer's parameters; the
        # others keep their prediction until they step or the batch ends.
        predictor = self._predictors.get(id(optimizer))
        if predictor is not None:
            predictor.restore(stepped=True)
        else:  # an optimizer that appeared mid-window (predicted from the next window on): no update on W_hat
            _restore_each(self._predictors.values(), stepped=False)
        self._window_open = any(p.phase != "idle" for p in self._predictors.values())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A batch that ends the window but where an optimizer did not step (manual optimization that skips one,
        # an overridden optimizer_step that skips): the window is over, so the prediction must not outlive it.
        if not should_accumulate(trainer):
            self._restore_all(stepped=False)
        self._publish_callback_metrics(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_all(stepped=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_all(stepped=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for predictor in self._predictors.values():
            predictor.suspend()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # The user's exception is the one that must surface: a failing restore is reported, not raised.
        try:
            self._restore_all(stepped=False)
        except Exception as error:
            warnings.warn(
                f"XGradCallback: after {type(exception).__name__}, the real weights of some parameters could not be "
                f"put back ({type(error).__name__}: {error}); those parameters may hold predicted weights.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ reading and editing the real weights
    @staticmethod
    @contextmanager
    def real_weights(owner: pl.LightningModule | pl.Trainer) -> Iterator[None]:
        """Hold the real weights in the module for the duration of a ``with`` block, inside ``training_step``.

        Mid-step the module holds the predicted weights W_hat. Inside this context it holds the real weights,
        bit-exactly: read them (a BYOL/DINO teacher's EMA update) or edit them in place (a WGAN weight clamp), and
        the edits are kept. On exit the prediction is recomputed from the real weights as they are then, so the step
        carries on as if the edit had been made before it began.

        ``owner`` is the LightningModule (``self`` in ``training_step``) or the Trainer; the XGradCallback is found
        among ``trainer.callbacks``. Without one, outside a training step, in validation, or nested, it does
        nothing, so a module can use it whether or not XGrad is on::

            def training_step(self, batch, batch_idx):
                with XGradCallback.real_weights(self):
                    for p in self.critic.parameters():
                        p.clamp_(-0.01, 0.01)
                ...
        """
        if isinstance(owner, pl.Trainer):
            trainer: pl.Trainer | None = owner
        elif isinstance(owner, pl.LightningModule):
            try:
                trainer = owner.trainer
            except RuntimeError:  # not attached to a Trainer: nothing is predicted
                trainer = None
        else:
            raise argument_error(
                "XGradCallback.real_weights", "owner", "a LightningModule or a Trainer", owner, TypeError
            )
        callbacks = [c for c in trainer_callbacks(trainer) if isinstance(c, XGradCallback)]
        with ExitStack() as stack:
            for callback in callbacks:
                stack.enter_context(callback._real_weights_in_place())
            yield

    @contextmanager
    def _real_weights_in_place(self) -> Iterator[None]:
        predicted = [predictor for predictor in self._predictors.values() if predictor.phase == "predicted"]
        if self._holding_real_weights or not predicted:
            yield
            return
        self._holding_real_weights = True
        try:
            # as for a step that never happens: the trajectory rule keeps the displacement it extrapolated
            _restore_each(predicted, stepped=False)
            yield
        finally:
            self._holding_real_weights = False
        # only on a normal exit: after an exception the real weights stay and the window is over
        remade = [
            index
            for index, predictor in enumerate(self._predictors.values())
            if predictor in predicted and predictor.predict(self._window_enabled)
        ]
        if self._logging_step is not None:  # the window's metrics measure the prediction made now
            self._measure_updates(remade)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Not `state_dict()`: see the class docstring. Lightning still hands this back to load_state_dict on resume.
        checkpoint.setdefault("callbacks", {})[self.state_key] = self._checkpoint_state()

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "rule": self.rule,
            "optimizers": [predictor.state_dict() for predictor in self._predictors.values()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before the optimizers exist: applied in on_train_start.
        saved = (state_dict.get("steps", self.steps), state_dict.get("rule", self.rule))
        if saved != (self.steps, self.rule):
            rank_zero_warn(
                f"XGradCallback: the checkpoint was saved with steps={saved[0]}, rule={saved[1]!r}; this run uses "
                f"steps={self.steps}, rule={self.rule!r}, which apply from the resumed step on."
            )
        self._loaded_state = state_dict

    def _register_state_dict_hooks(self, pl_module: pl.LightningModule) -> None:
        """Make every ``state_dict()`` of the module report the real weights while a prediction is in place."""
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks = [
            register_real_weights_hook(module, self._real_values)
            for module in pl_module.modules()
            if any(True for _ in module.parameters(recurse=False))
        ]

    def _real_values(self) -> dict[Tensor, Tensor]:
        return {p: real for predictor in self._predictors.values() for p, _, real in predictor.predicted_params()}

    # ------------------------------------------------------------------ helpers
    def _restore_all(self, stepped: bool) -> None:
        self._window_open = False
        self._logging_step = None
        _restore_each(self._predictors.values(), stepped)

    def _should_log(self, trainer: pl.Trainer) -> bool:
        return self.log_every_n_steps is not None and trainer.global_step % self.log_every_n_steps == 0

    def _start_logging_window(self, trainer: pl.Trainer, predicted: Sequence[int]) -> None:
        """Log the relative shift of every optimizer that predicted (``predicted``: their indices), and measure each
        one's prediction against the update it applies in this window.

        To the loggers directly, at the step Lightning labels this batch's own metrics with (as LearningRateMonitor
        does): ``self.log`` from a batch-start hook would reach them only at the Trainer's cadence, repeated until
        overwritten. ``trainer.callback_metrics`` gets them through ``self.log(..., logger=False)`` at batch end."""
        self._logging_step = batches_that_stepped(trainer)
        self._trainer_loggers = list(trainer.loggers)
        predictors = list(self._predictors.values())
        self._publish(
            {
                _per_optimizer("xgrad/relative_shift", i, len(predictors)): relative_shift(
                    predictors[i].predicted_params(), predictors[i].chunk_bytes
                )
                for i in predicted
            }
        )
        self._measure_updates(predicted)

    def _measure_updates(self, indices: Sequence[int]) -> None:
        """Have the predictors at ``indices`` measure their prediction against the update they apply next."""
        predictors = list(self._predictors.values())
        for index in indices:
            predictor = predictors[index]
            report = partial(self._report_quality, index, len(predictors))
            predictor.measure_next_update(report, self.metrics_max_bytes, "XGradCallback", "metrics_max_bytes")

    def _warn_no_step_hooks(self, index: int, predictor: OptimizerPredictor, automatic: bool) -> None:
        """What cannot work for an optimizer whose steps nothing sees (training itself is exact: Lightning restores
        in on_before_optimizer_step), if the run needs it: raw steps in manual optimization, the update metrics."""
        lost = []
        if not automatic:
            lost.append(
                "a raw `optimizer.step()` can neither put the real weights back first nor be seen by the trajectory "
                "rule: in manual optimization, step it through the LightningOptimizer that `self.optimizers()` "
                "returns"
            )
        if self.log_every_n_steps is not None:
            lost.append("xgrad/prediction_cosine and xgrad/prediction_error cannot be measured for it")
        if lost:
            rank_zero_warn(
                f"XGradCallback: optimizer {index} ({type(predictor.optimizer).__name__}) runs no step hooks (it does "
                f"not call torch.optim.Optimizer.__init__, and wraps no optimizer that does), so {'; and '.join(lost)}."
            )

    def _report_quality(self, index: int, count: int, quality: PredictionQuality) -> None:
        """A predictor measured the update after its prediction: log the cosine and the error."""
        self._publish(
            {
                _per_optimizer("xgrad/prediction_cosine", index, count): quality.cosine,
                _per_optimizer("xgrad/prediction_error", index, count): quality.error,
            }
        )

    def _publish(self, metrics: dict[str, float]) -> None:
        """To the loggers now, at the logging window's step; to ``trainer.callback_metrics`` at batch end."""
        for logger in self._trainer_loggers:
            logger.log_metrics(metrics, step=self._logging_step)
        self._unpublished.update(metrics)

    def _publish_callback_metrics(self, pl_module: pl.LightningModule) -> None:
        metrics, self._unpublished = self._unpublished, {}
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, prog_bar=self.prog_bar)


def _per_optimizer(name: str, index: int, count: int) -> str:
    """A logged name for optimizer ``index`` of ``count``: ``name`` itself with one optimizer, else
    ``name/optimizer_<index>`` (the index in ``trainer.optimizers``)."""
    return name if count == 1 else f"{name}/optimizer_{index}"


def _direction_scales(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> DirectionScales | None:
    """The live elementwise scales a callback applies to ``optimizer``'s updates (CPropCallback), so the prediction
    follows the update the optimizer will really apply; ``None`` without such a callback."""
    scales = None
    for callback in trainer_callbacks(trainer):
        if isinstance(callback, DirectionScaleProvider):
            scales = callback.xgrad_direction_scales(optimizer)
    return scales


def _check_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
    """Refuse what XGrad cannot predict correctly: closure re-evaluating optimizers, parameters in two optimizers."""
    for index, optimizer in enumerate(optimizers):
        if isinstance(optimizer, CLOSURE_REEVALUATING):
            raise MisconfigurationException(
                f"XGradCallback cannot be used with {type(optimizer).__name__} (optimizer {index}): it evaluates "
                "the closure several times per step, so the gradients would be taken at the real weights after "
                "the first evaluation. Use a first-order optimizer such as SGD, Adam or AdamW."
            )
    owner: dict[torch.Tensor, int] = {}
    for index, optimizer in enumerate(optimizers):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if owner.setdefault(p, index) != index:
                    raise MisconfigurationException(
                        f"XGradCallback: a parameter of shape {tuple(p.shape)} belongs to optimizers "
                        f"{owner[p]} and {index}; each parameter must belong to one optimizer, since each "
                        "optimizer's step restores its own parameters."
                    )


def _restore_each(predictors: Any, stepped: bool) -> None:
    """Restore every predictor even if one fails; the first failure is raised after all were tried."""
    errors = []
    for predictor in predictors:
        try:
            predictor.restore(stepped=stepped)
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]
