"""CProp's scale on top of any optimizer, for one optimizer: statistics, the snapshot before its update, the rescale.

:class:`OptimizerConformity` is to :class:`~lightning_xgrad.CPropCallback` what
:class:`~lightning_xgrad.OptimizerPredictor` is to XGradCallback: the plain-torch work for one optimizer, which the
callback drives from Lightning's hooks. Before the update it copies W_before (:meth:`~OptimizerConformity.snapshot`);
after it, it folds the gradients into the statistics, computes the scale and rescales the update just applied,
``W = W_before + scale * (W - W_before)`` (:meth:`~OptimizerConformity.scale_update`). The scales are kept in a live
mapping handed in at construction, which XGrad's predictor reads.

The parameters with a gradient are planned into buckets as the predictor plans its own: by device and dtype
(torch's grouping), W_before in a :class:`~lightning_xgrad.prediction.snapshot.ParameterSnapshot`, each bucket with
its chunks and its step counts, rebuilt only when the set of parameters with a gradient changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._internal.chunks import Chunks, budget_for
from .._internal.compat import group_by_device_and_dtype
from .._internal.optimizers import flat_params
from .._internal.scalars import StepCounts
from .._internal.sharding import DTensor, local_tensor
from ..prediction.snapshot import ParameterSnapshot
from .statistics import ConformityCDF, conformity_scale_, scale_applied_update_, update_statistics_

__all__ = ["OptimizerConformity"]

#: a parameter's statistics, in the order they are planned into a bucket
_STATISTICS = ("exp_avg", "exp_var", "step", "scale")


@dataclass(eq=False)
class _Bucket:
    """Parameters of one optimizer on one device and dtype that have a gradient this step, with their state."""

    owners: list[Tensor]  # the parameters (keys of the state and of the scale dict)
    params: list[Tensor]  # the tensors the math runs on: local shards, complex as real views
    befores: list[Tensor]
    exp_avgs: list[Tensor]
    exp_vars: list[Tensor]
    steps: StepCounts
    scales: list[Tensor]
    chunks: Chunks


class OptimizerConformity:
    """The statistics, snapshot buffers and scales of one optimizer's parameters, and the snapshot/scale steps.

    Args:
        optimizer: the optimizer whose updates are scaled.
        scales: the live mapping filled here, parameter -> scale of its last update (what XGrad's predictor reads).
        beta, c, eps, cdf: CProp's settings (:func:`~lightning_xgrad.cprop.statistics.conformity_scale_`).
        chunk_bytes: the temporaries of the foreach ops stay within ``max(largest tensor, chunk_bytes)`` bytes
            (``None``: the default of the parameters' device).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scales: dict[Tensor, Tensor],
        beta: float,
        c: float,
        eps: float,
        cdf: ConformityCDF,
        chunk_bytes: int | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scales = scales
        self.beta, self.c, self.eps, self.cdf = beta, c, eps, cdf
        self.chunk_bytes = chunk_bytes
        self.state: dict[Tensor, dict[str, Tensor]] = {}
        self._befores = ParameterSnapshot()
        self._plan_key: tuple[int, ...] | None = None
        self._buckets: list[_Bucket] = []
        self.in_step = False  # between the optimizer's step pre-hook and post-hook
        self.snapshot_taken = False  # W_before is in the buffers for the update to come

    # ------------------------------------------------------------------ plan
    def _with_grad(self) -> list[Tensor]:
        return [p for p in flat_params(self.optimizer) if p.requires_grad and p.grad is not None]

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
        local = [local_tensor(p) for p in owners]
        entries = [self._entry(p, t) for p, t in zip(owners, local, strict=True)]
        befores = self._befores.buffers_for(owners, local)
        columns = [[entry[name] for entry in entries] for name in _STATISTICS]
        self._buckets = []
        for (params, bucket_befores, exp_avgs, exp_vars, steps, scales), indices in group_by_device_and_dtype(
            [local, befores, *columns]
        ):
            bucket_owners = [owners[i] for i in indices]
            chunks = Chunks(params, budget_for(self.chunk_bytes, params))
            self._buckets.append(
                _Bucket(bucket_owners, params, bucket_befores, exp_avgs, exp_vars, StepCounts(steps), scales, chunks)
            )
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
            ParameterSnapshot.save(bucket.params, bucket.befores)
        self.snapshot_taken = True

    @torch.no_grad()
    def scale_update(self) -> None:
        """After the optimizer's update: fold this step's gradients into the statistics, compute the scale, and
        rescale the update just applied, ``W = W_before + scale * (W - W_before)``."""
        self.in_step = False
        if not self.snapshot_taken:  # the optimizer never evaluated its closure: nothing to rescale from
            return
        self.snapshot_taken = False
        settings = (self.beta, self.c, self.eps, self.cdf)
        for bucket in self._buckets:
            grads = [local_tensor(p.grad) for p in bucket.owners]
            torch._foreach_add_(bucket.steps.tensors, 1.0)
            ts = bucket.steps.floats()
            update_statistics_(bucket.exp_avgs, bucket.exp_vars, grads, ts, self.beta, chunks=bucket.chunks)
            conformity_scale_(bucket.scales, bucket.exp_avgs, bucket.exp_vars, ts, *settings, chunks=bucket.chunks)
            scale_applied_update_(bucket.params, bucket.befores, bucket.scales)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[int, dict[str, Any]]:
        """Statistics by flat parameter index in param-group order, as ``optimizer.state_dict()`` numbers them.
        Sharded (DTensor) parameters are left out: a resume restarts their statistics."""
        out: dict[int, dict[str, Any]] = {}
        for index, p in enumerate(flat_params(self.optimizer)):
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
        """Load :meth:`state_dict`'s output; the scales stay the same tensors XGradCallback holds."""
        params = flat_params(self.optimizer)
        for index, saved in state.items():
            p = params[int(index)]
            entry = self._entry(p, local_tensor(p))
            for name in ("exp_avg", "exp_var", "scale"):
                entry[name].copy_(saved[name])
            entry["step"].fill_(float(saved["step"]))
        self._plan_key = None
