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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.hooks import RemovableHandle

from ._internal.checkpoint import CheckpointedState
from ._internal.compat import backward_is_skipped, batches_that_stepped, should_accumulate, trainer_callbacks
from ._internal.validation import argument_error, check_flag, check_int
from .callback_checks import check_setup, warn_without_step_hooks
from .callback_metrics import MetricsLog
from .callback_predictors import Predictors
from .prediction.arguments import RuleChoice, check_prediction_args
from .prediction.quality import DEFAULT_METRICS_MAX_BYTES
from .prediction.state_dict_hook import register_real_weights_hooks
from .rules.compiled import DEFAULT_COMPILE_MIN_BYTES


@dataclass
class _Window:
    """An optimizer step in progress: from its first micro-batch to its update (or the batch that ends it)."""

    #: whether it predicts (not before ``start_step``, nor in an epoch without backward)
    enabled: bool
    #: inside :meth:`XGradCallback.real_weights`
    holding_real_weights: bool = False


class XGradCallback(CheckpointedState, Callback):
    r"""Train with gradients taken at predicted future weights (XGrad, Guan et al., TPAMI 2024).

    Works with the optimizer(s) the LightningModule configures. dW comes from the optimizer's own state where a rule
    knows it (torch's SGD and RMSprop with momentum, Adam, AdamW, Adamax and RAdam; this package's AdaM3, CPropSGD,
    CPropAdam, AdaptiveHeavyBallSGD and AdaptiveHeavyBallAdam; pytorch-optimizer's AdaBelief; any optimizer a rule
    was registered for with :func:`~lightning_xgrad.register_rule`), otherwise from the update the optimizer applied
    at its last step (the trajectory rule, exact for any optimizer). The table "Supported optimizers and their dW"
    in docs/optimizers.md has the formulas.

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
            passes, for the Adam, AdamW and AdaM3 rules (others stay eager: the momentum rules' eager prediction, one
            copy and one add, is faster than a compiled one), where the parameters of a param group on one device
            and dtype hold at least ``compile_min_bytes`` (smaller ones stay eager too). Costs a compilation at the
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
        compile_min_bytes: with ``compile=True``, the fewest parameter bytes a param group (on one device and
            dtype) must hold to be compiled: below a few MiB the compiled call's fixed cost outweighs the passes it
            saves, and eager is faster. Default 4 MiB, measured on a CPU; 0 compiles every group.

    The rule each optimizer got is logged once at INFO and as logger hyperparameters (``xgrad/rule``, or
    ``xgrad/rule/optimizer_<index>``, and ``xgrad/steps``).

    Add it once: two instances would predict on top of each other, so a second one is refused at the start of fit.
    Its checkpoint state (what the trajectory rule needs after a resume) is kept as
    :mod:`lightning_xgrad._internal.checkpoint` describes, under ``checkpoint["callbacks"]["XGradCallback"]``.

    Example::

        trainer = Trainer(callbacks=[XGradCallback(steps=1)])
    """

    warn = staticmethod(rank_zero_warn)

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
        compile_min_bytes: int = DEFAULT_COMPILE_MIN_BYTES,
    ) -> None:
        # the predictor's checks and messages
        check_prediction_args("XGradCallback", steps, rule, compile, chunk_bytes, compile_min_bytes)
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
        self.compile_min_bytes = compile_min_bytes
        self._predictors = Predictors(steps, rule, compile, chunk_bytes, compile_min_bytes)
        self._module_hooks: list[RemovableHandle] = []
        self._window: _Window | None = None  # None between windows
        self._metrics = MetricsLog(log_every_n_steps, metrics_max_bytes, prog_bar)

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_setup(trainer, XGradCallback)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._predictors.follow(trainer)
        # after configure_model and the strategy's setup: the final modules, and FSDP2's DTensor parameters
        for handle in self._module_hooks:
            handle.remove()
        self._module_hooks = register_real_weights_hooks(pl_module, self._predictors.real_values)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first hook where a resumed optimizer's state is in place (loaded after on_fit_start).
        loaded = self.take_loaded_state()
        if loaded is not None:
            self._predictors.load_state_dicts(loaded.get("optimizers", []))
        for predictor in self._predictors:
            predictor.invalidate()
        if not any(optimizer.param_groups for optimizer in trainer.optimizers):
            rank_zero_warn("XGradCallback: the model has no optimizer, so XGrad has nothing to predict.")
        self._announce(trainer, range(len(trainer.optimizers)))
        if (warning := self._metrics.unrecorded_warning(trainer.loggers)) is not None:  # after every on_fit_start
            rank_zero_warn(warning)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        try:
            self._close_window(stepped=False)
        finally:
            for handle in self._module_hooks:
                handle.remove()
            self._module_hooks = []
            self._metrics.clear()
            self._predictors.close()

    # ------------------------------------------------------------------ optimizers
    def _announce(self, trainer: pl.Trainer, indices: Any) -> None:
        """Say, once per optimizer, which rule it predicts with (at INFO and as the loggers' hyperparameters), and
        what an optimizer without step hooks cannot do."""
        rules: dict[int, str] = {}
        for index in indices:
            optimizer = trainer.optimizers[index]
            if not optimizer.param_groups:  # Lightning's stand-in when configure_optimizers returns None
                continue
            predictor = self._predictors.of(optimizer)
            assert predictor is not None  # announced after follow()
            automatic = trainer.lightning_module.automatic_optimization
            warn_without_step_hooks(index, predictor, automatic, self.log_every_n_steps is not None)
            rules[index] = predictor.describe()
            rank_zero_info(
                f"XGradCallback: optimizer {index} ({type(optimizer).__name__}) predicts with the {rules[index]} rule, "
                f"steps={self.steps}"
            )
        self._metrics.log_rules(trainer.loggers, rules, len(trainer.optimizers), self.steps)

    # ------------------------------------------------------------------ the window
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window is not None:  # a later micro-batch of the window; carry on after a validation if one ran
            for predictor in self._predictors:
                predictor.resume()
        else:
            self._open_window(trainer)

    def _open_window(self, trainer: pl.Trainer) -> None:
        """Predict for the optimizers the strategy holds now, and measure the window if its step is a logging one."""
        if new := self._predictors.follow(trainer):
            self._announce(trainer, new)
        # No prediction where no gradient will be taken: StochasticWeightAveraging's last epoch only recomputes
        # BatchNorm statistics (at the averaged weights), with backward skipped.
        self._window = _Window(enabled=trainer.global_step >= self.start_step and not backward_is_skipped(trainer))
        predictors = list(self._predictors)
        predicted = [i for i, predictor in enumerate(predictors) if predictor.predict(self._window.enabled)]
        if predicted and self._metrics.wants(trainer.global_step):
            self._metrics.open_window(batches_that_stepped(trainer), trainer.loggers, predictors, predicted)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.restore_real_weights(optimizer)

    def restore_real_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the real weights of ``optimizer``'s parameters back now, ahead of its update (idempotent).

        For other callbacks that read the weights in ``on_before_optimizer_step`` (CPropCallback): calling this
        first makes them independent of the order of the callback list. With several optimizers (manual
        optimization) each step restores its own optimizer's parameters; the others keep their prediction until
        they step or the batch ends.
        """
        predictor = self._predictors.of(optimizer)
        if predictor is not None:
            predictor.restore(stepped=True)
        else:  # an optimizer that appeared mid-window (predicted from the next window on): no update on W_hat
            self._predictors.restore(stepped=False)
        if self._predictors.idle():
            self._window = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A batch that ends the window but where an optimizer did not step (manual optimization that skips one,
        # an overridden optimizer_step that skips): the window is over, so the prediction must not outlive it.
        if not should_accumulate(trainer):
            self._close_window(stepped=False)
        self._metrics.publish(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window(stepped=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window(stepped=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for predictor in self._predictors:
            predictor.suspend()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # The user's exception is the one that must surface: a failing restore is reported, not raised.
        try:
            self._close_window(stepped=False)
        except Exception as error:
            warnings.warn(
                f"XGradCallback: after {type(exception).__name__}, the real weights of some parameters could not be "
                f"put back ({type(error).__name__}: {error}); those parameters may hold predicted weights.",
                stacklevel=2,
            )

    def _close_window(self, stepped: bool) -> None:
        """The window is over: every predictor restored (each even if another fails), the metrics window closed."""
        self._window = None
        self._metrics.close_window()
        self._predictors.restore(stepped)

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
        window = self._window
        predicted = self._predictors.predicted()
        if window is None or window.holding_real_weights or not predicted:
            yield
            return
        window.holding_real_weights = True
        try:
            # as for a step that never happens: the trajectory rule keeps the displacement it extrapolated
            self._predictors.restore(stepped=False, predictors=predicted)
            yield
        finally:
            window.holding_real_weights = False
        # only on a normal exit: after an exception the real weights stay and the window is over
        predictors = list(self._predictors)
        remade = [i for i, p in enumerate(predictors) if p in predicted and p.predict(window.enabled)]
        if self._metrics.step is not None:  # the window's metrics measure the prediction made now
            self._metrics.measure(predictors, remade)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """What a resume needs: the settings and, per optimizer, the trajectory rule's memory."""
        return {**self.settings(), "optimizers": self._predictors.state_dicts()}

    def settings(self) -> dict[str, Any]:
        return {"steps": self.steps, "rule": self.rule}
