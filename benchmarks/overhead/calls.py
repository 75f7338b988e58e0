"""What one ``OptimizerPredictor.predict()`` + ``restore()`` dispatches, for every rule family, on models of a few
sizes: ATen calls (and their growth with the number of tensors), host reads of tensor values, CUDA kernel launches,
the hooks' transient memory and time; and what one unused trainable module (a parameter that never gets optimizer
state) costs per step.

The models are n blocks of Linear(64) + LayerNorm(64), trained by random gradients instead of a forward and
backward pass, so that the count holds the prediction's calls only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_xgrad import OptimizerPredictor
from lightning_xgrad._internal.chunks import default_chunk_bytes

from .measure import median, sync, timed, transient_bytes

#: tensor counts of the calls measurement: n blocks of Linear(64) + LayerNorm(64), 4 tensors per block
CALL_SIZES = (40, 400, 4000)
#: optimizer steps (with fresh random gradients) before anything is measured, so every rule has its state
CALL_WARMUP_STEPS = 6
#: the unused-module case: a trainable Linear(64, 64) without optimizer state next to this many used tensors
UNUSED_FAMILIES = ("AdamW", "SGD momentum")
UNUSED_TENSORS = 400

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def rule_families(device: torch.device) -> dict[str, OptimizerFactory]:
    """One optimizer per prediction rule family, as users configure them (foreach where the optimizer has it)."""
    from lightning_xgrad.cprop import CPropAdam
    from lightning_xgrad.heavy_ball import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD
    from lightning_xgrad.optim import AdaM3

    families: dict[str, OptimizerFactory] = {
        "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, foreach=True),
        "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, fused=True),
        "Adam amsgrad": lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True, foreach=True),
        "RAdam": lambda p: torch.optim.RAdam(p, lr=1e-3, foreach=True),
        "Adamax": lambda p: torch.optim.Adamax(p, lr=1e-3, foreach=True),
        "NAdam (trajectory)": lambda p: torch.optim.NAdam(p, lr=1e-3, foreach=True),
        "SGD momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True),
        "RMSprop momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, foreach=True),
        "AdaM3": lambda p: AdaM3(p, lr=1e-3, foreach=True),
        "CPropAdam": lambda p: CPropAdam(p, lr=1e-3, foreach=True),
        "AdaptiveHeavyBallAdam": lambda p: AdaptiveHeavyBallAdam(p, lr=1e-3),
        "AdaptiveHeavyBallSGD": lambda p: AdaptiveHeavyBallSGD(p, lr=1e-2),
    }
    if device.type == "cuda":  # its step counter lives on the GPU (torch refuses it on the CPU)
        families["Adam capturable"] = lambda p: torch.optim.Adam(p, lr=1e-3, capturable=True, foreach=True)
    return families


def blocks(tensors: int) -> nn.Module:
    """n blocks of Linear(64, 64) + LayerNorm(64): 4 tensors per block, the largest 16 KiB."""
    if tensors < 4 or tensors % 4:
        raise ValueError(f"tensor counts must be positive multiples of 4 (one block = 4 tensors), got {tensors}")
    return nn.Sequential(*(layer for _ in range(tensors // 4) for layer in (nn.Linear(64, 64), nn.LayerNorm(64))))


@dataclass
class CallCount:
    """What one predict() + restore() dispatches, from the profiler."""

    #: ATen operators called from Python (nested ones, e.g. a foreach op's per-tensor fallback, not counted again)
    aten: int
    #: host reads of a tensor's value (``aten::_local_scalar_dense``: ``.item()``, ``float(t)``): syncs on a GPU
    scalar_reads: int
    #: CUDA only (else None): kernel launches through the runtime or driver API, and kernels that ran on the device
    launches: int | None = None
    kernels: int | None = None


def _has_aten_ancestor(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def count_calls(work: Callable[[], Any], device: torch.device) -> CallCount:
    """Profile ``work`` once and count its top-level ATen calls, host reads and, on CUDA, kernel launches."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        work()
        sync(device)
    events = profiler.events()
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    count = CallCount(
        aten=sum(1 for e in cpu if e.name.startswith("aten::") and not _has_aten_ancestor(e)),
        scalar_reads=sum(1 for e in cpu if e.name == "aten::_local_scalar_dense"),
    )
    if device.type == "cuda":
        count.launches = sum(1 for e in cpu if "LaunchKernel" in e.name or e.name == "cudaGraphLaunch")
        count.kernels = sum(
            1
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
        )
    return count


