"""CPropCallback: CProp's conformity scale on top of any optimizer, as a Lightning callback.

Each optimizer step applies some update ``W_after - W_before``; the callback replaces it by
``scale * (W_after - W_before)``, elementwise, with CProp's scale from the gradients this step and the ones before
(:mod:`lightning_xgrad.conformity`). This is the official code's universal ``CProp`` wrapper
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

Supported: automatic optimization (with gradient accumulation, clipping, 16-bit AMP, bf16), manual optimization
through the LightningOptimizer that ``self.optimizers()`` returns, and raw ``optimizer.step()`` calls on the
optimizer itself: without a closure, W_before is taken in the step's pre-hook; with one, right after the closure
ran (an optimizer that evaluates it several times, such as LBFGS, gets its whole step scaled). Parameters without a
gradient in a step are left alone. DTensor parameters (FSDP2, tensor parallel) work on their local shards, with no
communication, but a checkpoint leaves their statistics out (a resume restarts them). The statistics have the
parameter's dtype, as in the official code; their variance is an exact moving variance rather than the official
``v_hat - m_hat^2`` (the same number in exact arithmetic, see :mod:`lightning_xgrad.conformity`), so the first step's
scale is not float rounding noise. A checkpoint saved by an earlier version, with the old (m, v) statistics,
resumes with a warning and its variance converted approximately. Not supported: strategies whose optimizer does not
update the module's parameters directly (DeepSpeed, FSDP1's flat parameters).

Under XGrad the prediction must follow the update that is really applied: ``CPropCallback.xgrad_direction_scales``
hands XGradCallback the live per-parameter scales of the last step, and XGrad's state rules predict with
``scale * dW`` (the trajectory rule needs nothing: it extrapolates the update as scaled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .callback import XGradCallback
from .conformity import (
    LEGACY_LAYOUT_WARNING,
    ConformityCDF,
    check_conformity_args,
    conformity_scale_,
    scale_applied_update_,
    update_statistics_,
    variance_from_square_mean,
)
from .rules._foreach import ScalarColumn, steps_as_floats
from .sharding import DTensor, local_tensor


@dataclass(eq=False)
class _Bucket:
    """Parameters of one optimizer on one device and dtype that have a gradient this step, with their state."""

    owners: list[Tensor]  # the parameters (keys of the state and of the scale dict)
    params: list[Tensor]  # the tensors the math runs on: local shards, complex as real views
    befores: list[Tensor]
    exp_avgs: list[Tensor]
    exp_vars: list[Tensor]
    steps: list[Tensor]
    scales: list[Tensor]


class _OptimizerConformity:
    """The statistics, snapshot buffers and scales of one optimizer's parameters, and the snapshot/scale steps."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, scales: dict[Tensor, Tensor], settings: tuple[float, float, float, Any]
    ) -> None:
        self.optimizer = optimizer
        self.scales = scales  # the live dict XGradCallback reads: parameter -> scale of its last step
        self.beta, self.c, self.eps, self.cdf = settings
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self._befores: dict[Tensor, Tensor] = {}
        self._plan_key: tuple[int, ...] | None = None
        self._buckets: list[_Bucket] = []
        self.in_step = False  # between the optimizer's step pre-hook and post-hook
        self.snapshot_taken = False  # W_before is in the buffers for the update to come

    # ------------------------------------------------------------------ plan
    def _with_grad(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad and p.grad is not None]

    def _entry(self, p: Tensor, local: Tensor) -> dict[str, Tensor]:
        entry = self.state.get(p)
        if entry is None:
            zeros = torch.zeros_like(local, memory_format=torch.preserve_format)
            entry = self.state[p] = {
                "exp_avg": zeros,
                "exp_var": torch.zeros_like(zeros),  # the moving variance, bias-corrected as exp_avg
                "step": torch.zeros((), dtype=torch.float64),
                # 1 (no scaling) until its first step; XGrad reads it only once the optimizer has state
                "scale": torch.ones_like(zeros),
            }
        self.scales[p] = entry["scale"]
        return entry

    def _ensure_plan(self, owners: list[Tensor]) -> None:
        key = tuple(map(id, owners))
        if key == self._plan_key:
            return
        grouped: dict[tuple[Any, ...], _Bucket] = {}
        for p in owners:
            local = local_tensor(p)
            entry = self._entry(p, local)
            before = self._befores.get(p)
            if before is None or before.shape != local.shape or before.dtype != local.dtype:
                before = self._befores[p] = torch.empty_like(local).detach()
            bucket = grouped.setdefault((local.device, local.dtype), _Bucket([], [], [], [], [], [], []))
            bucket.owners.append(p)
            bucket.params.append(local)
            bucket.befores.append(before)
            bucket.exp_avgs.append(entry["exp_avg"])
            bucket.exp_vars.append(entry["exp_var"])
            bucket.steps.append(entry["step"])
            bucket.scales.append(entry["scale"])
        for bucket in grouped.values():  # step counts read through NumPy views every step
            bucket.steps = ScalarColumn(bucket.steps)
        self._buckets = list(grouped.values())
        self._plan_key = key

    def release(self) -> None:
        """Free the snapshot buffers (the end of fit); the statistics stay for ``state_dict``."""
        self._befores.clear()
        self._buckets = []
        self._plan_key = None
        self.in_step = self.snapshot_taken = False

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def snapshot(self) -> None:
        """W_before <- W for the parameters that have a gradient now (call with the real weights in place)."""
        self._ensure_plan(self._with_grad())
        for bucket in self._buckets:
            torch._foreach_copy_(bucket.befores, bucket.params)
        self.snapshot_taken = True

    @torch.no_grad()
    def scale_update(self) -> None:
        """After the optimizer's update: fold this step's gradients into the statistics, compute the scale, and
        rescale the update just applied, ``W = W_before + scale * (W - W_before)``."""
        self.in_step = False
        if not self.snapshot_taken:  # the optimizer never evaluated its closure: nothing to rescale from
            return
        self.snapshot_taken = False
        for bucket in self._buckets:
            grads = [local_tensor(p.grad) for p in bucket.owners]
            torch._foreach_add_(bucket.steps, 1.0)
            ts = steps_as_floats(bucket.steps)
            update_statistics_(bucket.exp_avgs, bucket.exp_vars, grads, ts, self.beta)
            settings = (self.beta, self.c, self.eps, self.cdf)
            conformity_scale_(bucket.scales, bucket.exp_avgs, bucket.exp_vars, ts, *settings)
            scale_applied_update_(bucket.params, bucket.befores, bucket.scales)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[int, dict[str, Any]]:
        """Statistics by flat parameter index in param-group order, as ``optimizer.state_dict()`` numbers them.
        Sharded (DTensor) parameters are left out: a resume restarts their statistics."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        out: dict[int, dict[str, Any]] = {}
        for index, p in enumerate(params):
            entry = self.state.get(p)
            if entry is None or isinstance(p, DTensor):
                continue
            out[index] = {
                "exp_avg": entry["exp_avg"],
                "exp_var": entry["exp_var"],
                "step": float(entry["step"]),
                "scale": entry["scale"],
            }
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[int, dict[str, Any]]) -> None:
        """Load :meth:`state_dict`'s output; the scales stay the same tensors XGradCallback holds. Entries saved by
        an earlier version (``exp_avg_sq``, the moving average of g^2, instead of ``exp_var``) are converted
        approximately, with a warning; an entry with neither is refused."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        converted = False
        for index, saved in state.items():
            if "exp_var" not in saved and "exp_avg_sq" not in saved:
                raise ValueError(
                    f"CPropCallback: the checkpoint's statistics of parameter {index} have neither 'exp_var' nor the "
                    f"older 'exp_avg_sq', got {sorted(saved)}"
                )
            p = params[int(index)]
            entry = self._entry(p, local_tensor(p))
            step = float(saved["step"])
            for name in ("exp_avg", "scale"):
                entry[name].copy_(saved[name])
            if "exp_var" in saved:
                entry["exp_var"].copy_(saved["exp_var"])
            else:
                entry["exp_var"].copy_(
                    variance_from_square_mean(saved["exp_avg"], saved["exp_avg_sq"], step, self.beta)
                )
                converted = True
            entry["step"].fill_(step)
        if converted:
            rank_zero_warn("CPropCallback: " + LEGACY_LAYOUT_WARNING.format(old="exp_avg_sq", new="exp_var"))
        self._plan_key = None


