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

    python benchmarks/overhead.py --publish                    # the published run
    python benchmarks/overhead.py --runs 2 --steps 20 --cases mlp-adamw
    python benchmarks/overhead.py --replot benchmarks/results/overhead.json --publish  # redraw the plot only
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
from collections.abc import Callable, Iterator
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "benchmarks" / "runs"
VARIANTS = ("xgrad", "xgrad-compiled", "naive")
XGRAD_VARIANTS = ("xgrad", "xgrad-compiled")
OPTIMIZERS = ("adamw", "sgd")
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
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)
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
        for variant in VARIANTS:
            v = row[variant]
            v["hooks_over_step"] = v["hooks_ms"] / v["step_without_ms"]
            v["hooks_over_update"] = v["hooks_ms"] / v["update_ms"]
            v["hooks_over_naive"] = v["hooks_ms"] / row["naive"]["hooks_ms"]
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


def report(summary: dict[str, dict[str, Any]], command: str, device: str, wall: float, args: Any) -> str:
    lines = [
        "# Overhead: XGradCallback per training step",
        "",
        f"Command: `{command}`  ",
        f"Machine: {device}, torch {torch.__version__}, Lightning {pl.__version__}, Python "
        f"{platform.python_version()}; {args.runs} interleaved runs per variant, {args.steps} measured steps each "
        f"after {args.warmup} warm-up steps; wall time {wall / 60:.1f} min.",
        "",
        "In every run the measured callback acts on even steps only, so each step with it is paired with the next "
        "step without it in the same run. Medians over all measured steps of all runs:",
        "",
        "- *step without / with*: the whole training step without and with the callback;",
        "- *hooks*: the time inside the callback's hooks in a step (predict + restore);",
        "- *update*: the optimizer's own `step` (foreach), from `on_before_optimizer_step` to its post-hook;",
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
        for variant in VARIANTS:
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
        "the compute-bound cnn, memory everywhere.",
        "",
        "| case | variant | tensors | params | largest tensor | hooks / update (≤ 0.5) | hooks / naive (≤ 0.5) | "
        "step overhead (≤ 2%) | held / params (≤ 1.0) | transient / largest (≤ 1.0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, row in summary.items():
        optimizer_bound = case.startswith("mlp")
        for variant in XGRAD_VARIANTS:
            v = row[variant]
            overhead = _overhead(v)
            if not optimizer_bound:
                overhead += " ✓" if v["step_overhead"] <= 0.02 else " ✗"
            lines.append(
                f"| {case} | {variant} | {row['tensors']} | {_mib(row['param_bytes'])} | "
                f"{_mib(row['largest_bytes'])} | {_check(v['hooks_over_update'], 0.5, optimizer_bound)} | "
                f"{_check(v['hooks_over_naive'], 0.5, optimizer_bound)} | {overhead} | "
                f"{_check(v['persistent_bytes'] / row['param_bytes'], 1.0, True)} | "
                f"{_check(v['transient_bytes'] / row['largest_bytes'], 1.0, True)} |"
            )
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Per case: left, the optimizer's update next to XGrad's hooks and the naive hooks, in ms per step; right, the
    whole-step overhead of each variant (median over pairs of neighbouring steps) with its 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(summary)
    bars = {
        "optimizer update (foreach)": [summary[c]["xgrad"]["update_ms"] for c in cases],
        "XGradCallback hooks": [summary[c]["xgrad"]["hooks_ms"] for c in cases],
        "XGradCallback(compile=True) hooks": [summary[c]["xgrad-compiled"]["hooks_ms"] for c in cases],
        "naive XGrad hooks": [summary[c]["naive"]["hooks_ms"] for c in cases],
    }
    overhead_labels = {"xgrad": "XGradCallback", "xgrad-compiled": "XGradCallback(compile=True)", "naive": "naive"}
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
    parser.add_argument("--cases", nargs="+", choices=cases, default=cases)
    parser.add_argument("--runs", type=int, default=8, help="interleaved runs per variant (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="measured steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=6, help="unmeasured steps per run (default: %(default)s)")
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
        summary = json.loads(args.replot.read_text())["summary"]
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            plot(summary, folder / f"{args.name}.png")
        print("wrote " + ", ".join(str(folder / f"{args.name}.png") for folder in targets))
        return
    if args.runs < 1 or args.steps < 2 or args.warmup < 4:
        parser.error(
            "--runs must be >= 1, --steps >= 2 (steps alternate) and --warmup >= 4 (the first prediction, at step 2, "
            "allocates the snapshot: memory is measured after it)"
        )
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*max_steps.*")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the CPU memory measurement uses the profiler: keep it quiet

    command = "python benchmarks/overhead.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"
    )
    results = {case: {variant: StepTimes() for variant in VARIANTS} for case in args.cases}
    plan = [(case, variant) for _ in range(args.runs) for case in args.cases for variant in VARIANTS]
    start = time.perf_counter()
    for case, variant in tqdm(plan, desc="runs", unit="run"):
        model, optimizer = case.split("-")
        run_once(model, optimizer, variant, args, results[case][variant])
    wall = time.perf_counter() - start

    summary = summarize(results)
    raw = {case: {v: vars(t) for v, t in per.items()} for case, per in results.items()}
    markdown = report(summary, command, device, wall, args)
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.name}.json").write_text(
            json.dumps({"command": command, "device": device, "summary": summary, "raw": raw}, indent=1)
        )
        (folder / f"{args.name}.md").write_text(markdown + "\n")
        plot(summary, folder / f"{args.name}.png")
    print(markdown)
    print("\nwrote " + ", ".join(f"{folder / args.name}.md, .png and .json" for folder in targets))


if __name__ == "__main__":
    main()
