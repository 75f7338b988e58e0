"""The step timing: XGradCallback, XGradCallback(compile=True) and the naive XGrad inside a real ``Trainer``.

In every run the measured callback acts on even steps only, and each step with it is compared with the next step
without it in the same run, which cancels most of a shared machine's drift and noise. Per step: the time inside the
callback's hooks (predict + restore), the optimizer's own update (``on_before_optimizer_step`` to the step's
post-hook) and the whole step (``on_train_batch_start`` to ``on_train_batch_end``); per run: the bytes the callback
holds between steps and the peak of the temporaries its hooks allocate.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lightning_xgrad import XGradCallback

from .measure import freed_bytes, median, sync, transient_bytes
from .models import Classifier, NaiveXGrad, Synthetic, param_stats

VARIANTS = ("xgrad", "xgrad-compiled", "naive")
XGRAD_VARIANTS = ("xgrad", "xgrad-compiled")


@dataclass
class StepTimes:
    hooks: list[float] = field(default_factory=list)
    update: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    transient: list[int] = field(default_factory=list)
    #: bytes XGradCallback frees at teardown: what it held between steps (0 for the naive XGrad, which holds none)
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
    next step without it in the same run. Its hooks are timed (the sum per step is the XGrad cost), and one step also
    records their transient memory.
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
                sync(probe.device)
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
                sync(self.device)
                start = time.perf_counter()
                if self._start_step == self.memory_step:
                    with transient_bytes(self.device, self.times.transient.append):
                        result = _original(trainer, *args)
                else:
                    result = _original(trainer, *args)
                sync(self.device)
                self._hook_time += time.perf_counter() - start
                return result

            setattr(callback, name, timed)

    def held(self, callback: Callback) -> None:
        """Record what ``callback`` frees at teardown (after the last step, untimed): what it held between steps."""
        original = callback.teardown

        def teardown(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            self.times.persistent = freed_bytes(lambda: original(trainer, pl_module, stage))

        callback.teardown = teardown  # type: ignore[method-assign]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handle = trainer.optimizers[0].register_step_post_hook(self._after_update)

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        sync(self.device)
        self._update_start = time.perf_counter()

    def _after_update(self, *args: Any) -> None:
        sync(self.device)
        self._update_time = time.perf_counter() - self._update_start

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        sync(self.device)
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
        self._handle.remove()


def run_once(model: str, optimizer: str, variant: str, args: argparse.Namespace, times: StepTimes) -> None:
    """One ``Trainer.fit`` of ``args.warmup + args.steps`` steps with ``variant``, recorded into ``times``."""
    pl.seed_everything(0, verbose=False)
    module = Classifier(model, optimizer)
    batch_size = 4 if model == "mlp" else 64
    data = DataLoader(Synthetic(model, args.warmup + args.steps, batch_size), batch_size=None, shuffle=False)
    probe = Probe(times, args.warmup, torch.device(args.device))
    callbacks: list[Callback] = [probe.first()]
    if variant in XGRAD_VARIANTS:
        xgrad = XGradCallback(steps=1, compile=variant == "xgrad-compiled")
        probe.wrap(xgrad, ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"))
        probe.held(xgrad)
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


def run_steps(args: argparse.Namespace) -> tuple[dict[str, dict[str, StepTimes]], float]:
    """``args.runs`` runs of every case and variant, interleaved; the times per case and variant, and the wall time."""
    results = {case: {variant: StepTimes() for variant in args.variants} for case in args.cases}
    plan = [(case, variant) for _ in range(args.runs) for case in args.cases for variant in args.variants]
    start = time.perf_counter()
    for case, variant in tqdm(plan, desc="runs", unit="run"):
        model, optimizer = case.split("-")
        run_once(model, optimizer, variant, args, results[case][variant])
    return results, time.perf_counter() - start


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


def raw(results: dict[str, dict[str, StepTimes]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every recorded value per case and variant, for the JSON."""
    return {case: {variant: vars(t) for variant, t in per.items()} for case, per in results.items()}
