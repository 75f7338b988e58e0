"""CProp's scale on top of any optimizer, for one optimizer: statistics, the snapshot before its update, the rescale.

:class:`OptimizerConformity` is to :class:`~lightning_xgrad.CPropCallback` what
:class:`~lightning_xgrad.OptimizerPredictor` is to XGradCallback: the plain-torch work for one optimizer, which the
callback drives from Lightning's hooks. Before the update it copies W_before (:meth:`~OptimizerConformity.snapshot`);
after it, it folds the gradients into the statistics, computes the scale and rescales the update just applied,
``W = W_before + scale * (W - W_before)`` (:meth:`~OptimizerConformity.scale_update`). The scales are kept in a live
mapping handed in at construction, which XGrad's predictor reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._internal.chunks import ChunkedList
from .._internal.scalars import ScalarColumn, step_counts_as_floats
from .._internal.sharding import DTensor, local_tensor
from .statistics import (
    ConformityCDF,
    conformity_scale_,
    scale_applied_update_,
    update_statistics_,
    variance_from_square_mean,
)

__all__ = ["OptimizerConformity"]


@dataclass(eq=False)
class _Bucket:
    """Parameters of one optimizer on one device and dtype that have a gradient this step, with their state."""

    owners: list[Tensor]  # the parameters (keys of the state and of the scale dict)
    params: list[Tensor]  # the tensors the math runs on: local shards, complex as real views
    befores: list[Tensor]
    exp_avgs: list[Tensor]
    exp_vars: list[Tensor]
    step_counts: list[Tensor]
    scales: list[Tensor]


class OptimizerConformity:
    """The statistics, snapshot buffers and scales of one optimizer's parameters, and the snapshot/scale steps.

    Args:
        optimizer: the optimizer whose updates are scaled.
        scales: the live mapping filled here, parameter -> scale of its last update (what XGrad's predictor reads).
        beta, c, eps, cdf: CProp's settings (:func:`~lightning_xgrad.cprop.statistics.conformity_scale_`).
        owner: the name errors start with.
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
        owner: str = "CPropCallback",
        chunk_bytes: int | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scales = scales
        self.beta, self.c, self.eps, self.cdf = beta, c, eps, cdf
        self.owner = owner
        self.chunk_bytes = chunk_bytes
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
            bucket.step_counts.append(entry["step"])
            bucket.scales.append(entry["scale"])
        for bucket in grouped.values():
            bucket.step_counts = ScalarColumn(bucket.step_counts)  # read through NumPy views every step
            bucket.exp_vars = ChunkedList(bucket.exp_vars, self.chunk_bytes)  # chunked once, for every step
            bucket.scales = ChunkedList(bucket.scales, self.chunk_bytes)
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
            torch._foreach_add_(bucket.step_counts, 1.0)
            ts = step_counts_as_floats(bucket.step_counts)
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
    def load_state_dict(self, state: dict[int, dict[str, Any]]) -> bool:
        """Load :meth:`state_dict`'s output; the scales stay the same tensors XGradCallback holds. Entries saved by
        an earlier version (``exp_avg_sq``, the moving average of g^2, instead of ``exp_var``) are converted
        approximately, and the return value says whether any was (the caller warns: ``LEGACY_LAYOUT_WARNING``); an
        entry with neither is refused."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        converted = False
        for index, saved in state.items():
            if "exp_var" not in saved and "exp_avg_sq" not in saved:
                raise ValueError(
                    f"{self.owner}: the checkpoint's statistics of parameter {index} have neither 'exp_var' nor the "
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
        self._plan_key = None
        return converted
