"""How far a prediction moved the weights, and how well it tracked the update the optimizer then applied, over every
predicted parameter, on all ranks.

:func:`relative_shift` is ``||W_hat - W|| / ||W||``. With ``d = W_hat - W`` the predicted displacement and
``u = W_next - W`` the update the optimizer applied right after (``s`` the steps predicted):

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
:class:`HeldPrediction` copies W_hat just before the restore and frees it once the update is measured.

That copy is bounded by a byte budget (``max_bytes``). When the predicted parameters fit in it, the copy is all of W_hat
(the parameters' own dtype, bit for bit) and the values are exact. When they do not, it holds a stratified systematic
sample of the rank's local tensors: the budget is shared out so that every tensor gets the same number of bytes or all
of itself if it is smaller (so the small tensors, an output layer or a norm, whose updates can weigh as much as a large
matrix's, are held whole), and a tensor larger than its share keeps every m-th element of its flattened data from an
offset of its own, m the smallest prime that brings it within the share (a prime is coprime with every row length below
it, so the sampled columns move from row to row instead of repeating one column). :meth:`HeldPrediction.compare` forms
the same sums over the same positions of W (the snapshot) and W_next (the parameters), each tensor's sums scaled by its
elements over its sampled elements; the cosine and the error, ratios of those sums, are then estimates. The other
temporaries are one chunk (:class:`~lightning_xgrad._internal.chunks.Chunks`, for the prediction's ``chunk_bytes``)
of the (sampled) ``u``, for half-precision parameters a float32 chunk of ``d`` too, and, for a non-contiguous tensor
only, a copy of that one tensor while it is sampled.

Sums run on each rank's local tensors; with DTensor parameters they are summed over the ranks (one ``all_reduce``),
counting replicated elements once. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._internal.chunks import Chunks, TensorList, budget_for
from .._internal.compat import group_by_device_and_dtype
from .._internal.sharding import sum_over_ranks
from .._internal.validation import argument_error

__all__ = [
    "DEFAULT_METRICS_MAX_BYTES",
    "HeldPrediction",
    "PredictionQuality",
    "relative_shift",
    "sampling_strides",
]

#: the budget of the held copy where none is given: 32 MiB, as the prediction's chunk budget
DEFAULT_METRICS_MAX_BYTES = 32 * 2**20


@dataclass(frozen=True)
class PredictionQuality:
    """The two numbers, for one optimizer's predicted parameters."""

    #: ``<d, u> / (||d|| ||u||)``, in [-1, 1]
    cosine: float
    #: ``||d - s*u|| / ||s*u||``
    error: float


