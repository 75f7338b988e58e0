"""The plan of an :class:`~lightning_xgrad.prediction.predictor.OptimizerPredictor`: its parameters in buckets.

A bucket is the parameters of one param group on one device and dtype, predicted the same way, with their snapshot
buffers and the chunks every foreach walk over them takes (cut once, for the predictor's byte budget). Each kind knows
how to predict, how to restore (after an update, ``stepped=True``, or after none), and what it needs in a checkpoint:

- :class:`StateBucket`: dW from the optimizer's state through a :class:`~lightning_xgrad.rules.PredictionRule`; the
  buffers hold the real weights while predicted, and nothing is carried from one step to the next.
- :class:`TrajectoryBucket`: the update the optimizer applied at its last step (the trajectory rule,
  :mod:`lightning_xgrad.rules.trajectory`); between steps the buffers hold the weights before the last update, and
  that update's lr is remembered.

:class:`Plan` builds the buckets of one optimizer. Pure torch, no Lightning.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._internal.chunks import Chunks, budget_for
from .._internal.compat import group_by_device_and_dtype
from .._internal.scalars import StepCounts, as_float
from .._internal.sharding import local_tensor
from ..rules import TRAJECTORY, PredictionRule
from ..rules.compiled import CompiledKernels, CompiledPrediction
from .snapshot import ParameterSnapshot

__all__ = ["Bucket", "Plan", "StateBucket", "TrajectoryBucket"]

_VERSION = operator.attrgetter("_version")


@dataclass(eq=False)
class Bucket:
    """Parameters of one param group on one device and dtype, and their snapshot buffers."""

    group_index: int
    #: the parameters as the optimizer holds them (keys for the snapshot and for state_dict hooks)
    owners: list[Tensor]
    #: the tensors the math runs on: the parameters, or their local shards for DTensor parameters
    params: list[Tensor]
    buffers: list[Tensor]
    #: the chunks of ``params`` (and of every list parallel to it), for the plan's budget
    chunks: Chunks
    #: the parameters hold W_hat and the buffers the real W
    modified: bool = field(default=False, init=False)
    #: the parameters' version counters when W_hat was last written, while an edit check is on
    versions: list[int] | None = field(default=None, init=False)

    @property
    def in_step(self) -> bool:
        """Whether :meth:`restore` has work to do: a prediction is in place, or an update must be recorded."""
        return self.modified

    def predict(self, group: dict[str, Any], steps: int, enabled: bool, scales: Mapping[Tensor, Tensor]) -> None:
        """Start a step: write W_hat (``steps`` updates ahead) into the parameters, the real W into the buffers.
        ``enabled=False`` predicts nothing; ``scales`` are elementwise factors the optimizer's updates get on top of
        its own rule, by parameter (applied where the kind needs them)."""
        raise NotImplementedError

    def restore(self, group: dict[str, Any], stepped: bool) -> None:
        """End a step: the real weights back, bit-exact; ``stepped`` says whether the optimizer updates them now.
        The bucket is out of the step afterwards even if this raises."""
        try:
            self._put_back(group, stepped)
        finally:
            self.modified = False

    def _put_back(self, group: dict[str, Any], stepped: bool) -> None:
        raise NotImplementedError

    def swap(self) -> None:
        """Exchange predicted and real weights (validation or a checkpoint mid-step, and back)."""
        if self.modified:
            ParameterSnapshot.swap(self.params, self.buffers, self.chunks)

    def record_versions(self) -> None:
        """Remember the version counters of the parameters holding W_hat now (every in-place write bumps one)."""
        self.versions = list(map(_VERSION, self.params)) if self.modified else None

    def edited_since_recorded(self) -> list[int]:
        """The positions of the parameters changed in place since :meth:`record_versions`, which is then forgotten."""
        recorded, self.versions = self.versions, None
        if recorded is None or not self.modified:
            return []
        now = list(map(_VERSION, self.params))
        if now == recorded:
            return []
        return [i for i, (a, b) in enumerate(zip(now, recorded, strict=True)) if a != b]

    def predicted(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """``(parameter, predicted local tensor, real local value)`` while a prediction is in place."""
        if self.modified:
            yield from zip(self.owners, self.params, self.buffers, strict=True)

    def checkpoint(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        """What a resume needs: ``(parameter, its weights before the last update, that update's lr)``."""
        return iter(())


@dataclass(eq=False)
class StateBucket(Bucket):
    """Predicted from the optimizer's state by ``rule``; ``columns[j][i]`` is entry j of the rule's
    ``state_tensors`` for parameter i (the rule's step column as a :class:`StepCounts`)."""

    rule: PredictionRule = field(kw_only=True)
    columns: tuple[Any, ...] = field(kw_only=True)
    #: the rule's compiled snapshot-and-predict, when compiling was asked for and the rule has one
    kernel: CompiledPrediction | None = field(default=None, kw_only=True)

    def predict(self, group: dict[str, Any], steps: int, enabled: bool, scales: Mapping[Tensor, Tensor]) -> None:
        if not enabled:
            return
        alpha = -steps * as_float(group["lr"])
        kernel = self.kernel
        if kernel is not None and kernel(self.params, self.buffers, self.columns, group, alpha):
            self.modified = True
        else:
            ParameterSnapshot.save(self.params, self.buffers)
            self.modified = True  # the buffers hold the real weights: restorable from here on
            self.rule.add_direction_(self.params, self.columns, group, alpha, self.chunks)
        if scales:
            self._scale(scales)

    def _scale(self, scales: Mapping[Tensor, Tensor]) -> None:
        """``W_hat <- W + scale * (W_hat - W)`` for the parameters that have a scale, in place."""
        chosen = [i for i, p in enumerate(self.owners) if p in scales]
        if not chosen:
            return
        params = [self.params[i] for i in chosen]
        buffers = [self.buffers[i] for i in chosen]
        torch._foreach_sub_(params, buffers)
        torch._foreach_mul_(params, [local_tensor(scales[self.owners[i]]) for i in chosen])
        torch._foreach_add_(params, buffers)

    def _put_back(self, group: dict[str, Any], stepped: bool) -> None:
        if self.modified:
            ParameterSnapshot.restore(self.params, self.buffers)


@dataclass(eq=False)
class TrajectoryBucket(Bucket):
    """Predicted along the update applied at the last step: ``W_hat = W + steps * (lr_now / lr_then) * (W - W_prev)``.

    No scales apply: the update it extrapolates was already scaled by whoever scaled it.
    """

    #: while the buffers hold the start of the last step, the lr that step's update was applied with (the
    #: displacement ``W - buffers`` is that update); None while no update is known
    lr_then: float | None = field(default=None, kw_only=True)
    #: while predicted: the lr the prediction's displacement ``W_hat - W`` corresponds to (``steps * lr_now``), kept
    #: by a step that never happens
    lr_predicted: float = field(default=0.0, init=False)
    #: the buffers still hold the start of the last step; the real W goes in at the update
    pending: bool = field(default=False, init=False)

    @property
    def in_step(self) -> bool:
        return self.modified or self.pending

    def predict(self, group: dict[str, Any], steps: int, enabled: bool, scales: Mapping[Tensor, Tensor]) -> None:
        """Nothing to extrapolate while no update is known, after an update applied at lr 0 (it says nothing about
        the direction) or at lr 0 now; disabled, the update this step applies is still recorded."""
        self.pending = True
        lr_then = self.lr_then
        if not enabled or not lr_then:
            return
        lr_now = TRAJECTORY.lr(group["lr"])
        if lr_now == 0:
            return
        TRAJECTORY.extrapolate_(self.params, self.buffers, steps * lr_now / lr_then, self.chunks)
        self.lr_predicted = steps * lr_now
        self.modified = True
        self.pending = False

    def restore(self, group: dict[str, Any], stepped: bool) -> None:
        try:
            super().restore(group, stepped)
        finally:
            self.pending = False

    def _put_back(self, group: dict[str, Any], stepped: bool) -> None:
        if stepped:  # the buffers get the start of this step, and its lr is recorded
            if self.modified:
                ParameterSnapshot.restore(self.params, self.buffers)
            elif self.pending:
                ParameterSnapshot.save(self.params, self.buffers)
            self.lr_then = TRAJECTORY.lr(group["lr"])
        elif self.modified:  # no update happened: keep the displacement the prediction applied
            TRAJECTORY.rewind_(self.params, self.buffers, self.chunks)
            self.lr_then = self.lr_predicted
        # unmodified and abandoned: the buffers still hold the start of the last step, nothing to do

    def checkpoint(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        if self.lr_then is not None:
            for owner, buffer in zip(self.owners, self.buffers, strict=True):
                yield owner, buffer, self.lr_then


@dataclass
class Plan:
    """The buckets of one optimizer, built param group by param group, and the optimizer state they were read from.

    The plan holds the state tensors the rules read, so it is valid only while the optimizer holds the same state:
    :meth:`state_unchanged` compares the optimizer's state mapping, entry by entry, with the one planned from, by
    identity (a reset ``state[p] = {}``, a deletion, a ``clear()`` or a load all replace entries or the mapping), in
    C loops that hash nothing. The mapping is only read: the optimizer's objects stay as they are, also when a
    wrapper shares its ``state`` with an inner optimizer. A parameter whose state does not yet hold what its rule
    needs (a module in the optimizer but unused in forward gets no state at all) is left out, and the plan stays
    valid until that changes: a new state entry changes the mapping; an entry that exists but lacks the rule's tensors
    (rare: no torch optimizer leaves one) is watched by its size in :attr:`partial`.
    """

    snapshot: ParameterSnapshot
    #: the optimizer's per-parameter state the plan is read from
    state: Mapping[Tensor, Any]
    #: out-of-place temporaries of one foreach call stay within ``max(largest tensor, chunk_bytes)``; ``None``: the
    #: default of each bucket's device
    chunk_bytes: int | None
    buckets: list[Bucket] = field(default_factory=list)
    #: state entries that exist but lack what the rule needs, with their size when planned
    partial: list[tuple[Any, int]] = field(default_factory=list)
    #: the state mapping's keys and entries when planned
    state_keys: list[Any] = field(init=False)
    state_entries: list[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.state_keys = list(self.state.keys())
        self.state_entries = list(self.state.values())

    def state_unchanged(self, state: Mapping[Tensor, Any]) -> bool:
        """Whether ``state`` is the mapping planned from and holds the same entries, for the same keys, in order."""
        return (
            state is self.state
            and len(state) == len(self.state_entries)
            and all(map(operator.is_, state.values(), self.state_entries))
            and all(map(operator.is_, state.keys(), self.state_keys))
        )

    def partial_entries_unchanged(self) -> bool:
        """Whether every state entry left out as incomplete still has the size it had (O(those entries))."""
        return all(len(entry) == size for entry, size in self.partial)

    def add_state_group(
        self,
        index: int,
        params: list[Tensor],
        rule: PredictionRule,
        kernels: CompiledKernels | None,
    ) -> None:
        """Buckets for param group ``index`` predicted by ``rule``; parameters without the state the rule needs are
        left out. ``kernels`` gives each bucket its compiled prediction, or none (``None``: no compiling)."""
        owners: list[Tensor] = []
        rows: list[tuple[Any, ...]] = []
        for p in params:
            entry = self.state.get(p)
            row = rule.state_tensors(entry if entry is not None else {})
            if row is None:
                if entry is not None:
                    self.partial.append((entry, len(entry)))
                continue
            owners.append(p)
            rows.append(tuple(local_tensor(value) for value in row))
        if not owners:
            return
        local = [local_tensor(p) for p in owners]
        columns = [list(column) for column in zip(*rows, strict=True)]
        for (bucket_params,), indices in group_by_device_and_dtype([local]):
            bucket_owners = [owners[i] for i in indices]
            bucket_columns: list[Any] = [[column[i] for i in indices] for column in columns]  # any entries: not grouped
            if rule.step_column is not None:
                bucket_columns[rule.step_column] = StepCounts(bucket_columns[rule.step_column])
            key = (index, bucket_params[0].device, bucket_params[0].dtype)
            kernel = None if kernels is None else kernels.for_bucket(key, bucket_params, rule)
            buffers = self.snapshot.buffers_for(bucket_owners, bucket_params)
            chunks = self._chunks(bucket_params)
            self.buckets.append(
                StateBucket(
                    index, bucket_owners, bucket_params, buffers, chunks, rule=rule, columns=tuple(bucket_columns),
                    kernel=kernel,
                )
            )  # fmt: skip

    def add_trajectory_group(self, index: int, params: list[Tensor], known_lr: Mapping[Tensor, float]) -> None:
        """Buckets for param group ``index`` predicted by the trajectory rule; ``known_lr`` is the lr of the last
        update of the parameters whose buffers hold the weights before it (a bucket shares one)."""
        by_lr: dict[float | None, list[Tensor]] = {}
        for p in params:
            by_lr.setdefault(known_lr.get(p), []).append(p)
        for lr_then, owners in by_lr.items():
            local = [local_tensor(p) for p in owners]
            for (bucket_params,), indices in group_by_device_and_dtype([local]):
                bucket_owners = [owners[i] for i in indices]
                buffers = self.snapshot.buffers_for(bucket_owners, bucket_params)
                self.buckets.append(
                    TrajectoryBucket(
                        index, bucket_owners, bucket_params, buffers, self._chunks(bucket_params), lr_then=lr_then
                    )
                )

    def _chunks(self, params: list[Tensor]) -> Chunks:
        return Chunks(params, budget_for(self.chunk_bytes, params))
