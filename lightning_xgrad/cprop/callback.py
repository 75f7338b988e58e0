"""CPropCallback: CProp's conformity scale on top of any optimizer, as a Lightning callback.

Each optimizer step applies some update ``W_after - W_before``; the callback replaces it by
``scale * (W_after - W_before)``, elementwise, with CProp's scale from the gradients this step and the ones before
(:mod:`lightning_xgrad.cprop.statistics`). This is the official code's universal ``CProp`` wrapper
(``cprop/cprop_universal.py``: statistics from ``p.grad`` after the inner step, then
``before + (after - before) * scale``) driven by Lightning's hooks instead of a wrapper class, so the optimizer the
LightningModule configures stays what it is (its type, its state, its schedulers, its checkpoints).

When it acts, per optimizer:

- ``on_before_optimizer_step`` (gradients complete and, under 16-bit AMP, already unscaled; before clipping and the
  update): every XGradCallback first puts the real weights back (so the list order of the callbacks does not
  matter), then W_before is copied into buffers allocated once;
- the optimizer's step post-hook (runs only when the optimizer really stepped: a step that AMP's GradScaler skips
  changes nothing): the gradients still in ``p.grad`` (unscaled, clipped if clipping is on) update the statistics,
  the scale is computed, and ``W = W_before + scale * (W - W_before)`` is written in place.

Supported: automatic optimization (with gradient accumulation, clipping, 16-bit AMP, bf16), manual optimization through
the LightningOptimizer that ``self.optimizers()`` returns, and raw ``optimizer.step()`` calls on the optimizer itself:
without a closure, W_before is taken in the step's pre-hook; with one, right after the closure ran (an optimizer that
evaluates it several times, such as LBFGS, gets its whole step scaled). Parameters without a gradient in a step are left
alone. DTensor parameters (FSDP2, tensor parallel) work on their local shards, with no communication, but a checkpoint
leaves their statistics out (a resume restarts them). The statistics have the parameter's dtype, as in the official
code; their variance is an exact moving variance rather than the official ``v_hat - m_hat^2`` (the same number in exact
arithmetic, see :mod:`lightning_xgrad.cprop.statistics`), so the first step's scale is not float rounding noise. Not
supported: strategies whose optimizer does not update the module's parameters directly (DeepSpeed, FSDP1's flat
parameters), and optimizers without step hooks anywhere (refused: their update cannot be seen).

Under XGrad the prediction must follow the update that is really applied: ``CPropCallback.xgrad_direction_scales``
hands XGradCallback the live per-parameter scales of the last step, and XGrad's state rules predict with
``scale * dW`` (the trajectory rule needs nothing: it extrapolates the update as scaled). The two callbacks find each
other through :mod:`lightning_xgrad.protocols`; the work per optimizer is :mod:`lightning_xgrad.cprop.tracker`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .._internal.checkpoint import CheckpointedState, count_instances
from .._internal.compat import trainer_callbacks
from .._internal.optimizers import register_step_hooks, step_closure, with_closure
from .._internal.validation import check_int
from ..protocols import RealWeightsRestorer
from .statistics import ConformityCDF, check_conformity_args
from .tracker import OptimizerConformity


class CPropCallback(CheckpointedState, Callback):
    r"""Scale every optimizer update elementwise by CProp's gradient conformity (Preechakul and Kijsirikul, 2019).

    Per element, from the gradients g of its steps so far (exponential moving averages with bias correction)::

        m_hat, v_hat = EMA_beta(g) / (1 - beta^t), EMA_beta(g^2) / (1 - beta^t);  n = (1 - beta^t) / (1 - beta)
        se    = sqrt(max(v_hat - m_hat^2, 0) / (n - 1 + eps)) + eps
        scale = min(1, c * |2 * Phi(-m_hat / se) - 1|)
        W     = W_before + scale * (W_after - W_before)

    so an element whose recent gradients agree in sign keeps its full update and one whose gradients flip is slowed
    down, whatever the optimizer. Works with any optimizer the LightningModule configures; see the module docstring
    for when it acts and what is supported. Composes with :class:`~lightning_xgrad.XGradCallback` in either order.

    The variance ``v_hat - m_hat^2`` is kept as an exact moving variance (an EMA of squared deviations from the
    running mean), not computed as that difference as the official code does: the same number in exact arithmetic,
    but exactly 0 after the first gradient (where the official float32 difference, divided by ``n - 1 + eps = eps``,
    makes the first scale rounding noise) and free of cancellation later (:mod:`lightning_xgrad.cprop.statistics`).

    Args:
        beta: decay of the moving averages (the official default 0.999: about the last thousand steps).
        c: confidence multiplier; ``c > 1`` scales fewer elements down, ``c < 1`` more.
        eps: added to the effective sample count and to the standard error; must be > 0.
        cdf: ``"bft"``, a logistic fit of the normal CDF (Bowling et al. 2009, the official default), or
            ``"normal"``, the exact one.
        chunk_bytes: the memory budget of the statistics' temporaries, in bytes: the foreach ops walk the
            parameters in chunks of at most ``max(largest tensor, chunk_bytes)``; ``None``: the default of the
            parameters' device, as for :class:`~lightning_xgrad.XGradCallback`'s ``chunk_bytes``.

    Example::

        trainer = Trainer(callbacks=[CPropCallback(), XGradCallback(steps=1)])
    """

    def __init__(
        self,
        beta: float = 0.999,
        c: float = 1.0,
        eps: float = 1e-8,
        cdf: ConformityCDF = "bft",
        chunk_bytes: int | None = None,
    ) -> None:
        check_conformity_args("CPropCallback", beta, c, eps, cdf)
        check_int("CPropCallback", "chunk_bytes", chunk_bytes, minimum=0, allow_none=True)
        self.beta = float(beta)
        self.c = float(c)
        self.eps = float(eps)
        self.cdf: ConformityCDF = cdf
        self.chunk_bytes = chunk_bytes
        self._trackers: dict[int, OptimizerConformity] = {}
        self._scales: dict[int, dict[Tensor, Tensor]] = {}
        self._restorers: list[RealWeightsRestorer] = []
        self._hook_handles: list[RemovableHandle] = []

    warn = staticmethod(rank_zero_warn)

    def xgrad_direction_scales(self, optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor]:
        """The live ``parameter -> scale of its last step`` dict of ``optimizer`` (empty before its first step),
        for XGradCallback's prediction (:class:`~lightning_xgrad.protocols.DirectionScaleProvider`); its tensors are
        updated in place every step."""
        return self._scales.setdefault(id(optimizer), {})

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        count = count_instances(trainer, CPropCallback)
        if stage == "fit" and count > 1:
            raise MisconfigurationException(
                f"CPropCallback was added {count} times to the Trainer's callbacks; add it once (each would scale "
                "every update again)."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # XGradCallback, found by what it does rather than by its class (the callbacks import each other not)
        self._restorers = [c for c in trainer_callbacks(trainer) if isinstance(c, RealWeightsRestorer)]
        self._trackers = {}  # a new fit starts from fresh statistics, unless a checkpoint restores them
        settings = (self.beta, self.c, self.eps, self.cdf)
        for optimizer in trainer.optimizers:
            scales = self.xgrad_direction_scales(optimizer)
            tracker = OptimizerConformity(optimizer, scales, *settings, chunk_bytes=self.chunk_bytes)
            self._trackers[id(optimizer)] = tracker
            handles = register_step_hooks(
                optimizer, pre=self._pre_step_hook(tracker), post=lambda *_, t=tracker: t.scale_update()
            )
            if handles is None:
                raise MisconfigurationException(
                    f"CPropCallback cannot scale the updates of {type(optimizer).__name__}: it runs no step hooks "
                    "(it does not call torch.optim.Optimizer.__init__, and wraps no optimizer that does and shares "
                    "its param groups), so its update cannot be seen before and after it is applied."
                )
            self._hook_handles += handles

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed callback's state is loaded after on_fit_start: apply it now, before the first step.
        loaded = self.take_loaded_state()
        if loaded is not None:
            for tracker, state in zip(self._trackers.values(), loaded.get("optimizers", []), strict=False):
                tracker.load_state_dict(state)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for tracker in self._trackers.values():  # kept: state_dict() after fit still has the statistics
            tracker.release()
        self._scales = {}
        self._restorers = []

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        tracker = self._trackers.get(id(optimizer))
        if tracker is None or (tracker.in_step and tracker.snapshot_taken):  # a closure evaluated again (LBFGS)
            return
        self._snapshot(tracker)

    def _snapshot(self, tracker: OptimizerConformity) -> None:
        for restorer in self._restorers:
            restorer.restore_real_weights(tracker.optimizer)
        tracker.snapshot()

    def _pre_step_hook(self, tracker: OptimizerConformity) -> Callable[..., Any]:
        """Start of the optimizer's step. Without a closure the gradients are ready (AMP's ``scaler.step`` after
        on_before_optimizer_step, or a raw step): snapshot unless on_before_optimizer_step just did. With one, the
        closure computes them: Lightning's calls on_before_optimizer_step inside; any other gets wrapped so that
        W_before is taken once it returns."""

        def hook(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            tracker.in_step = True
            closure = step_closure(args, kwargs)
            if closure is None:
                if not tracker.snapshot_taken:
                    self._snapshot(tracker)
                return None
            tracker.snapshot_taken = False

            def closure_then_snapshot() -> Any:
                result = closure()
                if not tracker.snapshot_taken:
                    self._snapshot(tracker)
                return result

            return with_closure(args, kwargs, closure_then_snapshot)

        return hook

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {**self.settings(), "optimizers": [tracker.state_dict() for tracker in self._trackers.values()]}

    def settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "c": self.c, "eps": self.eps, "cdf": self.cdf}
