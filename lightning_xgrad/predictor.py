"""Weight prediction for one optimizer, in plain PyTorch: predict before the forward pass, restore before the step.

    predictor = OptimizerPredictor(optimizer, steps=1)
    for batch in data:
        predictor.predict()            # W <- W_hat = W - steps * lr * dW, the real W kept in the snapshot
        loss_fn(model(batch)).backward()
        predictor.restore()            # W <- the real W, bit-exact
        optimizer.step()
        optimizer.zero_grad()

The XGrad callback drives one of these per optimizer from Lightning's hooks. Parameters are planned once into
buckets (one param group, one device and dtype, one rule) and the plan is rebuilt only when the optimizer's state,
param groups or frozen parameters change; per step the Python work per parameter is one ``requires_grad`` read
(changes to the state are noticed in O(1), see :mod:`lightning_xgrad.optimizer_state`).

Restoring is exception-safe: every bucket is restored even if one fails, and the first failure is raised after.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ._validation import argument_error, check_choice, check_flag, check_int
from ._wrappers import unwrap_optimizer
from .optimizer_state import watch_state
from .rules import PredictionRule, extrapolate_, rewind_, rule_for
from .rules._foreach import ScalarColumn, as_float
from .rules.trajectory import trajectory_lr
from .sharding import DTensor, local_tensor
from .snapshot import ParameterSnapshot

RuleChoice = Literal["auto", "trajectory"]
RULE_CHOICES: tuple[str, ...] = get_args(RuleChoice)
Phase = Literal["idle", "predicted", "suspended"]
#: optimizers whose step evaluates the closure several times: after the first evaluation the gradients would be
#: taken at the real weights, so XGrad cannot work with them
CLOSURE_REEVALUATING: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.LBFGS,)


def check_prediction_args(owner: str, steps: Any, rule: Any, compile: Any) -> None:
    """The checks of the arguments :class:`OptimizerPredictor` and the callbacks built on it share, with one
    message format: a TypeError for a wrong type, a ValueError for a wrong value, naming both."""
    check_int(owner, "steps", steps, minimum=1)
    check_choice(owner, "rule", rule, RULE_CHOICES)
    check_flag(owner, "compile", compile)


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


@dataclass(eq=False)
class _Bucket:
    """Parameters of one param group on one device and dtype, predicted by one rule (``None``: trajectory)."""

    group_index: int
    rule: PredictionRule | None
    #: the parameters as the optimizer holds them (keys for the snapshot and for state_dict hooks)
    owners: list[Tensor]
    #: the tensors the math runs on: the parameters, or their local shards for DTensor parameters
    params: list[Tensor]
    buffers: list[Tensor]
    columns: tuple[list[Any], ...] = ()
    #: trajectory only: while the buffers hold the start of the last step, the lr that step's update was applied with
    #: (the displacement ``W - buffers`` is that update); None while no update is known
    lr_then: float | None = None
    #: trajectory only, while predicted: the lr the prediction's displacement ``W_hat - W`` corresponds to
    #: (``steps * lr_now``), kept by a step that never happens
    lr_predicted: float = 0.0
    #: the rule's compiled snapshot-and-predict, when compiling was asked for and the rule has one
    kernel: Any = None
    #: the parameters hold W_hat and the buffers the real W
    modified: bool = field(default=False, init=False)
    #: trajectory only: the buffers still hold the start of the last step; the real W goes in at the update
    pending: bool = field(default=False, init=False)


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
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int = 1,
        rule: RuleChoice = "auto",
        snapshot: ParameterSnapshot | None = None,
        compile: bool = False,
    ) -> None:
        owner = type(self).__name__
        check_prediction_args(owner, steps, rule, compile)
        if snapshot is not None and not isinstance(snapshot, ParameterSnapshot):
            raise argument_error(owner, "snapshot", "a ParameterSnapshot or None", snapshot, TypeError)
        self.optimizer = check_optimizer(owner, optimizer)
        self.compile = compile
        self._kernels: dict[tuple[Any, ...], Any] = {}  # kept across plans: a rebuilt plan reuses its compilation
        self.steps = steps
        self.rule = rule
        self.snapshot = snapshot if snapshot is not None else ParameterSnapshot()
        self.phase: Phase = "idle"
        self._buckets: list[_Bucket] = []
        self._plan_key: tuple[Any, ...] | None = None
        self._plan_state: Any = None
        self._plan_complete = False
        self._watched_state: Any = None
        self._load_hook = optimizer.register_load_state_dict_post_hook(_invalidate_after_load(self))
        self._pending_trajectory: dict[Tensor, float] = {}
        #: elementwise scales the optimizer's updates get on top of its own rule (CProp's conformity scale), keyed by
        #: parameter and filled by whoever applies them; state rules then predict with ``scale * dW``. The trajectory
        #: rule needs none: the update it extrapolates was already scaled.
        self.direction_scales: Mapping[Tensor, Tensor] | None = None
        registered = None if rule == "trajectory" else rule_for(self.optimizer)
        self._state_rule = None if registered is None else registered.bind(self.optimizer)

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
            getattr(state, "version", None) if state is self._watched_state else None,
            len(state),
            tuple(len(g["params"]) for g in groups),
            tuple(p.requires_grad for g in groups for p in g["params"]),
        )

    def _plan_is_current(self, key: tuple[Any, ...]) -> bool:
        if not (self._plan_complete and key == self._plan_key and self.optimizer.state is self._plan_state):
            return False
        if self._watched_state is self._plan_state:
            return True
        # ... otherwise (a mapping that cannot be watched) compare each planned parameter's state dict, in C loops
        state = self._plan_state
        return all(map(operator.is_, map(state.get, self._plan_owners), self._plan_dicts))

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
        known_lr = {p: b.lr_then for b in self._buckets if b.rule is None and b.lr_then is not None for p in b.owners}
        known_lr.update(self._pending_trajectory)
        self._pending_trajectory = {}
        grouped: dict[tuple[Any, ...], tuple[PredictionRule | None, list[Tensor], list[tuple[Any, ...]]]] = {}
        complete = True
        state = self.optimizer.state
        planned_owners, planned_dicts = [], []
        for index, group in enumerate(self.optimizer.param_groups):
            rule = self.group_rule(group)
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if rule is None:
                    row: tuple[Any, ...] | None = ()
                    bucket_key: tuple[Any, ...] = (index, p.device, p.dtype, known_lr.get(p))
                else:
                    entry = state.get(p)
                    planned_owners.append(p)
                    planned_dicts.append(entry)
                    row = rule.state_tensors(entry if entry is not None else {})
                    if row is None:
                        complete = False
                        continue
                    row = tuple(local_tensor(value) for value in row)
                    bucket_key = (index, p.device, p.dtype)
                _, owners, rows = grouped.setdefault(bucket_key, (rule, [], []))
                owners.append(p)
                rows.append(row)
        buckets = []
        for bucket_key, (rule, owners, rows) in grouped.items():
            columns = tuple(
                ScalarColumn(column) if ScalarColumn.suits(column) else list(column)
                for column in (zip(*rows, strict=True) if rule is not None else ())
            )
            lr_then = bucket_key[3] if rule is None else None
            params = [local_tensor(p) for p in owners]
            buffers = self.snapshot.buffers_for(owners, params)
            bucket = _Bucket(bucket_key[0], rule, owners, params, buffers, columns, lr_then)
            if self.compile and rule is not None:
                if bucket_key not in self._kernels:
                    self._kernels[bucket_key] = rule.compiled_prediction()
                bucket.kernel = self._kernels[bucket_key]
            buckets.append(bucket)
        self._buckets = buckets
        self._plan_key = key
        self._plan_state = state
        self._plan_owners, self._plan_dicts = planned_owners, planned_dicts
        self._plan_complete = complete

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
        any_modified = False
        try:
            for bucket in self._buckets:
                group = groups[bucket.group_index]
                if bucket.rule is None:
                    self._predict_trajectory(bucket, group, enabled)
                elif enabled:
                    alpha = -self.steps * as_float(group["lr"])
                    kernel = bucket.kernel
                    if kernel is not None and kernel(bucket.params, bucket.buffers, bucket.columns, group, alpha):
                        bucket.modified = True
                    else:
                        ParameterSnapshot.save(bucket.params, bucket.buffers)
                        bucket.modified = True  # the buffers hold the real weights: restorable from here on
                        bucket.rule.add_direction_(bucket.params, bucket.columns, group, alpha)
                    if self.direction_scales:
                        self._scale_prediction(bucket)
                any_modified |= bucket.modified
        except BaseException:
            self.phase = "predicted"
            self.restore(stepped=False)
            raise
        self.phase = "predicted" if any(b.modified or b.pending for b in self._buckets) else "idle"
        return any_modified

    def _predict_trajectory(self, bucket: _Bucket, group: dict[str, Any], enabled: bool) -> None:
        """``W_hat = W + steps * (lr_now / lr_then) * (W - W_prev)``; nothing to extrapolate while no update is known,
        after an update applied at lr 0 (it says nothing about the direction) or at lr 0 now."""
        bucket.pending = True
        lr_then = bucket.lr_then
        if not enabled or not lr_then:
            return
        lr_now = trajectory_lr(group["lr"])
        if lr_now == 0:
            return
        extrapolate_(bucket.params, bucket.buffers, self.steps * lr_now / lr_then)
        bucket.lr_predicted = self.steps * lr_now
        bucket.modified = True
        bucket.pending = False

    def _scale_prediction(self, bucket: _Bucket) -> None:
        """``W_hat <- W + scale * (W_hat - W)`` for the bucket's parameters that have a scale, in place."""
        scales = self.direction_scales or {}
        chosen = [i for i, p in enumerate(bucket.owners) if p in scales]
        if not chosen:
            return
        params = [bucket.params[i] for i in chosen]
        buffers = [bucket.buffers[i] for i in chosen]
        torch._foreach_sub_(params, buffers)
        torch._foreach_mul_(params, [local_tensor(scales[bucket.owners[i]]) for i in chosen])
        torch._foreach_add_(params, buffers)

    @torch.no_grad()
    def restore(self, stepped: bool = True) -> None:
        """End a step: put the real weights back, bit-exact.

        ``stepped`` says whether the optimizer is about to apply an update (the trajectory rule then records it);
        with ``False`` the step was abandoned, and the trajectory rule keeps extrapolating along the last update it
        knows. An optimizer that needs the point where its gradients were taken (the adaptive heavy-ball secant) gets
        a call to its ``observe_gradient_point()`` first, while the parameters still hold it.

        Every bucket is restored even if one fails (or the observer does); the first error is raised afterwards and
        the predictor is idle either way.
        """
        if self.phase == "suspended":
            self.resume()
        if self.phase != "predicted":
            return
        errors: list[BaseException] = []
        observe = getattr(self.optimizer, "observe_gradient_point", None)
        if stepped and observe is not None and any(bucket.modified for bucket in self._buckets):
            try:
                observe()
            except Exception as error:  # the real weights go back first
                errors.append(error)
        groups = self.optimizer.param_groups
        for bucket in self._buckets:
            try:
                self._restore_bucket(bucket, groups[bucket.group_index], stepped)
            except Exception as error:  # go on: every other bucket gets its real weights back
                errors.append(error)
            finally:
                bucket.modified = bucket.pending = False
        self.phase = "idle"
        if errors:
            raise errors[0]

    def _restore_bucket(self, bucket: _Bucket, group: dict[str, Any], stepped: bool) -> None:
        if bucket.rule is not None:
            if bucket.modified:
                ParameterSnapshot.restore(bucket.params, bucket.buffers)
        elif stepped:  # trajectory: the buffers get the start of this step, and its lr is recorded
            if bucket.modified:
                ParameterSnapshot.restore(bucket.params, bucket.buffers)
            elif bucket.pending:
                ParameterSnapshot.save(bucket.params, bucket.buffers)
            bucket.lr_then = trajectory_lr(group["lr"])
        elif bucket.modified:  # trajectory, no update happened: keep the displacement the prediction applied
            rewind_(bucket.params, bucket.buffers)
            bucket.lr_then = bucket.lr_predicted
        # trajectory, unmodified and abandoned: the buffers still hold the start of the last step, nothing to do

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
            if bucket.modified:
                ParameterSnapshot.swap(bucket.params, bucket.buffers)

    def predicted_params(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(parameter, predicted local tensor, real local value)`` for every parameter holding a prediction now."""
        if self.phase != "predicted":
            return []
        return [
            triple for k in self._buckets if k.modified for triple in zip(k.owners, k.params, k.buffers, strict=True)
        ]

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
                if bucket.rule is None and bucket.lr_then is not None:
                    for p, b in zip(bucket.owners, bucket.buffers, strict=True):
                        if isinstance(p, DTensor):  # a rank's shard is not a checkpoint entry: skip one prediction
                            continue
                        previous[index[p]] = b
                        lr_then[index[p]] = bucket.lr_then
        return {"previous": previous, "lr_then": lr_then}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output; call it once the optimizer holds its parameters."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, value in state.get("previous", {}).items():
            p = params[int(i)]
            self.snapshot.buffers_for([p], [local_tensor(p)])[0].copy_(value)
            self._pending_trajectory[p] = float(state["lr_then"][i])
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
