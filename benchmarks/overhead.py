"""Overhead benchmark: what XGradCallback costs per step, against the optimizer's own update and a naive XGrad.

Two models, each with AdamW and SGD momentum (both ``foreach=True``), trained by a real ``Trainer`` on synthetic
batches in one process, variants interleaved run by run:

- ``mlp``: optimizer-bound, 50 blocks of Linear(256, 256) + LayerNorm(256) at batch 4 (200 tensors, 3.3 M params);
- ``cnn``: compute-bound, a small CNN on 3x32x32 images at batch 64.

Variants: ``xgrad`` (XGradCallback), ``xgrad-compiled`` (``XGradCallback(compile=True)``: snapshot and prediction
in one compiled pass), ``naive`` (the official code's way: per parameter, a clone and one in-place update, in a
Python loop; restored by per-parameter copies). In every run the callback acts on every other step only, so the
whole-step overhead compares neighbouring steps of the same run, which cancels most of a shared machine's noise.
Per step it records the time inside the callback's hooks (predict + restore), the optimizer's own update (from
``on_before_optimizer_step`` to the step's post-hook) and the whole step (``on_train_batch_start`` to
``on_train_batch_end``). Memory: bytes the callback holds between steps, and the peak of the temporaries its hooks
allocate (CUDA: ``max_memory_allocated``; CPU: the profiler's allocation events). Medians over steps and runs go to
``overhead.{md,json,png}`` in ``--out`` (default: a new folder under ``benchmarks/runs/``, which git ignores);
``--publish`` also writes them to ``benchmarks/results/``, the published results the README links to. The plot
shows the hooks' time next to the optimizer's update, and the whole-step overhead with its 95% interval.

A second measurement (``--only calls`` alone) counts what one ``predict()`` + ``restore()`` of an
``OptimizerPredictor`` dispatches, with torch.profiler, for every rule family on models of 40, 400 and 4000 tensors
(n blocks of Linear(64) + LayerNorm(64)): ATen calls and their growth with the number of tensors (issue 14's target:
at most 2x from 40 to 4000), host reads of tensor values, kernel launches on CUDA, the hooks' transient memory over
the largest tensor and over max(largest tensor, chunk_bytes), and the time cost of one unused trainable module (a
parameter without optimizer state).

    python benchmarks/overhead.py --publish                    # the published run (both measurements)
    python benchmarks/overhead.py --only steps --runs 2 --steps 20 --cases mlp-adamw
    python benchmarks/overhead.py --only calls                 # ATen calls per step, 8 min on 2 busy cores
    python benchmarks/overhead.py --only calls --calls-sizes 40 400 --calls-rules AdamW "SGD momentum"
    python benchmarks/overhead.py --replot benchmarks/results/overhead.json --publish  # redraw the plot only

``benchmarks/gpu_check.sh`` runs both on CUDA (``--cases mlp-adamw_fused`` is AdamW with ``fused=True``,
``--precision bf16-mixed`` the Trainer's precision).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_xgrad import XGradCallback
from lightning_xgrad._internal.chunks import default_chunk_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "benchmarks" / "runs"
VARIANTS = ("xgrad", "xgrad-compiled", "naive")
XGRAD_VARIANTS = ("xgrad", "xgrad-compiled")
OPTIMIZERS = ("adamw", "sgd")
#: what ``--cases`` also accepts: AdamW with ``fused=True`` (for the GPU check)
OPTIMIZER_CHOICES = (*OPTIMIZERS, "adamw_fused")
MEASUREMENTS = ("steps", "calls")
MODELS = ("mlp", "cnn")


# ---------------------------------------------------------------------- models and data
def mlp(width: int = 256, blocks: int = 50) -> nn.Module:
    """Optimizer-bound: many small tensors, little compute per parameter at batch 4."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    return nn.Sequential(*layers)


