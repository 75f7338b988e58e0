"""Walking lists of tensors in chunks, so that the temporaries of out-of-place foreach ops stay within a byte budget.

Out-of-place foreach ops (``torch._foreach_sqrt``, ``torch._foreach_sub``, ...) allocate one temporary per input
tensor. Walking a list in consecutive chunks of at most ``max(largest tensor, budget)`` bytes bounds those temporaries
by that much, while each chunk is still one foreach call: the number of calls grows with the size of the parameters
over the budget, not with the number of tensors.

The budget is always explicit: a :class:`Chunks` is cut for one list with one budget, and whoever walks a list takes
its chunks (or the budget) as an argument. Where a user leaves it open (``chunk_bytes=None``), the default of the
tensors' device is chosen once, by :func:`default_chunk_bytes`: on an accelerator 32 MiB, small next to the models
where transient memory matters and large enough that a call's fixed cost (dispatch, a kernel launch) is a small share
of the work it does, so the many small tensors of most models fit in one call per op; on the CPU 1 MiB, where a call
launches nothing and chunks larger than the caches make every op of a chain stream its temporaries through memory.
A budget of 0 chunks by the largest tensor alone (the smallest transient).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "CPU_DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "Chunks",
    "TensorList",
    "budget_for",
    "default_chunk_bytes",
]

#: what torch's foreach ops take, and return (out-of-place ones return tuples)
TensorList = list[Tensor] | tuple[Tensor, ...]

#: the budget of one chunk, in bytes, where none is given, on an accelerator (module docstring)
DEFAULT_CHUNK_BYTES = 32 * 2**20
#: the same on the CPU, where cache-sized chunks are faster and calls are cheap
CPU_DEFAULT_CHUNK_BYTES = 2**20


def default_chunk_bytes(device: torch.device | str | None) -> int:
    """The budget used where none is given, for tensors on ``device``: 1 MiB on the CPU, 32 MiB elsewhere."""
    return CPU_DEFAULT_CHUNK_BYTES if torch.device(device or "cpu").type == "cpu" else DEFAULT_CHUNK_BYTES


def budget_for(chunk_bytes: int | None, tensors: Sequence[Tensor]) -> int:
    """``chunk_bytes``, or where it is ``None`` the default of the tensors' device."""
    if chunk_bytes is not None:
        return chunk_bytes
    return default_chunk_bytes(tensors[0].device if tensors else None)


class Chunks:
    """The chunks one list of tensors is walked in: consecutive slices of it, each holding at most
    ``max(largest tensor, budget)`` bytes, cut once (a plan keeps one per bucket and hands it to every walk over that
    bucket). :meth:`of` cuts another list, derived from the first (a subset, a list of temporaries), with the same
    budget. Iterating gives the slices."""

    __slots__ = ("budget", "slices")

    def __init__(self, tensors: Sequence[Tensor], budget: int) -> None:
        self.budget = budget
        self.slices = _slices(tensors, budget)

    def of(self, tensors: Sequence[Tensor]) -> Chunks:
        """The chunks of ``tensors`` for the same budget."""
        return Chunks(tensors, self.budget)

    def __iter__(self) -> Iterator[slice]:
        return iter(self.slices)

    def __len__(self) -> int:
        return len(self.slices)

    def __repr__(self) -> str:
        return f"Chunks({len(self.slices)} chunks, budget={self.budget})"


def _slices(tensors: Sequence[Tensor], budget: int) -> list[slice]:
    if not tensors:
        return []
    sizes = [t.numel() * t.element_size() for t in tensors]
    limit = max(max(sizes), budget)
    slices = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if used + size > limit and i > start:
            slices.append(slice(start, i))
            start, used = i, 0
        used += size
    slices.append(slice(start, len(tensors)))
    return slices
