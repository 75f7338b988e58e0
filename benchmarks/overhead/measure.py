"""What both measurements share: a device sync, a synchronized timer, the median, and two memory counters: the peak
a block of code allocates, and the bytes a call frees."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA), so that a timer or a memory counter sees it done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``work()``, synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextmanager
def transient_bytes(device: torch.device, record: Callable[[int], None]) -> Iterator[None]:
    """Peak bytes allocated inside the block beyond what was allocated before it. CUDA: the caching allocator's
    peak. CPU: the profiler's allocation and free events, summed in time order (works for compiled code too)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        record(torch.cuda.max_memory_allocated(device) - before)
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    record(peak)


def _live_storages() -> dict[tuple[str, int], int]:
    """(device, address) -> bytes of the storage of every tensor that a Python object holds, after a collection."""
    gc.collect()
    storages: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):
            continue
        try:
            storage = obj.untyped_storage()
            address = storage.data_ptr()
        except Exception:  # sparse, nested, fake or meta tensors: no plain storage to count
            continue
        if address:
            storages[str(obj.device), address] = storage.nbytes()
    return storages


def freed_bytes(work: Callable[[], Any]) -> int:
    """Bytes of the tensor storages that ``work()`` frees: held by Python objects before it, by none after. It looks
    at every live tensor (the garbage collector's objects), so it needs no access to what held them; it takes a
    fraction of a second, so it belongs outside anything timed."""
    before = _live_storages()
    work()
    after = _live_storages()
    return sum(nbytes for key, nbytes in before.items() if key not in after)