def cnn(classes: int = 10) -> nn.Module:
    """Compute-bound: convolutions over 32x32 images at batch 64, few parameters."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * 16, classes))


class Synthetic(Dataset):
    """Fixed random batches, generated once (no data loading in the measured step)."""

    def __init__(self, model: str, batches: int, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        shape = (batches, batch_size, 256) if model == "mlp" else (batches, batch_size, 3, 32, 32)
        self.inputs = torch.randn(shape, generator=generator)
        classes = 256 if model == "mlp" else 10
        self.targets = torch.randint(0, classes, shape[:2], generator=generator)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


class Classifier(pl.LightningModule):
    def __init__(self, model: str, optimizer: str) -> None:
        super().__init__()
        self.net = mlp() if model == "mlp" else cnn()
        self.optimizer_name = optimizer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name in ("adamw", "adamw_fused"):
            fused = {"fused": True} if self.optimizer_name == "adamw_fused" else {"foreach": True}
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-2, **fused)
        return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9, foreach=True)


# ---------------------------------------------------------------------- the naive reference
class NaiveXGrad(Callback):
    """XGrad as the official code writes it: a Python loop over parameters, a fresh clone of each every step, one
    in-place update per tensor, and a per-parameter copy back. Same hooks as XGradCallback, for a fair timing."""

    def __init__(self, steps: int = 1) -> None:
        self.steps = steps
        self.saved: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        optimizer = trainer.optimizers[0]
        for group in optimizer.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                self.saved.append((p, p.detach().clone()))
                if "exp_avg" in state:
                    beta1, beta2 = group["betas"]
                    step = float(state["step"])
                    bias_correction1 = 1 - beta1**step
                    bias_correction2 = 1 - beta2**step
                    denom = (state["exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-self.steps * lr / bias_correction1)
                else:
                    p.add_(state["momentum_buffer"], alpha=-self.steps * lr)

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for p, value in self.saved:
            p.copy_(value)
        self.saved = []


# ---------------------------------------------------------------------- probes
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@dataclass
class StepTimes:
    hooks: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    transient: list[int] = field(default_factory=list)
    persistent: int = 0
    #: hook time of the first predicted step (compilation, first allocations), per run
    first_hooks: list[float] = field(default_factory=list)
    #: whether the measured callback ran in each recorded step (it runs every other step)
    active: list[bool] = field(default_factory=list)
    #: step time with the callback over the next step's without it, within a run: machine noise mostly cancels
    pair_ratios: list[float] = field(default_factory=list)


class Probe(Callback):
    """Times one run. ``first()`` goes before the measured callback in the list, the probe itself after it.

    The measured callback runs every other step only (even global steps): each step with it is compared with the
    next step without it in the same run, which cancels most of the machine's drift and noise. Its hooks are timed
    (the sum per step is the XGrad cost), and one step also records their transient memory.
    """

    def __init__(self, times: StepTimes, warmup: int, device: torch.device) -> None:
        self.times = times
        self.warmup = warmup
        self.device = device
        # an even step (one where the callback acts) after the first prediction, which allocates the snapshot
        self.memory_step = warmup + warmup % 2
        self._hook_time = 0.0
        self._step_start = 0.0
        self._update_start = 0.0
        self._update_time = 0.0
        self._start_step = 0
        self._last_active_time: float | None = None
        self._handle: Any = None

    def first(self) -> Callback:
        probe = self

        class First(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                _sync(probe.device)
                probe._hook_time = 0.0
                probe._start_step = trainer.global_step
                probe._step_start = time.perf_counter()

        return First()

    @property
    def active(self) -> bool:
        return self._start_step % 2 == 0

    def wrap(self, callback: Callback, hooks: tuple[str, ...]) -> None:
        """Run ``callback``'s hooks on even steps only, timed."""
        for name in hooks:
            original = getattr(callback, name)

            def timed(trainer: pl.Trainer, *args: Any, _original: Callable[..., Any] = original) -> Any:
                if not self.active:
                    return None
                _sync(self.device)
                start = time.perf_counter()
                if self._start_step == self.memory_step:
                    with transient_bytes(self.device, self.times.transient.append):
                        result = _original(trainer, *args)
                else:
                    result = _original(trainer, *args)
                _sync(self.device)
                self._hook_time += time.perf_counter() - start
                return result

            setattr(callback, name, timed)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle = trainer.optimizers[0].register_step_post_hook(self._after_update)

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        _sync(self.device)
        self._update_start = time.perf_counter()

    def _after_update(self, *args: Any) -> None:
        _sync(self.device)
        self._update_time = time.perf_counter() - self._update_start

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        _sync(self.device)
        elapsed = time.perf_counter() - self._step_start
        if self._start_step == 2:  # the first step with the callback on and optimizer state to predict from
            self.times.first_hooks.append(self._hook_time)
        if self._start_step < self.warmup:
            return
        self.times.step.append(elapsed)
        self.times.hooks.append(self._hook_time)
        self.times.update.append(self._update_time)
        self.times.active.append(self.active)
        if self.active:
            self._last_active_time = elapsed
        elif self._last_active_time is not None:
            self.times.pair_ratios.append(self._last_active_time / elapsed)
            self._last_active_time = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, XGradCallback):
                self.times.persistent = callback._snapshot.nbytes
        self._handle.remove()