class PredictionBench:
    """An optimizer with state over a model's parameters and an :class:`OptimizerPredictor` on it, stepped like a
    training loop (predict, gradients, restore, step) with random gradients instead of a forward and backward pass.

    ``unused`` parameters are in the optimizer but never get a gradient, so never any state (a pretrained model's
    unused head)."""

    def __init__(
        self,
        factory: OptimizerFactory,
        used: list[nn.Parameter],
        device: torch.device,
        unused: Sequence[nn.Parameter] = (),
        chunk_bytes: int | None = None,
    ) -> None:
        self.device = device
        self.used = used
        self.optimizer = factory([*used, *unused])
        self.predictor = OptimizerPredictor(self.optimizer, steps=1, chunk_bytes=chunk_bytes)
        generator = torch.Generator(device=device).manual_seed(0)
        for _ in range(CALL_WARMUP_STEPS):
            self.predictor.predict()
            for p in used:
                p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype)
            self.predictor.restore()
            self.optimizer.step()

    def hooks(self) -> None:
        """What the callback does per step: predict, then (after forward and backward) restore."""
        self.predictor.predict()
        self.predictor.restore()

    def measured(self, probe: Callable[[Callable[[], None]], Any]) -> Any:
        """``probe(self.hooks)``, then the optimizer's step (the gradients of the last warm-up step), as in training."""
        result = probe(self.hooks)
        self.optimizer.step()
        return result

    def time_hooks(self) -> float:
        """Seconds of one predict() + restore() (synchronized), then a step."""
        return self.measured(lambda work: timed(work, self.device))

    def transient(self) -> int:
        """Peak bytes the hooks allocate beyond what was allocated before them (see :func:`transient_bytes`)."""
        peaks: list[int] = []

        def probe(work: Callable[[], None]) -> None:
            with transient_bytes(self.device, peaks.append):
                work()

        self.measured(probe)
        return peaks[0]


def _on(device: torch.device, module: nn.Module) -> list[nn.Parameter]:
    return list(module.to(device).parameters())


def measure_calls(
    families: list[str],
    sizes: list[int],
    repeats: int,
    device: torch.device,
    unused_tensors: int = UNUSED_TENSORS,
    chunk_bytes: int | None = None,
) -> dict[str, Any]:
    """Calls, transient bytes and hook time per rule family and model size, and the unused-module case, with the
    predictor's ``chunk_bytes`` (None: its default budget)."""
    factories = rule_families(device)
    rows: dict[str, Any] = {}
    plan = [(family, size) for family in families for size in sizes]
    budget = 0
    for family, size in tqdm(plan, desc="calls", unit="case"):
        torch.manual_seed(0)
        params = _on(device, blocks(size))
        bench = PredictionBench(factories[family], params, device, chunk_bytes=chunk_bytes)
        budget = default_chunk_bytes(device) if chunk_bytes is None else chunk_bytes  # what the chunks were cut by
        count = bench.measured(lambda work: count_calls(work, device))
        transient = bench.transient()
        seconds = [bench.time_hooks() for _ in range(repeats)]
        rows.setdefault(family, {})[str(size)] = {
            **vars(count),
            "transient_bytes": transient,
            "hooks_ms": 1e3 * median(seconds),
        }
    largest = max(p.numel() * p.element_size() for p in blocks(4).parameters())
    summary: dict[str, Any] = {"sizes": sizes, "largest_bytes": largest, "budget_bytes": budget, "rules": {}}
    for family, per_size in rows.items():
        first, last = per_size[str(sizes[0])], per_size[str(sizes[-1])]
        transient = max(row["transient_bytes"] for row in per_size.values())
        summary["rules"][family] = {
            "per_size": per_size,
            "aten_growth": last["aten"] / first["aten"],
            "launch_growth": None if first["launches"] is None else last["launches"] / max(first["launches"], 1),
            "transient_bytes": transient,
            "transient_over_largest": transient / largest,
            "transient_over_max_largest_budget": transient / max(largest, budget),
        }
    summary["unused_module"] = {
        family: measure_unused_module(factories[family], unused_tensors, repeats, device, chunk_bytes)
        for family in tqdm([f for f in UNUSED_FAMILIES if f in families], desc="unused module", unit="rule")
    }
    return summary


def measure_unused_module(
    factory: OptimizerFactory, tensors: int, repeats: int, device: torch.device, chunk_bytes: int | None = None
) -> dict[str, Any]:
    """predict() + restore() with one unused trainable Linear(64, 64) in the optimizer next to ``tensors`` used
    tensors, over the same without it; runs alternate so the machine's drift cancels."""
    torch.manual_seed(0)
    unused = _on(device, nn.Linear(64, 64))
    with_unused = PredictionBench(factory, _on(device, blocks(tensors)), device, unused, chunk_bytes)
    torch.manual_seed(0)
    without = PredictionBench(factory, _on(device, blocks(tensors)), device, chunk_bytes=chunk_bytes)
    times: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(max(repeats, 5)):
        times["with"].append(with_unused.time_hooks())
        times["without"].append(without.time_hooks())
    calls_with = with_unused.measured(lambda work: count_calls(work, device)).aten
    calls_without = without.measured(lambda work: count_calls(work, device)).aten
    return {
        "tensors": tensors,
        "with_ms": 1e3 * median(times["with"]),
        "without_ms": 1e3 * median(times["without"]),
        "ratio": median(times["with"]) / median(times["without"]),
        "aten_with": calls_with,
        "aten_without": calls_without,
    }