class HeldPrediction:
    """W_hat of one optimizer's predicted parameters (all of it, or a systematic sample of at most ``max_bytes``),
    kept from the restore until its update has been applied.

    Build it from :meth:`~lightning_xgrad.OptimizerPredictor.predicted_params` while the prediction is in place (just
    before the restore); call :meth:`compare` after the optimizer's step, while the snapshot buffers still hold W, and
    :meth:`release` (or drop it) when done. ``max_bytes=None`` always holds all of W_hat; ``chunk_bytes`` is the budget
    of :meth:`compare`'s temporaries (``None``: the default of the parameters' device,
    :func:`~lightning_xgrad._internal.chunks.default_chunk_bytes`); ``owner`` and ``name`` say whose argument
    ``max_bytes`` is in the error raised when it cannot hold one element of each tensor."""

    def __init__(
        self,
        predicted: Sequence[tuple[Tensor, Tensor, Tensor]],
        max_bytes: int | None = DEFAULT_METRICS_MAX_BYTES,
        chunk_bytes: int | None = None,
        owner: str = "HeldPrediction",
        name: str = "max_bytes",
    ) -> None:
        self.owners = [owner for owner, _, _ in predicted]
        #: the tensors the optimizer updates in place (local shards for DTensor parameters)
        self.params = [local for _, local, _ in predicted]
        #: the snapshot buffers: W from the restore on
        self.real = [real for _, _, real in predicted]
        #: the byte budget of :meth:`compare`'s temporaries
        self.budget = budget_for(chunk_bytes, self.params)
        #: per tensor, every ``strides[i]``-th element is held (1: all of it); all 1: all of W_hat, exact values
        self.strides = sampling_strides(self.params, max_bytes, owner, name)
        #: where each tensor's sample starts in its flattened data
        self.offsets = [
            _offset(i, stride, t.numel()) for i, (t, stride) in enumerate(zip(self.params, self.strides, strict=True))
        ]
        #: the copy of W_hat (in the parameters' dtype and layout), or of its sampled elements (flat)
        self.predicted: list[Tensor]
        with torch.no_grad():
            if not self.sampled:
                self.predicted = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]
                _copy_grouped(self.predicted, self.params)
            else:
                self.predicted = [self._sampled(self.params, i).clone() for i in range(len(self.params))]

    @property
    def sampled(self) -> bool:
        """Whether a sample of W_hat is held (estimated values) rather than all of it (exact values)."""
        return any(stride > 1 for stride in self.strides)

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
        weights: list[float] = []  # per row: the tensor's elements over its sampled elements
        rows: list[Tensor] = []
        for indices in _grouped(self.params):
            owners += [self.owners[i] for i in indices]
            weights += [self.params[i].numel() / max(self.predicted[i].numel(), 1) for i in indices]
            rows += _partial_sums(
                [self._sampled(self.params, i) for i in indices],
                [self._sampled(self.real, i) for i in indices],
                [self.predicted[i] for i in indices],
                steps,
                self.budget,
            )
        self.release()
        device = rows[0].device
        sums = torch.cat([row.to(device=device, dtype=torch.float64) for row in rows])
        if self.sampled:  # each tensor's sums scaled from its sampled elements to all of them
            sums *= torch.tensor(weights, dtype=torch.float64, device=device).unsqueeze(1)
        dd, uu, du, ee = sum_over_ranks(owners, sums).tolist()  # one device sync, on logging steps only
        if dd == 0 or uu == 0:
            return None
        cosine = du / math.sqrt(dd * uu)
        if math.isfinite(cosine):  # rounding may step past +-1; a diverged run's NaN stays what it is
            cosine = max(-1.0, min(1.0, cosine))
        return PredictionQuality(cosine=cosine, error=math.sqrt(ee) / (steps * math.sqrt(uu)))

    def _sampled(self, tensors: list[Tensor], index: int) -> Tensor:
        """``tensors[index]`` at the held positions: the tensor itself when all of W_hat is held."""
        if not self.sampled:
            return tensors[index]
        return _sampled(tensors[index], self.offsets[index], self.strides[index])


