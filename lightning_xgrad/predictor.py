"""Weight prediction for one optimizer, in plain PyTorch: predict before the forward pass, restore before the step.

    predictor = OptimizerPredictor(optimizer, steps=1)
    for batch in data:
        predictor.predict()            # W <- W_hat = W - steps * lr * dW, the real W kept in the snapshot
        loss_fn(model(batch)).backward()
        predictor.restore()            # W <- the real W, bit-exact
        optimizer.step()
        optimizer.zero_grad()

The XGrad callback drives one of these per optimizer from Lightning's hooks. Parameters are planned once into
buckets (one param group, one device and dtype, one rule; :mod:`lightning_xgrad.buckets`), so predicting and restoring
are loops over the buckets, and the plan is rebuilt only when the optimizer's state,
param groups or frozen parameters change; per step the Python work per parameter is one ``requires_grad`` read, in a
C loop (changes to the state are noticed in O(1), see :mod:`lightning_xgrad.optimizer_state`). A parameter that has
no optimizer state yet (a module unused in forward) is left out of the plan until its state appears, at no cost per
step. Foreach temporaries are bounded by ``chunk_bytes`` (:mod:`lightning_xgrad._foreach`).

Restoring is exception-safe: every bucket is restored even if one fails, and the first failure is raised after.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping
from itertools import chain
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ._validation import argument_error, check_choice, check_flag, check_int
from ._wrappers import unwrap_optimizer
from .buckets import Bucket, Plan
from .optimizer_state import WatchedState, watch_state
from .protocols import DirectionScales, GradientPointObserver
from .rules import PredictionRule, rule_for
from .rules.compiled import CompiledPrediction
from .sharding import DTensor, local_tensor
from .snapshot import ParameterSnapshot

_REQUIRES_GRAD = operator.attrgetter("requires_grad")
RuleChoice = Literal["auto", "trajectory"]
RULE_CHOICES: tuple[str, ...] = get_args(RuleChoice)
Phase = Literal["idle", "predicted", "suspended"]
#: optimizers whose step evaluates the closure several times: after the first evaluation the gradients would be
#: taken at the real weights, so XGrad cannot work with them
CLOSURE_REEVALUATING: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.LBFGS,)


def check_prediction_args(owner: str, steps: Any, rule: Any, compile: Any, chunk_bytes: Any = None) -> None:
    """The checks of the arguments :class:`OptimizerPredictor` and the callbacks built on it share, with one
    message format: a TypeError for a wrong type, a ValueError for a wrong value, naming both."""
    check_int(owner, "steps", steps, minimum=1)
    check_choice(owner, "rule", rule, RULE_CHOICES)
    check_flag(owner, "compile", compile)
    check_int(owner, "chunk_bytes", chunk_bytes, minimum=0, allow_none=True)


def check_optimizer(owner: str, optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer inside Fabric's or Lightning's wrapper, if any; refuses what is not a ``torch.optim.Optimizer``
    (TypeError) and optimizers that re-evaluate the closure (ValueError)."""
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise argument_error(owner, "optimizer", "a torch.optim.Optimizer", optimizer, TypeError)
    if isinstance(inner, CLOSURE_REEVALUATING):
        raise argument_error(
            owner,
            "optimizer",
            "an optimizer whose step evaluates the closure at most once (LBFGS re-evaluates it, so its gradients "
            "would be taken at the real weights)",
            optimizer,
        )
    return inner


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
            AdamW, AdaM3, SGD and RMSprop momentum); compiled at the first prediction of each bucket.
        direction_scales: elementwise scales the optimizer's updates get on top of its own rule, by parameter
            (CProp's conformity scale, from a :class:`~lightning_xgrad.protocols.DirectionScaleProvider`); a live
            mapping, read at every prediction. State rules then predict with ``scale * dW``; the trajectory rule
            needs none, since the update it extrapolates was already scaled.
        chunk_bytes: the memory budget of the temporaries, in bytes: out-of-place foreach ops (Adam's denominators,
            the trajectory rule's differences) walk the parameters in chunks of at most ``max(largest tensor,
            chunk_bytes)``, one call per op and chunk. ``None``: the default of the parameters' device
            (:func:`~lightning_xgrad._foreach.default_chunk_bytes`: 32 MiB on an accelerator, 1 MiB on the CPU);
            0: chunks as small as the largest tensor.

    An optimizer that needs the point where its gradients were taken (a
    :class:`~lightning_xgrad.protocols.GradientPointObserver`, the adaptive heavy-ball secant) gets a call to its
    ``observe_gradient_point()`` at every restore before an update, while the parameters still hold that point.
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
    ) -> None:
        owner = type(self).__name__
        check_prediction_args(owner, steps, rule, compile, chunk_bytes)
        if snapshot is not None and not isinstance(snapshot, ParameterSnapshot):
            raise argument_error(owner, "snapshot", "a ParameterSnapshot or None", snapshot, TypeError)
        if direction_scales is not None and not isinstance(direction_scales, Mapping):
            raise argument_error(
                owner, "direction_scales", "a mapping from parameters to scales, or None", direction_scales, TypeError
            )
        self.optimizer = check_optimizer(owner, optimizer)
        self.compile = compile
        #: the budget given (``None``: the default of the parameters' device, 32 MiB, 1 MiB on the CPU)
        self.chunk_bytes = chunk_bytes
        self.steps = steps
        self.rule = rule
        self.snapshot = snapshot if snapshot is not None else ParameterSnapshot()
        self.phase: Phase = "idle"
        self._direction_scales: DirectionScales = direction_scales if direction_scales is not None else {}
        self._observer = self.optimizer if isinstance(self.optimizer, GradientPointObserver) else None
        self._kernels: dict[tuple[Any, ...], CompiledPrediction | None] = {}  # kept across plans: compiled once
        self._buckets: list[Bucket] = []
        self._plan_key: tuple[Any, ...] | None = None
        self._plan: Plan | None = None
        self._plan_state: Any = None
        self._watched_state: WatchedState | None = None
        self._load_hook = optimizer.register_load_state_dict_post_hook(_invalidate_after_load(self))
        #: trajectory memory loaded from a checkpoint, for the next plan: parameter -> lr of the update before it
        self._loaded_lr: dict[Tensor, float] = {}
        registered = None if rule == "trajectory" else rule_for(self.optimizer)
        self._state_rule = None if registered is None else registered.bind(self.optimizer)

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
    def group_rule(self, group: dict[str, Any]) -> PredictionRule | None:
        """The state rule used for a param group, ``None`` for the trajectory rule."""
        rule = self._state_rule
        return rule if rule is not None and rule.handles(group) else None

    def describe(self) -> str:
        """Which rule each param group gets, for the log line."""
        names = []
        for group in self.optimizer.param_groups:
            rule = self.group_rule(group)
            names.append("trajectory" if rule is None else rule.name)
        if len(set(names)) == 1:
            return names[0]
        return ", ".join(f"group {i}: {name}" for i, name in enumerate(names))

    # ------------------------------------------------------------------ plan
    def _current_key(self) -> tuple[Any, ...]:
        groups = self.optimizer.param_groups
        state = self.optimizer.state
        return (
            # every change to the state mapping's entries, when it is watched (the usual case: O(1) per step) ...
            self._watched_state.version if state is self._watched_state else None,
            len(state),
            tuple(len(g["params"]) for g in groups),
            tuple(map(_REQUIRES_GRAD, chain.from_iterable(g["params"] for g in groups))),
        )

    def _plan_is_current(self, key: tuple[Any, ...]) -> bool:
        plan = self._plan
        if plan is None or key != self._plan_key or self.optimizer.state is not self._plan_state:
            return False
        # parameters left out for lack of state: a new entry changed the key; an incomplete one is watched by size
        if plan.partial and not plan.partial_entries_unchanged():
            return False
        if self._watched_state is self._plan_state:
            return True
        # ... otherwise (a mapping that cannot be watched) compare each planned parameter's state dict, in C loops
        state = self._plan_state
        return all(map(operator.is_, map(state.get, plan.owners), plan.state_dicts))

    def _ensure_plan(self) -> None:
        key = self._current_key()
        if not self._plan_is_current(key):
            self._build_plan(self._current_key() if self._watch() else key)

    def _watch(self) -> bool:
        """Watch the optimizer's current state mapping for changes; whether it was newly swapped in."""
        if self._watched_state is self.optimizer.state:
            return False
        self._watched_state = watch_state(self.optimizer)
        return self._watched_state is not None

    def invalidate(self) -> None:
        """Force a new plan at the next prediction (after the optimizer's state was loaded or moved)."""
        self._plan_key = None

    def _build_plan(self, key: tuple[Any, ...]) -> None:
        known_lr = {p: lr for bucket in self._buckets for p, _, lr in bucket.checkpoint()}
        known_lr.update(self._loaded_lr)
        self._loaded_lr = {}
        state = self.optimizer.state
        plan = Plan(self.snapshot, self.chunk_bytes)
        for index, group in enumerate(self.optimizer.param_groups):
            params = [p for p in group["params"] if p.requires_grad]
            rule = self.group_rule(group)
            if rule is None:
                plan.add_trajectory_group(index, params, known_lr)
            else:
                plan.add_state_group(index, params, rule, state, self._kernels if self.compile else None)
        self._buckets = plan.buckets
        self._plan = plan
        self._plan_key = key
        self._plan_state = state

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
        return any(bucket.modified for bucket in self._buckets)

    @torch.no_grad()
    def restore(self, stepped: bool = True) -> None:
        """End a step: put the real weights back, bit-exact.

        ``stepped`` says whether the optimizer is about to apply an update (the trajectory rule then records it);
        with ``False`` the step was abandoned, and the trajectory rule keeps extrapolating along the last update it
        knows. A :class:`~lightning_xgrad.protocols.GradientPointObserver` optimizer is told the gradient point
        first, while the parameters still hold it.

        Every bucket is restored even if one fails (or the observer does); the first error is raised afterwards and
        the predictor is idle either way.
        """
        if self.phase == "suspended":
            self.resume()
        if self.phase != "predicted":
            return
        errors: list[BaseException] = []
        if stepped and self._observer is not None and any(bucket.modified for bucket in self._buckets):
            try:
                self._observer.observe_gradient_point(self.chunk_bytes)  # the secant's temporaries: our budget
            except Exception as error:  # the real weights go back first
                errors.append(error)
        groups = self.optimizer.param_groups
        for bucket in self._buckets:
            try:
                bucket.restore(groups[bucket.group_index], stepped)
            except Exception as error:  # go on: every other bucket gets its real weights back
                errors.append(error)
        self.phase = "idle"
        if errors:
            raise errors[0]

    @torch.no_grad()
    def suspend(self) -> None:
        """Put the real weights in place for a while (validation, a checkpoint), keeping the prediction."""
        if self.phase == "predicted":
            self._swap()
            self.phase = "suspended"

    @torch.no_grad()
    def resume(self) -> None:
        """Bring the prediction back after :meth:`suspend`, bit-exact."""
        if self.phase == "suspended":
            self._swap()
            self.phase = "predicted"

    def _swap(self) -> None:
        for bucket in self._buckets:
            bucket.swap()

    def predicted_params(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(parameter, predicted local tensor, real local value)`` for every parameter holding a prediction now."""
        if self.phase != "predicted":
            return []
        return [triple for bucket in self._buckets for triple in bucket.predicted()]

    def close(self) -> None:
        """Remove the hook this predictor put on the optimizer (the end of training); restores first."""
        try:
            self.restore(stepped=False)
        finally:
            self._load_hook.remove()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What the trajectory rule needs after a resume: the weights before the last step and that step's lr.

        Keys are flat parameter indices in param-group order, as in ``optimizer.state_dict()``. Empty for state
        rules, for sharded (DTensor) parameters and while a step is in progress: a resume then skips one prediction.
        """
        previous: dict[int, Tensor] = {}
        lr_then: dict[int, float] = {}
        if self.phase == "idle":
            index = {p: i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
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
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, value in state.get("previous", {}).items():
            p = params[int(i)]
            self.snapshot.buffers_for([p], [local_tensor(p)])[0].copy_(value)
            self._loaded_lr[p] = float(state["lr_then"][i])
        self._buckets = []
        self.invalidate()


def _invalidate_after_load(predictor: OptimizerPredictor) -> Any:
    """A load_state_dict post-hook that marks the predictor's plan stale (held weakly: the optimizer must not keep
    a finished predictor alive)."""
    reference = weakref.ref(predictor)

    def hook(optimizer: torch.optim.Optimizer) -> None:
        live = reference()
        if live is not None:
            live.invalidate()

    return hook