class CPropCallback(Callback):
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
    makes the first scale rounding noise) and free of cancellation later (:mod:`lightning_xgrad.conformity`).

    Args:
        beta: decay of the moving averages (the official default 0.999: about the last thousand steps).
        c: confidence multiplier; ``c > 1`` scales fewer elements down, ``c < 1`` more.
        eps: added to the effective sample count and to the standard error; must be > 0.
        cdf: ``"bft"``, a logistic fit of the normal CDF (Bowling et al. 2009, the official default), or
            ``"normal"``, the exact one.

    Example::

        trainer = Trainer(callbacks=[CPropCallback(), XGradCallback(steps=1)])
    """

    def __init__(self, beta: float = 0.999, c: float = 1.0, eps: float = 1e-8, cdf: ConformityCDF = "bft") -> None:
        check_conformity_args("CPropCallback", beta, c, eps, cdf)
        self.beta = float(beta)
        self.c = float(c)
        self.eps = float(eps)
        self.cdf: ConformityCDF = cdf
        self._trackers: dict[int, _OptimizerConformity] = {}
        self._scales: dict[int, dict[Tensor, Tensor]] = {}
        self._xgrads: list[XGradCallback] = []
        self._hook_handles: list[RemovableHandle] = []
        self._loaded_state: dict[str, Any] | None = None

    def xgrad_direction_scales(self, optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor]:
        """The live ``parameter -> scale of its last step`` dict of ``optimizer`` (empty before its first step),
        for XGradCallback's prediction; its tensors are updated in place every step."""
        return self._scales.setdefault(id(optimizer), {})

    # ------------------------------------------------------------------ setup and teardown
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._xgrads = [callback for callback in trainer.callbacks if isinstance(callback, XGradCallback)]
        self._trackers = {}  # a new fit starts from fresh statistics, unless a checkpoint restores them
        settings = (self.beta, self.c, self.eps, self.cdf)
        for optimizer in trainer.optimizers:
            tracker = _OptimizerConformity(optimizer, self.xgrad_direction_scales(optimizer), settings)
            self._trackers[id(optimizer)] = tracker
            self._hook_handles.append(optimizer.register_step_pre_hook(self._pre_step_hook(tracker)))
            self._hook_handles.append(optimizer.register_step_post_hook(lambda *_, t=tracker: t.scale_update()))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed callback's state is loaded after on_fit_start: apply it now, before the first step.
        if self._loaded_state is not None:
            for tracker, state in zip(self._trackers.values(), self._loaded_state.get("optimizers", []), strict=False):
                tracker.load_state_dict(state)
            self._loaded_state = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for tracker in self._trackers.values():  # kept: state_dict() after fit still has the statistics
            tracker.release()
        self._scales = {}
        self._xgrads = []

    # ------------------------------------------------------------------ the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        tracker = self._trackers.get(id(optimizer))
        if tracker is None or (tracker.in_step and tracker.snapshot_taken):  # a closure evaluated again (LBFGS)
            return
        self._snapshot(tracker)

    def _snapshot(self, tracker: _OptimizerConformity) -> None:
        for xgrad in self._xgrads:
            xgrad.restore_real_weights(tracker.optimizer)
        tracker.snapshot()

    def _pre_step_hook(self, tracker: _OptimizerConformity) -> Callable[..., Any]:
        """Start of the optimizer's step. Without a closure the gradients are ready (AMP's ``scaler.step`` after
        on_before_optimizer_step, or a raw step): snapshot unless on_before_optimizer_step just did. With one, the
        closure computes them: Lightning's calls on_before_optimizer_step inside; any other gets wrapped so that
        W_before is taken once it returns."""

        def hook(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            tracker.in_step = True
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
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

            if "closure" in kwargs:
                return args, {**kwargs, "closure": closure_then_snapshot}
            return (args[0], closure_then_snapshot, *args[2:]), kwargs

        return hook

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._loaded_state is not None:  # loaded, not applied yet
            return self._loaded_state
        return {
            "beta": self.beta,
            "cdf": self.cdf,
            "optimizers": [tracker.state_dict() for tracker in self._trackers.values()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs after on_fit_start but before the optimizers' own state is final: applied in on_train_start.
        self._loaded_state = state_dict
