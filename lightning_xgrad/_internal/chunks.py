"""Tensor lists for foreach ops: their type, and walking them in chunks so that out-of-place temporaries stay bounded.

Out-of-place foreach ops (``torch._foreach_sqrt``, ``torch._foreach_sub``, ...) allocate one temporary per input
tensor. Walking a list in consecutive chunks of at most ``max(largest tensor, chunk_bytes)`` bytes bounds those
temporaries by that much, while each chunk is still one foreach call: the number of calls grows with the size of
the parameters over the budget, not with the number of tensors.

The default budget depends on the tensors' device (:func:`default_chunk_bytes`). On an accelerator it is
:data:`DEFAULT_CHUNK_BYTES` (32 MiB): small next to the models where transient memory matters (an fp32 model of 100M
parameters holds 400 MB; its largest tensor is often bigger than the budget anyway, and then the chunks are as large
as that tensor), and large enough that the fixed cost of a call (a few microseconds of dispatch, a kernel launch) is
a small share of the work it does: 32 MiB takes tens of microseconds to stream even on an H100/H200's 3-5 TB/s.
Models of many small tensors (a transformer's norms and biases) fit in one chunk per op. On the CPU a call costs no
launch, but a chunk larger than the caches makes every op of a chain stream its temporaries through memory: there
it is :data:`CPU_DEFAULT_CHUNK_BYTES` (1 MiB; AdamW's prediction on a 12.65 MiB MLP took 5.9 ms with it, 8.3 ms with
32 MiB, on 2 cores). ``chunk_bytes=0`` chunks by the largest tensor alone (the smallest transient).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "CPU_DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "ChunkedList",
    "TensorList",
    "chunk_bytes_of",
    "chunk_slices",
    "default_chunk_bytes",
]

#: what torch's foreach ops take, and return (out-of-place ones return tuples)
TensorList = list[Tensor] | tuple[Tensor, ...]

#: the transient-memory budget of one chunk, in bytes, where none is given, on an accelerator (module docstring)
DEFAULT_CHUNK_BYTES = 32 * 2**20
#: the same on the CPU, where cache-sized chunks are faster and calls are cheap
CPU_DEFAULT_CHUNK_BYTES = 2**20


def default_chunk_bytes(device: torch.device | str | None) -> int:
    """The budget used where none is given, for tensors on ``device``: 1 MiB on the CPU, 32 MiB elsewhere."""
    return CPU_DEFAULT_CHUNK_BYTES if torch.device(device or "cpu").type == "cpu" else DEFAULT_CHUNK_BYTES


def _slices(tensors: Sequence[Tensor], chunk_bytes: int | None) -> list[slice]:
    if not tensors:
        return []
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(tensors[0].device)
    sizes = [t.numel() * t.element_size() for t in tensors]
    budget = max(max(sizes), chunk_bytes)
    slices = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if used + size > budget and i > start:
            slices.append(slice(start, i))
            start, used = i, 0
        used += size
    slices.append(slice(start, len(tensors)))
    return slices


class ChunkedList(list):
    """A list of tensors that carries its chunk budget and its chunks, computed once.

    The predictor's buckets hold their parameters in one of these, planned with the budget the user chose: the rules
    call :func:`chunk_slices` on it every step at no Python cost per tensor, and any helper that receives it walks
    it with that budget. Slicing it gives plain lists. Do not grow or shrink it after construction (a changed
    length is noticed, and the chunks recomputed, but replaced entries are not).
    """

    def __init__(self, tensors: Sequence[Tensor], chunk_bytes: int | None = None) -> None:
        super().__init__(tensors)
        #: the budget in bytes (``None`` given: the default of the first tensor's device)
        self.chunk_bytes = default_chunk_bytes(self[0].device if self else None) if chunk_bytes is None else chunk_bytes
        self.slices = _slices(self, chunk_bytes)

    def chunks(self, chunk_bytes: int | None = None) -> list[slice]:
        """The chunks for ``chunk_bytes`` (by default the list's own budget)."""
        if chunk_bytes is not None and chunk_bytes != self.chunk_bytes:
            return _slices(self, chunk_bytes)
        if not self.slices or self.slices[-1].stop != len(self):
            self.slices = _slices(self, self.chunk_bytes)
        return self.slices


def chunk_bytes_of(tensors: Sequence[Tensor]) -> int | None:
    """The budget a :class:`ChunkedList` was planned with, ``None`` for any other sequence: what a function that
    derives new lists from its argument passes on, so that they are walked with the same budget."""
    return tensors.chunk_bytes if isinstance(tensors, ChunkedList) else None


def chunk_slices(tensors: Sequence[Tensor], chunk_bytes: int | None = None) -> Iterator[slice]:
    """Consecutive slices of ``tensors``, each holding at most ``max(largest tensor, chunk_bytes)`` bytes.

    ``chunk_bytes=None`` takes the budget of a :class:`ChunkedList` (whose chunks are computed once), else the
    default of the tensors' device (:func:`default_chunk_bytes`). Out-of-place foreach ops on one chunk then
    allocate at most that much, and a list of many small tensors is walked in few calls.
    """
    if isinstance(tensors, ChunkedList):
        return iter(tensors.chunks(chunk_bytes))
    return iter(_slices(tensors, chunk_bytes))
