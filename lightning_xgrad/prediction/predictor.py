"""Weight prediction for one optimizer, in plain PyTorch: predict before the forward pass, restore before the step.

    predictor = OptimizerPredictor(optimizer, steps=1)
    for batch in data:
        predictor.predict()            # W <- W_hat = W - steps * lr * dW, the real W kept in the snapshot
        loss_fn(model(batch)).backward()
        predictor.restore()            # W <- the real W, bit-exact
        optimizer.step()
        optimizer.zero_grad()

The XGrad callback drives one of these per optimizer from Lightning's hooks. Parameters are planned once into buckets
(one param group, one device and dtype, one rule; :mod:`lightning_xgrad.prediction.plan`), so predicting and restoring
are loops over the buckets, and the plan is rebuilt only when the optimizer's state, param groups or frozen parameters
change; per step the Python work per parameter is a ``requires_grad`` read and an identity comparison of the optimizer's
state entries with the planned ones, in C loops (no hashing, and nothing of the optimizer is replaced). A parameter that
has no optimizer state yet (a module unused in forward) is left out of the plan until its state appears. Foreach
temporaries are bounded by ``chunk_bytes`` (:mod:`lightning_xgrad._internal.chunks`).

The predictor guards the optimizer's step (through its step hooks, :mod:`lightning_xgrad._internal.optimizers`): a step
taken while the parameters hold W_hat restores the real weights first (a step with a closure: right after the
closure ran), so the update always lands on W. And it watches W_hat: a change made in place to a predicted
parameter between the prediction and the restore (which the restore would silently discard) is noticed through the
tensors' version counters, on the first windows and then periodically, and warned about once
(:class:`PredictedWeightsEditedWarning`).

Restoring is exception-safe: every bucket is restored even if one fails, and the first failure is raised after.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .._internal.optimizers import flat_params, register_step_hooks
from .._internal.sharding import DTensor, local_tensor
from .._internal.validation import argument_error
from ..protocols import DirectionScales, GradientPointObserver
from ..rules import TRAJECTORY, PredictionRule, TrajectoryRule, rule_for
from ..rules.compiled import DEFAULT_COMPILE_MIN_BYTES, CompiledKernels
from .arguments import RuleChoice, check_optimizer, check_prediction_args
from .edits import EditWatch
from .plan import Bucket, Plan
from .quality import DEFAULT_METRICS_MAX_BYTES, HeldPrediction, PredictionQuality
from .snapshot import ParameterSnapshot
from .step_guard import Measurement, check_after_step, measure_after_step, restore_before_step

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
Phase = Literal["idle", "predicted", "suspended"]
#: the state of an optimizer that keeps no mapping in ``state``
_NO_STATE: Mapping[Tensor, Any] = MappingProxyType({})


class OptimizerPredictor:
    """Predicts and restores the trainable parameters of one optimizer.

    Args:
        optimizer: any ``torch.optim.Optimizer`` whose ``step`` evaluates its closure at most once, or Fabric's or
            Lightning's wrapper of one (``fabric.setup``'s optimizer, ``LightningOptimizer``): the predictor reads
            the optimizer inside, which is what :attr:`optimizer` holds, and picks the rule of its class.
        steps: the paper's s, how many future updates to extrapolate.
        rule: ``"auto"`` reads dW from the optimizer's state where a rule is registered for its class and the
            group's options, else uses the trajectory rule; ``"trajectory"`` uses the trajectory rule everywhere.
        snapshot: the buffer cache to use (shared when several optimizers are predicted).
        compile: snapshot and predict in one ``torch.compile``d pass per tensor where the rule has a kernel (Adam,
            AdamW, AdaM3) and the bucket (the parameters of one param group on one device, of one dtype) holds at
            least ``compile_min_bytes``; compiled at the first prediction of each such bucket.
        direction_scales: elementwise scales the optimizer's updates get on top of its own rule, by parameter
            (CProp's conformity scale, from a :class:`~lightning_xgrad.protocols.DirectionScaleProvider`); a live
            mapping, read at every prediction. State rules then predict with ``scale * dW``; the trajectory rule
            needs none, since the update it extrapolates was already scaled.
        chunk_bytes: the memory budget of the temporaries, in bytes: out-of-place foreach ops (Adam's denominators,
            the trajectory rule's differences) walk the parameters in chunks of at most ``max(largest tensor,
            chunk_bytes)``, one call per op and chunk. ``None``: the default of the parameters' device
            (:func:`~lightning_xgrad._internal.chunks.default_chunk_bytes`: 32 MiB on an accelerator, 1 MiB on the CPU);
            0: chunks as small as the largest tensor.
        parameter_names: names of the parameters (``dict(model.named_parameters())`` inverted), for the warning
            about edits of W_hat; without a name a parameter is named by its param group, position and shape.
        compile_min_bytes: with ``compile=True``, buckets with fewer parameter bytes are predicted eagerly: below a
            few MiB the compiled call's fixed cost outweighs the passes it saves. Default 4 MiB
            (:data:`~lightning_xgrad.rules.compiled.DEFAULT_COMPILE_MIN_BYTES`, measured on a CPU); 0 compiles every
            bucket.

    An optimizer that needs the point where its gradients were taken (a
    :class:`~lightning_xgrad.protocols.GradientPointObserver`, the adaptive heavy-ball secant) gets a call to its
    ``observe_gradient_point()`` at every restore before an update, while the parameters still hold that point.

    The optimizer's step is guarded through its step hooks: a ``step()`` while the parameters hold the prediction
    restores the real weights first (with a closure: once the closure has run), exactly as :meth:`restore` before
    the step would, and a later :meth:`restore` does nothing. An optimizer that subclasses
    ``torch.optim.Optimizer`` without calling its ``__init__`` has no step hooks; the guard then uses those of an
    inner optimizer it wraps and shares its param groups with, and where there is none, a step before
    :meth:`restore` is noticed afterwards, as an edit of W_hat, and warned about.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int = 1,
        rule: RuleChoice = "auto",
        snapshot: ParameterSnapshot | None = None,
        compile: bool = False,
        direction_scales: DirectionScales | None = None,
        chunk_bytes: int | None = None,
        parameter_names: Mapping[Tensor, str] | None = None,
        compile_min_bytes: int = DEFAULT_COMPILE_MIN_BYTES,
    ) -> None:
        owner = type(self).__name__
        check_prediction_args(owner, steps, rule, compile, chunk_bytes, compile_min_bytes)
        if snapshot is not None and not isinstance(snapshot, ParameterSnapshot):
            raise argument_error(owner, "snapshot", "a ParameterSnapshot or None", snapshot, TypeError)
        if direction_scales is not None and not isinstance(direction_scales, Mapping):
            raise argument_error(
                owner, "direction_scales", "a mapping from parameters to scales, or None", direction_scales, TypeError
            )
        if parameter_names is not None and not isinstance(parameter_names, Mapping):
            raise argument_error(
                owner, "parameter_names", "a mapping from parameters to names, or None", parameter_names, TypeError
            )
        self.optimizer = check_optimizer(owner, optimizer)
        self.compile = compile
        self.compile_min_bytes = compile_min_bytes
        #: the budget given (``None``: the default of the parameters' device, 32 MiB, 1 MiB on the CPU)
        self.chunk_bytes = chunk_bytes
        self.steps = steps
        self.rule = rule
        self.snapshot = snapshot if snapshot is not None else ParameterSnapshot()
        self.phase: Phase = "idle"
        self._direction_scales: DirectionScales = direction_scales if direction_scales is not None else {}
        self._parameter_names: Mapping[Tensor, str] = parameter_names if parameter_names is not None else {}
        self._observer = self.optimizer if isinstance(self.optimizer, GradientPointObserver) else None
        self._kernels = CompiledKernels(compile_min_bytes) if compile else None
        self._buckets: list[Bucket] = []
        self._plan_key: tuple[Any, ...] | None = None
        self._plan: Plan | None = None
        #: trajectory memory loaded from a checkpoint, for the next plan: parameter -> lr of the update before it
        self._loaded_lr: dict[Tensor, float] = {}
        registered = None if rule == "trajectory" else rule_for(self.optimizer)
        #: the state rule of the optimizer's class, bound to it; ``None``: the trajectory rule for every group
        self._state_rule = None if registered is None else registered.bind(self.optimizer)
        #: a measurement of the next update asked for (:meth:`measure_next_update`), and W_hat held for it
        self._measurement: Measurement | None = None
        guard = register_step_hooks(self.optimizer, pre=restore_before_step(self), post=check_after_step(self))
        #: whether the optimizer's step is guarded (it or an optimizer it wraps runs step hooks)
        self.guards_step = guard is not None
        self._guard_handles: list[RemovableHandle] = guard or []
        self._edits = EditWatch(self.optimizer, self._parameter_names, self.guards_step)

    @property
    def direction_scales(self) -> DirectionScales:
        """The elementwise scales given at construction (empty when none)."""
        return self._direction_scales

    @direction_scales.setter
    def direction_scales(self, value: Any) -> None:
        raise AttributeError(
            "OptimizerPredictor: `direction_scales` is set at construction, "
            "OptimizerPredictor(optimizer, direction_scales=...), and read live from then on"
        )

    # ------------------------------------------------------------------ rules
    def group_rule(self, group: dict[str, Any]) -> PredictionRule | TrajectoryRule:
        """The rule a param group is predicted with: the state rule where there is one and it handles the group's
        options, else the trajectory rule."""
        rule = self._state_rule
        return rule if rule is not None and rule.handles(group) else TRAJECTORY

    def describe(self) -> str:
        """Which rule each param group gets, for the log line."""
        names = [self.group_rule(group).name for group in self.optimizer.param_groups]
        if len(set(names)) == 1:
            return names[0]
        return ", ".join(f"group {i}: {name}" for i, name in enumerate(names))

    # ------------------------------------------------------------------ plan
    def _state(self) -> Mapping[Tensor, Any]:
        """The optimizer's per-parameter state: any mapping it keeps in ``state`` (an optimizer with none, or with
        something that is not a mapping, has no state a rule could read)."""
        state = getattr(self.optimizer, "state", None)
        return state if isinstance(state, (dict, Mapping)) else _NO_STATE  # dict first: torch's, checked in C

    def _current_key(self) -> tuple[Any, ...]:
        groups = self.optimizer.param_groups
        return (
            tuple(len(g["params"]) for g in groups),
            tuple(map(_REQUIRES_GRAD, chain.from_iterable(g["params"] for g in groups))),
        )

    def _ensure_plan(self) -> None:
        key = self._current_key()
        state = self._state()
        plan = self._plan
        if (
            plan is None
            or key != self._plan_key
            or not plan.state_unchanged(state)
            # parameters left out for lack of state: a new entry changed the state; an incomplete one, its size
            or (plan.partial and not plan.partial_entries_unchanged())
        ):
            self._build_plan(key, state)

    def invalidate(self) -> None:
        """Force a new plan at the next prediction (after an in-place edit of one parameter's own state dict, which
        the predictor does not see: ``optimizer.state[p].clear()``)."""
        self._plan_key = None

    def _build_plan(self, key: tuple[Any, ...], state: Mapping[Tensor, Any]) -> None:
        known_lr = {p: lr for bucket in self._buckets for p, _, lr in bucket.checkpoint()}
        known_lr.update(self._loaded_lr)
        self._loaded_lr = {}
        plan = Plan(self.snapshot, state, self.chunk_bytes)
        for index, group in enumerate(self.optimizer.param_groups):
            params = [p for p in group["params"] if p.requires_grad]
            rule = self.group_rule(group)
            if isinstance(rule, PredictionRule):
                plan.add_state_group(index, params, rule, self._kernels)
            else:
                plan.add_trajectory_group(index, params, known_lr)
        self._buckets = plan.buckets
        self._plan = plan
        self._plan_key = key

    # ------------------------------------------------------------------ window
    @torch.no_grad()
    def predict(self, enabled: bool = True) -> bool:
        """Start a step: write W_hat into the parameters (the real W into the snapshot).

        With ``enabled=False`` nothing is predicted, but the trajectory rule still records the update this step
        applies, so the next step can extrapolate it. Returns whether any parameter now holds a prediction. If a
        rule fails, the parameters predicted so far get their real weights back before the error propagates.
        """
        if self.phase != "idle":
            raise RuntimeError(f"predict() called while the parameters are {self.phase}")
        self._end_measurement()
        self._ensure_plan()
        groups = self.optimizer.param_groups
        try:
            for bucket in self._buckets:
                bucket.predict(groups[bucket.group_index], self.steps, enabled, self._direction_scales)
        except BaseException:
            self.phase = "predicted"
            self.restore(stepped=False)
            raise
        self.phase = "predicted" if any(bucket.in_step for bucket in self._buckets) else "idle"
        predicted = any(bucket.modified for bucket in self._buckets)
        if predicted and self._edits.on_prediction():
            self._record_versions()
        return predicted

    @torch.no_grad()
    def restore(self, stepped: bool = True) -> None:
        """End a step: put the real weights back, bit-exact.

        ``stepped`` says whether the optimizer is about to apply an update (the trajectory rule then records it);
        with ``False`` the step was abandoned, and the trajectory rule keeps extrapolating along the last update it
        knows. A :class:`~lightning_xgrad.protocols.GradientPointObserver` optimizer is told the gradient point
        first, while the parameters still hold it. Does nothing when no prediction is in place (after the guarded
        step restored already).

        Every bucket is restored even if one fails (or the observer does); the first error is raised afterwards and
        the predictor is idle either way.
        """
        if not stepped:
            self._end_measurement()
        if self.phase == "suspended":
            self.resume()
        if self.phase != "predicted":
            return
        self._warn_about_edits()
        errors: list[BaseException] = []
        modified = any(bucket.modified for bucket in self._buckets)
        if stepped and modified:
            try:
                self._hold_for_measurement()
            except Exception as error:  # the real weights go back first
                errors.append(error)
        if stepped and self._observer is not None and modified:
            try:
                self._observer.observe_gradient_point(self.chunk_bytes)  # the secant's temporaries: our budget
            except Exception as error:
                errors.append(error)
        groups = self.optimizer.param_groups
        for bucket in self._buckets:
            try:
                bucket.restore(groups[bucket.group_index], stepped)
            except Exception as error:  # go on: every other bucket gets its real weights back
                errors.append(error)
        self.phase = "idle"
        self._edits.checking = False
        if errors:
            raise errors[0]

    @torch.no_grad()
    def suspend(self) -> None:
        """Put the real weights in place for a while (validation, a checkpoint), keeping the prediction."""
        if self.phase == "predicted":
            self._warn_about_edits()
            self._swap()
            self.phase = "suspended"

    @torch.no_grad()
    def resume(self) -> None:
        """Bring the prediction back after :meth:`suspend`, bit-exact."""
        if self.phase == "suspended":
            self._swap()
            self.phase = "predicted"
            self._record_versions()

    def _swap(self) -> None:
        for bucket in self._buckets:
            bucket.swap()

    def predicted_params(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(parameter, predicted local tensor, real local value)`` for every parameter holding a prediction now."""
        if self.phase != "predicted":
            return []
        return [triple for bucket in self._buckets for triple in bucket.predicted()]

    def close(self) -> None:
        """Remove the hooks this predictor put on the optimizer (the end of training); restores first."""
        try:
            self.restore(stepped=False)
        finally:
            for handle in self._guard_handles:
                handle.remove()
            self._guard_handles = []
            self._end_measurement()

    # ------------------------------------------------------------------ edits of W_hat
    def _record_versions(self) -> None:
        if self._edits.checking:
            for bucket in self._buckets:
                bucket.record_versions()

    def _warn_about_edits(self) -> None:
        """Warn (once) if a predicted parameter changed since its prediction was written or resumed (on the
        predictions whose edits are checked)."""
        if self._edits.checking:
            self._edits.report([bucket.owners[i] for bucket in self._buckets for i in bucket.edited_since_recorded()])

    # ------------------------------------------------------------------ prediction quality
    def measure_next_update(
        self,
        report: Callable[[PredictionQuality], None],
        max_bytes: int | None = DEFAULT_METRICS_MAX_BYTES,
        owner: str = "OptimizerPredictor.measure_next_update",
        name: str = "max_bytes",
    ) -> bool:
        """Measure how well the prediction in place tracks the update the optimizer applies next.

        At the next restore before an update, W_hat is kept aside (all of it within ``max_bytes``, else a systematic
        sample: :class:`~lightning_xgrad.prediction.quality.HeldPrediction`, whose budget error names ``owner`` and
        ``name``); once the optimizer has stepped, ``report`` gets the
        :class:`~lightning_xgrad.prediction.quality.PredictionQuality` (not called when the step applied no update
        or never came). A restore without an update, or the next prediction, cancels it. Returns ``False``, and
        measures nothing, when no prediction is in place or the optimizer runs no step hooks.
        """
        self._end_measurement()
        if self.phase != "predicted" or not self.guards_step:
            return False
        self._measurement = Measurement(report, max_bytes, owner, name)
        return True

    def _hold_for_measurement(self) -> None:
        """Just before a restore for an update: copy W_hat aside and measure the update after the step. The hook is
        registered now, so it runs after every step post-hook registered before it (CPropCallback's, which rescales
        the update: the update measured is the one really applied)."""
        measurement = self._measurement
        if measurement is None or measurement.held is not None:
            return
        measurement.held = HeldPrediction(
            self.predicted_params(), measurement.max_bytes, self.chunk_bytes, measurement.owner, measurement.name
        )
        measurement.handles = register_step_hooks(self.optimizer, post=measure_after_step(self)) or []

    def _measure(self) -> None:
        """Report the measurement asked for, once the optimizer stepped (its step post-hook calls this)."""
        measurement = self._measurement
        if measurement is None or measurement.held is None or measurement.done:
            return
        measurement.done = True
        held, measurement.held = measurement.held, None
        quality = held.compare(self.steps)
        if quality is not None:
            measurement.report(quality)

    def _end_measurement(self) -> None:
        """Drop a measurement and its hook (never from inside a step hook: torch iterates over them)."""
        measurement, self._measurement = self._measurement, None
        if measurement is not None:
            for handle in measurement.handles:
                handle.remove()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What the trajectory rule needs after a resume: the weights before the last step and that step's lr.

        Keys are flat parameter indices in param-group order, as in ``optimizer.state_dict()``. Empty for state
        rules, for sharded (DTensor) parameters and while a step is in progress: a resume then skips one prediction.
        """
        previous: dict[int, Tensor] = {}
        lr_then: dict[int, float] = {}
        if self.phase == "idle":
            index = {p: i for i, p in enumerate(flat_params(self.optimizer))}
            for bucket in self._buckets:
                for p, buffer, lr in bucket.checkpoint():
                    if isinstance(p, DTensor):  # a rank's shard is not a checkpoint entry: skip one prediction
                        continue
                    previous[index[p]] = buffer
                    lr_then[index[p]] = lr
        return {"previous": previous, "lr_then": lr_then}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output; call it once the optimizer holds its parameters."""
        params = flat_params(self.optimizer)
        for i, value in state.get("previous", {}).items():
            p = params[int(i)]
            self.snapshot.buffers_for([p], [local_tensor(p)])[0].copy_(value)
            self._loaded_lr[p] = float(state["lr_then"][i])
        self._buckets = []
        self.invalidate()


def restore_all(predictors: Iterable[OptimizerPredictor], stepped: bool) -> None:
    """:meth:`OptimizerPredictor.restore` every predictor even if one fails; the first failure is raised after all
    were tried."""
    errors = []
    for predictor in predictors:
        try:
            predictor.restore(stepped=stepped)
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]