def sampling_strides(
    tensors: Sequence[Tensor], max_bytes: int | None, owner: str = "HeldPrediction", name: str = "max_bytes"
) -> list[int]:
    """Per tensor, the stride of :class:`HeldPrediction`'s sample: all 1 when ``tensors`` fit in ``max_bytes`` (or it
    is ``None``). Else the budget is shared out by water-filling: the tensors that fit in an equal share of what the
    smaller ones left are held whole (stride 1), each larger one gets that share, ``q`` bytes, through the smallest
    prime stride that keeps its sample within ``q``. Raises a ValueError naming ``owner``'s ``name`` when
    ``max_bytes`` cannot hold one element of each non-empty tensor."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    strides = [1] * len(tensors)
    if max_bytes is None or sum(sizes) <= max_bytes:
        return strides
    order = sorted((i for i, t in enumerate(tensors) if t.numel()), key=sizes.__getitem__)
    least = len(order) * max(tensors[i].element_size() for i in order)
    if max_bytes < least:
        allowed = f"None or at least {least} bytes for these parameters (one element of each of {len(order)} tensors)"
        raise argument_error(owner, name, allowed, max_bytes)
    remaining = float(max_bytes)
    for position, i in enumerate(order):
        share = remaining / (len(order) - position)
        if sizes[i] > share:  # this one and every larger one are sampled, ``share`` bytes each
            for j in order[position:]:
                elements = int(share // tensors[j].element_size())  # >= 1: share >= max_bytes / count >= one element
                strides[j] = _prime_at_least(math.ceil(tensors[j].numel() / elements))
            break
        remaining -= sizes[i]
    return strides


def _offset(index: int, stride: int, numel: int) -> int:
    """Where tensor ``index``'s sample starts: spread over the tensors (a multiplicative hash of the index), always
    within the tensor, so that each tensor is sampled."""
    return (index * 2654435761) % max(1, min(stride, numel))


def _sampled(t: Tensor, offset: int, stride: int) -> Tensor:
    """Elements ``offset, offset + stride, ...`` of ``t`` flattened (in its logical order): a view where ``t`` is
    contiguous, else a copy of the sample (the whole tensor is copied while it is taken, then freed)."""
    if t.is_contiguous():
        return t.view(-1)[offset::stride]
    return t.reshape(-1)[offset::stride].clone()


def _prime_at_least(n: int) -> int:
    candidate = max(n, 2)
    while any(candidate % k == 0 for k in range(2, math.isqrt(candidate) + 1)):
        candidate += 1
    return candidate


def _grouped(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` by device and dtype (foreach kernels take one of each)."""
    return [indices for _, indices in group_by_device_and_dtype([tensors])]


def _copy_grouped(targets: list[Tensor], sources: list[Tensor]) -> None:
    for indices in _grouped(sources):
        torch._foreach_copy_([targets[i] for i in indices], [sources[i] for i in indices])


def _partial_sums(
    after: list[Tensor], before: list[Tensor], predicted: list[Tensor], steps: int, budget: int
) -> list[Tensor]:
    """One row per tensor (all of one device and dtype), ``[|d|^2, |u|^2, <d, u>, |d - steps*u|^2]`` with
    ``d = predicted - before`` and ``u = after - before``, walking the list in chunks of at most
    ``max(largest tensor, budget)`` bytes (one ``(chunk, 4)`` tensor per chunk). ``predicted`` is overwritten;
    the temporaries are one chunk of ``u`` (and, for half-precision tensors, one float32 chunk of ``d``)."""
    # half precision: differences and sums in float32 (where the difference of two half-precision numbers is exact)
    upcast = after[0].dtype.itemsize < 4
    rows: list[Tensor] = []
    for part in Chunks(after, budget):
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


@torch.no_grad()
def relative_shift(predicted: Sequence[tuple[Tensor, Tensor, Tensor]], chunk_bytes: int | None = None) -> float:
    """``||W_hat - W|| / ||W||`` from ``(parameter, predicted local tensor, real local value)`` triples (what
    :meth:`~lightning_xgrad.OptimizerPredictor.predicted_params` returns); needs at least one triple. The differences
    are formed one chunk of at most ``max(largest tensor, chunk_bytes)`` bytes at a time (``None``: the default of
    the tensors' device)."""
    values = [local for _, local, _ in predicted]
    real = [value for _, _, value in predicted]
    squares: list[Tensor] = []
    for part in Chunks(values, budget_for(chunk_bytes, values)):  # one chunk of differences alive at a time
        squares += [d.float().square().sum() for d in torch._foreach_sub(values[part], real[part])]
    shift = torch.stack(squares)
    norm = torch.stack([r.float().square().sum() for r in real])
    # logging steps only: with sharded parameters, one all_reduce of the two sums (replicated elements counted once)
    shift_squares, real_squares = sum_over_ranks([p for p, _, _ in predicted], torch.stack([shift, norm], dim=1))
    return float(shift_squares.sqrt() / real_squares.sqrt().clamp_min(1e-30))
