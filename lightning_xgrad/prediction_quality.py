"""How well a prediction tracked the update the optimizer then applied, over every predicted parameter, on all ranks.

With ``d = W_hat - W`` the predicted displacement and ``u = W_next - W`` the update the optimizer applied right after
(``s`` the steps predicted):

- the cosine ``<d, u> / (||d|| ||u||)``: 1 when the prediction points where the weights went, near 0 or negative
  when it extrapolated noise;
- the error ``||d - s*u|| / ||s*u||``: for s = 1, ``||W_hat - W_next|| / ||W_next - W||``; for s > 1, against s times
  the applied update (the prediction holds dW constant for s steps).

Exact values need W, W_hat and W_next at once, but a predictor holds two at a time: at the restore the parameters
hold W_hat and the snapshot W; after the update the parameters hold W_next and the snapshot still W, and W_hat is
gone. Pairwise squared distances would do (``<d, u> = (|d|^2 + |u|^2 - |u - d|^2) / 2``), yet
``|u - d|^2 = |W_next - W_hat|^2`` needs W_hat after the update, when the parameters must hold W (for the update,
bit-exactly) and the snapshot W (for ``|u|^2``, and as the trajectory rule's memory of the step); swapping W_hat into
the snapshot at the restore gives ``|u - d|^2`` but loses ``|u|^2``. So one of the three vectors must be kept aside:
:class:`HeldPrediction` copies W_hat (the parameters' own dtype, bit for bit) just before the restore and frees it
once the update is measured. That is one copy of the predicted parameters, allocated on logging steps only; the other
temporaries are one chunk (:func:`~lightning_xgrad._foreach.chunk_slices`) of ``u``, and for half-precision
parameters a float32 chunk of ``d`` too.

Sums run on each rank's local tensors; with DTensor parameters they are summed over the ranks (one ``all_reduce``),
counting replicated elements once. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._foreach import TensorList, chunk_slices
from .sharding import sum_over_ranks

__all__ = ["HeldPrediction", "PredictionQuality"]


@dataclass(frozen=True)
class PredictionQuality:
    """The two numbers, for one optimizer's predicted parameters."""

    #: ``<d, u> / (||d|| ||u||)``, in [-1, 1]
    cosine: float
    #: ``||d - s*u|| / ||s*u||``
    error: float


class HeldPrediction:
    """W_hat of one optimizer's predicted parameters, kept from the restore until its update has been applied.

    Build it from :meth:`~lightning_xgrad.OptimizerPredictor.predicted_params` while the prediction is in place (just
    before the restore); call :meth:`compare` after the optimizer's step, while the snapshot buffers still hold W, and
    :meth:`release` (or drop it) when done.
    """

    def __init__(self, predicted: Sequence[tuple[Tensor, Tensor, Tensor]]) -> None:
        self.owners = [owner for owner, _, _ in predicted]
        #: the tensors the optimizer updates in place (local shards for DTensor parameters)
        self.params = [local for _, local, _ in predicted]
        #: the snapshot buffers: W from the restore on
        self.real = [real for _, _, real in predicted]
        #: the copy of W_hat, in the parameters' dtype and layout
        self.predicted: list[Tensor] = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]
        with torch.no_grad():
            _copy_grouped(self.predicted, self.params)

    @property
    def nbytes(self) -> int:
        """Bytes held for W_hat."""
        return sum(t.numel() * t.element_size() for t in self.predicted)

    def release(self) -> None:
        """Free the copy of W_hat."""
        self.predicted = []

    @torch.no_grad()
    def compare(self, steps: int) -> PredictionQuality | None:
        """The cosine and the error of the held W_hat against the update now in the parameters (W_next - W, W in the
        snapshot buffers), for a prediction ``steps`` updates ahead; ``None`` when the update or the prediction is
        zero (a step the GradScaler skipped, lr 0), where the cosine is undefined. Consumes the held copy."""
        if not self.predicted:
            raise RuntimeError("HeldPrediction.compare() after release(): W_hat is no longer held")
        owners: list[Tensor] = []
        rows: list[Tensor] = []
        for indices in _grouped(self.params):
            owners += [self.owners[i] for i in indices]
            rows += _partial_sums(
                [self.params[i] for i in indices],
                [self.real[i] for i in indices],
                [self.predicted[i] for i in indices],
                steps,
            )
        self.release()
        device = rows[0].device
        sums = torch.cat([row.to(device=device, dtype=torch.float64) for row in rows])
        dd, uu, du, ee = sum_over_ranks(owners, sums).tolist()  # one device sync, on logging steps only
        if dd == 0 or uu == 0:
            return None
        cosine = du / math.sqrt(dd * uu)
        if math.isfinite(cosine):  # rounding may step past +-1; a diverged run's NaN stays what it is
            cosine = max(-1.0, min(1.0, cosine))
        return PredictionQuality(cosine=cosine, error=math.sqrt(ee) / (steps * math.sqrt(uu)))


def _grouped(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` by device and dtype, in first-seen order (foreach kernels take one of each)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _copy_grouped(targets: list[Tensor], sources: list[Tensor]) -> None:
    for indices in _grouped(sources):
        torch._foreach_copy_([targets[i] for i in indices], [sources[i] for i in indices])


def _partial_sums(after: list[Tensor], before: list[Tensor], predicted: list[Tensor], steps: int) -> list[Tensor]:
    """One row per tensor (all of one device and dtype), ``[|d|^2, |u|^2, <d, u>, |d - steps*u|^2]`` with
    ``d = predicted - before`` and ``u = after - before``, walking the list in chunks (one ``(chunk, 4)`` tensor per
    chunk). ``predicted`` is overwritten; the temporaries are one chunk of ``u`` (and, for half-precision tensors, one
    float32 chunk of ``d``)."""
    # half precision: differences and sums in float32 (where the difference of two half-precision numbers is exact)
    upcast = after[0].dtype.itemsize < 4
    rows: list[Tensor] = []
    for part in chunk_slices(after):
        d: TensorList
        u: TensorList
        if upcast:
            d = [t.float() for t in predicted[part]]
            u = [t.float() for t in after[part]]
            torch._foreach_sub_(u, before[part])
        else:
            d = predicted[part]  # in the held copy of W_hat, which is not needed afterwards
            u = torch._foreach_sub(after[part], before[part])
        torch._foreach_sub_(d, before[part])
        d_norms, u_norms = torch._foreach_norm(d), torch._foreach_norm(u)
        dots = torch.stack([_dot(a, b) for a, b in zip(d, u, strict=True)])
        torch._foreach_sub_(d, u, alpha=steps)  # d - s*u
        e_norms = torch._foreach_norm(d)
        del d, u  # before the next chunk's
        squares = [torch.stack(norms).square() for norms in (d_norms, u_norms)]
        rows.append(torch.stack([*squares, dots, torch.stack(e_norms).square()], dim=1))
    return rows


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` over every element, without a temporary where both are contiguous."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()
