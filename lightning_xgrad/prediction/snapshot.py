"""The parameter cache: one buffer per parameter, allocated once, written and read back in place, bit-exact.

Buffers are keyed by the parameter object, so rebuilding a prediction plan (a new param group, a resumed optimizer)
reuses them; the cache never holds more than one copy of the parameters it serves. Writes go through
``torch._foreach_copy_`` on lists that share a device and dtype, so compiled graphs that captured the parameters
stay valid (``param.data`` is never rebound).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .._internal.chunks import Chunks


class ParameterSnapshot:
    """Snapshot buffers for parameters, created on first use and reused every step."""

    def __init__(self) -> None:
        self._buffers: dict[Tensor, Tensor] = {}

    def buffers_for(self, keys: Iterable[Tensor], like: Iterable[Tensor]) -> list[Tensor]:
        """The buffer of each key (a parameter), shaped like the matching tensor of ``like`` (the parameter or its
        local shard), allocated uninitialised the first time it is asked for."""
        out = []
        for key, t in zip(keys, like, strict=True):
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype or buffer.device != t.device:
                buffer = torch.empty_like(t, memory_format=torch.preserve_format).detach()
                self._buffers[key] = buffer
            out.append(buffer)
        return out

    def get(self, param: Tensor) -> Tensor | None:
        """The buffer of ``param`` if one was ever allocated."""
        return self._buffers.get(param)

    def clear(self) -> None:
        """Release every buffer."""
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @staticmethod
    @torch.no_grad()
    def save(params: list[Tensor], buffers: list[Tensor]) -> None:
        """``buffers <- params``."""
        torch._foreach_copy_(buffers, params)

    @staticmethod
    @torch.no_grad()
    def restore(params: list[Tensor], buffers: list[Tensor]) -> None:
        """``params <- buffers``, bit-exact."""
        torch._foreach_copy_(params, buffers)

    @staticmethod
    @torch.no_grad()
    def swap(params: list[Tensor], buffers: list[Tensor], chunks: Chunks) -> None:
        """Exchange the values of params and buffers, with the temporaries of one of ``params``' chunks at a time."""
        for part in chunks:
            held = [torch.empty_like(p) for p in params[part]]
            torch._foreach_copy_(held, params[part])
            torch._foreach_copy_(params[part], buffers[part])
            torch._foreach_copy_(buffers[part], held)
            del held