# ---------------------------------------------------------------------- ATen calls per predict() + restore()
#: tensor counts of the calls measurement: n blocks of Linear(64) + LayerNorm(64), 4 tensors per block
CALL_SIZES = (40, 400, 4000)
#: the issue's target: calls per step grow at most this much from the smallest to the largest model
CALL_GROWTH_TARGET = 2.0
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
        _sync(device)
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
        from lightning_xgrad import OptimizerPredictor

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

        def timed(work: Callable[[], None]) -> float:
            _sync(self.device)
            start = time.perf_counter()
            work()
            _sync(self.device)
            return time.perf_counter() - start

        return self.measured(timed)

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


def _kib(n: float) -> str:
    return f"{n / 2**10:.1f} KiB"


def _per_size(per_size: dict[str, Any], key: str, fmt: Callable[[Any], str]) -> str:
    """One cell: ``key`` at every model size, smallest first."""
    return " / ".join(fmt(row[key]) for row in per_size.values())


def calls_report(calls: dict[str, Any], command: str, device: str) -> str:
    """The calls measurement as markdown: calls per step and their growth, transient memory, the unused module."""
    sizes = [str(s) for s in calls["sizes"]]
    budget = calls["budget_bytes"]
    cuda = any(r["launch_growth"] is not None for r in calls["rules"].values())
    lines = [
        "# ATen calls per predict() + restore()",
        "",
        f"Command: `{command}`  ",
        f"Machine: {device}, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        f"`OptimizerPredictor` on models of n blocks of Linear(64) + LayerNorm(64) ({', '.join(sizes)} tensors; the "
        f"largest tensor {_kib(calls['largest_bytes'])}), each optimizer after {CALL_WARMUP_STEPS} steps with random "
        "gradients so its state exists. One predict() + restore(), profiled:",
        "",
        "- *ATen calls*: ATen operators called from Python (a foreach op counts once; what it calls inside does not);",
        f"- *growth*: calls at {sizes[-1]} tensors over calls at {sizes[0]}; the target is ≤ {CALL_GROWTH_TARGET:g}x;",
        "- *host reads*: `aten::_local_scalar_dense` (`.item()`, `float(tensor)`): a device sync when the tensor lives "
        "on a GPU (on the CPU, reading a step counter is free);",
        "- *transient*: peak bytes the hooks allocate beyond what was allocated before them (CUDA: the caching "
        "allocator's peak; CPU: the profiler's allocation events), the largest over the sizes; the target is "
        "≤ max(largest tensor, budget);",
        "- *hooks ms*: median time of predict() + restore() (synchronized), per size.",
        "",
        f"| rule | ATen calls {' / '.join(sizes)} | growth (≤ {CALL_GROWTH_TARGET:g}x) | host reads "
        f"{' / '.join(sizes)} | transient {' / '.join(sizes)} | transient / largest | "
        "transient / max(largest, budget) (≤ 1) | hooks ms " + " / ".join(sizes) + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, rule in calls["rules"].items():
        per = rule["per_size"]
        growth = rule["aten_growth"]
        budget_cell = _check(rule["transient_over_max_largest_budget"], 1.0, True)
        lines.append(
            f"| {family} | {_per_size(per, 'aten', str)} | {_check(growth, CALL_GROWTH_TARGET, True)} | "
            f"{_per_size(per, 'scalar_reads', str)} | {_per_size(per, 'transient_bytes', _kib)} | "
            f"{rule['transient_over_largest']:.2f} | {budget_cell} | {_per_size(per, 'hooks_ms', '{:.2f}'.format)} |"
        )
    if cuda:
        lines += [
            "",
            "## CUDA kernel launches per predict() + restore()",
            "",
            "*launches*: the runtime's and the driver's kernel-launch calls (`cudaLaunchKernel`, `cuLaunchKernel`, "
            "...); *kernels*: kernels the CUDA profiler saw run (copies and memsets not counted).",
            "",
            f"| rule | launches {' / '.join(sizes)} | growth (≤ {CALL_GROWTH_TARGET:g}x) | "
            f"kernels {' / '.join(sizes)} |",
            "|---|---|---|---|",
        ]
        for family, rule in calls["rules"].items():
            per = rule["per_size"]
            lines.append(
                f"| {family} | {_per_size(per, 'launches', str)} | "
                f"{_check(rule['launch_growth'], CALL_GROWTH_TARGET, True)} | {_per_size(per, 'kernels', str)} |"
            )
    if calls["unused_module"]:
        used = next(iter(calls["unused_module"].values()))["tensors"]
        lines += [
            "",
            "## An unused trainable module",
            "",
            "One trainable Linear(64, 64) in the optimizer that never gets a gradient, so never optimizer state, next "
            f"to {used} used tensors; predict() + restore() with it over the same without it (alternating runs, "
            "medians). The target: it costs nothing per step (ratio ≈ 1).",
            "",
            "| rule | with ms | without ms | ratio | ATen calls with / without |",
            "|---|---|---|---|---|",
        ]
        for family, row in calls["unused_module"].items():
            lines.append(
                f"| {family} | {row['with_ms']:.3f} | {row['without_ms']:.3f} | {row['ratio']:.2f}x | "
                f"{row['aten_with']} / {row['aten_without']} |"
            )
    lines.append("")
    size = _mib(budget) if budget >= 2**20 else _kib(budget)
    lines.append(
        f"Budget: `chunk_bytes` = {budget} ({size}): each out-of-place foreach call covers as many tensors as "
        "fit in max(largest tensor, budget), so the calls grow with the bytes over the budget, not with the number "
        "of tensors."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- targets
#: issue 14's targets for the hooks over the optimizer's update on the optimizer-bound mlp, by (optimizer, variant)
HOOKS_OVER_UPDATE_TARGETS = {("adamw", "xgrad"): 0.6, ("adamw", "xgrad-compiled"): 0.45}
HOOKS_OVER_UPDATE_TARGETS |= {("sgd", "xgrad"): 0.9, ("sgd", "xgrad-compiled"): 0.9}
#: the whole-step overhead target on the compute-bound cnn
STEP_OVERHEAD_TARGET = 0.01


# ---------------------------------------------------------------------- one run
def run_once(model: str, optimizer: str, variant: str, args: argparse.Namespace, times: StepTimes) -> None:
    pl.seed_everything(0, verbose=False)
    module = Classifier(model, optimizer)
    batch_size = 4 if model == "mlp" else 64
    data = DataLoader(Synthetic(model, args.warmup + args.steps, batch_size), batch_size=None, shuffle=False)
    probe = Probe(times, args.warmup, torch.device(args.device))
    callbacks: list[Callback] = [probe.first()]
    if variant in XGRAD_VARIANTS:
        xgrad = XGradCallback(steps=1, compile=variant == "xgrad-compiled")
        probe.wrap(xgrad, ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"))
        callbacks.append(xgrad)
    elif variant == "naive":
        naive = NaiveXGrad(steps=1)
        probe.wrap(naive, ("on_train_batch_start", "on_before_optimizer_step"))
        callbacks.append(naive)
    callbacks.append(probe)
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)


# ---------------------------------------------------------------------- report
def param_stats(model: str) -> tuple[int, int, int]:
    """Number of tensors, parameter bytes, bytes of the largest tensor."""
    params = list((mlp() if model == "mlp" else cnn()).parameters())
    sizes = [p.numel() * p.element_size() for p in params]
    return len(params), sum(sizes), max(sizes)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bootstrap_median_ci(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of the median."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def summarize(results: dict[str, dict[str, StepTimes]]) -> dict[str, dict[str, Any]]:
    """Medians and ratios per case and variant."""
    summary: dict[str, dict[str, Any]] = {}
    for case, per_variant in results.items():
        count, param_bytes, largest = param_stats(case.split("-")[0])
        row: dict[str, Any] = {"tensors": count, "param_bytes": param_bytes, "largest_bytes": largest}
        for variant, t in per_variant.items():
            on = [x for x, active in zip(t.step, t.active, strict=True) if active]
            off = [x for x, active in zip(t.step, t.active, strict=True) if not active]
            hooks = [x for x, active in zip(t.hooks, t.active, strict=True) if active]
            low, high = bootstrap_median_ci(t.pair_ratios)
            row[variant] = {
                "step_with_ms": 1e3 * median(on),
                "step_without_ms": 1e3 * median(off),
                "hooks_ms": 1e3 * median(hooks),
                "update_ms": 1e3 * median(t.update),
                "step_overhead": median(t.pair_ratios) - 1,
                "step_overhead_ci": (low - 1, high - 1),
                "first_step_hooks_s": median(t.first_hooks),
                "persistent_bytes": t.persistent,
                "transient_bytes": max(t.transient, default=0),
            }
        for variant in per_variant:
            v = row[variant]
            v["hooks_over_step"] = v["hooks_ms"] / v["step_without_ms"]
            v["hooks_over_update"] = v["hooks_ms"] / v["update_ms"]
            v["hooks_over_naive"] = v["hooks_ms"] / row["naive"]["hooks_ms"] if "naive" in row else float("nan")
        summary[case] = row
    return summary


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _check(value: float, limit: float, applies: bool) -> str:
    """A ratio, with a verdict where the issue sets a target for this case."""
    text = f"{value:.2f}"
    return f"{text} {'✓' if value <= limit else '✗'}" if applies else text


def _overhead(v: dict[str, Any]) -> str:
    low, high = v["step_overhead_ci"]
    return f"{100 * v['step_overhead']:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"


def _variants(row: dict[str, Any], variants: tuple[str, ...]) -> list[str]:
    """The variants of ``variants`` a case was measured with (``--variants`` may leave some out)."""
    return [v for v in variants if v in row]


def report(summary: dict[str, dict[str, Any]], command: str, device: str, wall: float, args: Any) -> str:
    budget = default_chunk_bytes(args.device)
    lines = [
        "# Overhead: XGradCallback per training step",
        "",
        f"Command: `{command}`  ",
        f"Machine: {device}, torch {torch.__version__}, Lightning {pl.__version__}, Python "
        f"{platform.python_version()}, precision {args.precision}; {args.runs} interleaved runs per variant, "
        f"{args.steps} measured steps each after {args.warmup} warm-up steps; wall time {wall / 60:.1f} min.",
        "",
        "In every run the measured callback acts on even steps only, so each step with it is paired with the next "
        "step without it in the same run. Medians over all measured steps of all runs:",
        "",
        "- *step without / with*: the whole training step without and with the callback;",
        "- *hooks*: the time inside the callback's hooks in a step (predict + restore);",
        "- *update*: the optimizer's own `step` (foreach or fused), from `on_before_optimizer_step` to its post-hook;",
        "- *step overhead*: median over pairs of (step with / step without) - 1, with a 95% bootstrap interval;",
        "- *hooks / step*: hooks over the step without, the callback's own share of the step;",
        "- *first predicted step*: the hooks' time at the first step with optimizer state (includes compiling);",
        "- *held*: bytes the callback keeps between steps; *transient*: peak of what its hooks allocate.",
        "",
        "| case | variant | step without ms | step with ms | hooks ms | update ms | step overhead | hooks / step | "
        "first predicted step | held | transient |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, row in summary.items():
        for variant in _variants(row, VARIANTS):
            v = row[variant]
            lines.append(
                f"| {case} | {variant} | {v['step_without_ms']:.2f} | {v['step_with_ms']:.2f} | {v['hooks_ms']:.3f} | "
                f"{v['update_ms']:.3f} | {_overhead(v)} | {100 * v['hooks_over_step']:.1f}% | "
                f"{v['first_step_hooks_s']:.2f} s | {_mib(v['persistent_bytes'])} | {_mib(v['transient_bytes'])} |"
            )
    lines += [
        "",
        "## Targets",
        "",
        "✓/✗ where the target applies: hooks / update and hooks / naive on the optimizer-bound mlp, step overhead on "
        "the compute-bound cnn, memory everywhere. hooks / update: ≤ "
        f"{HOOKS_OVER_UPDATE_TARGETS['adamw', 'xgrad']:g} for AdamW eager, "
        f"≤ {HOOKS_OVER_UPDATE_TARGETS['adamw', 'xgrad-compiled']:g} with `compile=True`, "
        f"≤ {HOOKS_OVER_UPDATE_TARGETS['sgd', 'xgrad']:g} for SGD momentum (its pass-count floor is 0.75-0.9). "
        f"*budget*: the callback's default `chunk_bytes` on {args.device}, "
        f"{_mib(budget)}: its temporaries are chunked to at most max(largest tensor, budget).",
        "",
        "| case | variant | tensors | params | largest tensor | hooks / update | hooks / naive (≤ 0.5) | "
        f"step overhead (≤ {100 * STEP_OVERHEAD_TARGET:g}%) | held / params (≤ 1.0) | "
        "transient / max(largest, budget) (≤ 1.0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, row in summary.items():
        optimizer_bound = case.startswith("mlp")
        for variant in _variants(row, XGRAD_VARIANTS):
            v = row[variant]
            overhead = _overhead(v)
            if not optimizer_bound:
                overhead += " ✓" if v["step_overhead"] <= STEP_OVERHEAD_TARGET else " ✗"
            target = HOOKS_OVER_UPDATE_TARGETS.get((case.split("-", 1)[1].split("_")[0], variant), 0.5)
            limit = f" (≤ {target:g})" if optimizer_bound else ""
            lines.append(
                f"| {case} | {variant} | {row['tensors']} | {_mib(row['param_bytes'])} | "
                f"{_mib(row['largest_bytes'])} | {_check(v['hooks_over_update'], target, optimizer_bound)}{limit} | "
                f"{_check(v['hooks_over_naive'], 0.5, optimizer_bound)} | {overhead} | "
                f"{_check(v['persistent_bytes'] / row['param_bytes'], 1.0, True)} | "
                f"{_check(v['transient_bytes'] / max(row['largest_bytes'], budget), 1.0, True)} |"
            )
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Per case: left, the optimizer's update next to XGrad's hooks and the naive hooks, in ms per step; right, the
    whole-step overhead of each variant (median over pairs of neighbouring steps) with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(summary)
    variants = [v for v in VARIANTS if all(v in summary[c] for c in cases)]
    labels = {"xgrad": "XGradCallback", "xgrad-compiled": "XGradCallback(compile=True)", "naive": "naive XGrad"}
    bars = {"optimizer update": [summary[c][variants[0]]["update_ms"] for c in cases]}
    bars.update({f"{labels[v]} hooks": [summary[c][v]["hooks_ms"] for c in cases] for v in variants})
    overhead_labels = {v: labels[v] for v in variants}
    fig, (left, right) = plt.subplots(1, 2, figsize=(4.0 + 3.8 * len(cases), 4.0))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        left.bar([x + i * width for x in range(len(cases))], values, width, label=label)
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases)
    left.set_ylabel("ms per step (median)")
    left.set_title("time inside the hooks vs the optimizer's update", fontsize=10)
    left.legend(fontsize=7)
    width = 0.8 / len(overhead_labels)
    for i, (variant, label) in enumerate(overhead_labels.items()):
        values = [100 * summary[c][variant]["step_overhead"] for c in cases]
        low = [100 * summary[c][variant]["step_overhead_ci"][0] for c in cases]
        high = [100 * summary[c][variant]["step_overhead_ci"][1] for c in cases]
        errors = [
            [v - lo for v, lo in zip(values, low, strict=True)],
            [h - v for v, h in zip(values, high, strict=True)],
        ]
        right.bar([x + i * width for x in range(len(cases))], values, width, yerr=errors, capsize=3, label=label)
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_ylabel("whole-step overhead, % (median)")
    right.set_title("whole training step, with vs without (bars: 95% interval)", fontsize=10)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    cases = [f"{m}-{o}" for m in MODELS for o in OPTIMIZERS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=MEASUREMENTS, help="run one measurement: the Trainer steps or the calls (default: both)"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[f"{m}-{o}" for m in MODELS for o in OPTIMIZER_CHOICES],
        default=cases,
        help="model-optimizer pairs of the step timing (default: %(default)s)",
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="(default: all)")
    parser.add_argument("--precision", default="32-true", help="the Trainer's precision (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=8, help="interleaved runs per variant (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="measured steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=6, help="unmeasured steps per run (default: %(default)s)")
    parser.add_argument(
        "--calls-sizes",
        type=int,
        nargs="+",
        default=list(CALL_SIZES),
        help="tensor counts of the calls measurement, multiples of 4 (default: %(default)s)",
    )
    parser.add_argument(
        "--calls-rules", nargs="+", metavar="RULE", help="rule families of the calls measurement (default: all)"
    )
    parser.add_argument(
        "--calls-repeats", type=int, default=10, help="timed predict() + restore() per case (default: %(default)s)"
    )
    parser.add_argument(
        "--calls-unused-tensors",
        type=int,
        default=UNUSED_TENSORS,
        help="used tensors next to the unused module, a multiple of 4 (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-bytes",
        type=int,
        help="the predictor's chunk_bytes in the calls measurement (default: the package's default budget)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="output folder (default: a new folder under benchmarks/runs/)")
    parser.add_argument(
        "--publish", action="store_true", help="also write the results to benchmarks/results/ (the published ones)"
    )
    parser.add_argument("--name", default="overhead", help="file name stem of the outputs")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plot from a results JSON")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else RUNS / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    targets = [out, RESULTS] if args.publish else [out]
    if args.replot is not None:
        summary = json.loads(args.replot.read_text()).get("summary")
        if summary is None:
            parser.error(f"{args.replot} holds no step timing to plot (a --only calls run)")
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            plot(summary, folder / f"{args.name}.png")
        print("wrote " + ", ".join(str(folder / f"{args.name}.png") for folder in targets))
        return
    steps = args.only in (None, "steps")
    calls = args.only in (None, "calls")
    if args.publish and args.only is not None and args.name == "overhead":
        parser.error(
            f"--publish with --only {args.only} would replace the published overhead.md, which holds both "
            "measurements: publish a full run, or give the files another --name (e.g. --name calls)"
        )
    if steps and (args.runs < 1 or args.steps < 2 or args.warmup < 4):
        parser.error(
            "--runs must be >= 1, --steps >= 2 (steps alternate) and --warmup >= 4 (the first prediction, at step 2, "
            "allocates the snapshot: memory is measured after it)"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    families = list(rule_families(torch.device(args.device)))
    rules = args.calls_rules or families
    if calls:
        unknown = sorted(set(rules) - set(families))
        if unknown:
            parser.error(f"--calls-rules: unknown {unknown}; on {args.device} the families are {families}")
        if any(size < 4 or size % 4 for size in [*args.calls_sizes, args.calls_unused_tensors]):
            parser.error("--calls-sizes and --calls-unused-tensors must be positive multiples of 4 (4 tensors a block)")
        if args.calls_repeats < 1:
            parser.error("--calls-repeats must be >= 1")
        if args.chunk_bytes is not None and args.chunk_bytes < 0:
            parser.error(f"--chunk-bytes must be >= 0, got {args.chunk_bytes}")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*max_steps.*")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the CPU memory measurement uses the profiler: keep it quiet

    command = "python benchmarks/overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    )
    data: dict[str, Any] = {"command": command, "device": device, "torch": torch.__version__}
    sections: list[str] = []
    if steps:
        results = {case: {variant: StepTimes() for variant in args.variants} for case in args.cases}
        plan = [(case, variant) for _ in range(args.runs) for case in args.cases for variant in args.variants]
        start = time.perf_counter()
        for case, variant in tqdm(plan, desc="runs", unit="run"):
            model, optimizer = case.split("-")
            run_once(model, optimizer, variant, args, results[case][variant])
        wall = time.perf_counter() - start
        data["summary"] = summarize(results)
        data["raw"] = {case: {v: vars(t) for v, t in per.items()} for case, per in results.items()}
        data["precision"] = args.precision
        sections.append(report(data["summary"], command, device, wall, args))
    if calls:
        data["calls"] = measure_calls(
            rules,
            args.calls_sizes,
            args.calls_repeats,
            torch.device(args.device),
            args.calls_unused_tensors,
            args.chunk_bytes,
        )
        sections.append(calls_report(data["calls"], command, device))
    markdown = "\n\n".join(sections)
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.name}.json").write_text(json.dumps(data, indent=1))
        (folder / f"{args.name}.md").write_text(markdown + "\n")
        if steps:
            plot(data["summary"], folder / f"{args.name}.png")
    print(markdown)
    written = ".md, .png and .json" if steps else ".md and .json"
    print("\nwrote " + ", ".join(f"{folder / args.name}{written}" for folder in targets))


if __name__ == "__main__":
    main()
