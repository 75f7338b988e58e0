"""Overhead benchmark: what XGradCallback costs per step, against the optimizer's own update and a naive XGrad.

Two models, each with AdamW and SGD momentum (both ``foreach=True``), trained by a real ``Trainer`` on synthetic
batches in one process, variants interleaved run by run:

- ``mlp``: optimizer-bound, 50 blocks of Linear(256, 256) + LayerNorm(256) at batch 4 (200 tensors, 3.3 M params);
- ``cnn``: compute-bound, a small CNN on 3x32x32 images at batch 64.

Variants: ``baseline`` (no callback), ``xgrad`` (XGradCallback), ``xgrad-compiled`` (``XGradCallback(compile=True)``:
snapshot and prediction in one compiled pass), ``naive`` (the official code's way: per parameter, a clone and one
in-place update, in a Python loop; restored by per-parameter copies). Per step it records the time
inside the XGrad hooks (predict + restore), the optimizer's own update (from ``on_before_optimizer_step`` to the
step's post-hook) and the whole step (``on_train_batch_start`` to ``on_train_batch_end``). Memory: bytes the
callback holds between steps, and the peak of the temporaries it allocates inside its hooks (CUDA:
``max_memory_allocated``; CPU: the profiler's allocation events). Medians over steps and
runs go to ``benchmarks/results/overhead.{md,json,png}``.

    python benchmarks/overhead.py                              # the committed run
    python benchmarks/overhead.py --runs 2 --steps 20 --cases mlp-adamw
"""

from __future__ import annotations

import argparse
import json
import platform
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
VARIANTS = ("baseline", "xgrad", "xgrad-compiled", "naive")
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


class Probe(Callback):
    """Times one run. Put ``first`` before the XGrad callback and ``last`` after it in the callback list."""

    def __init__(self, times: StepTimes, warmup: int, device: torch.device, memory_step: int) -> None:
        self.times = times
        self.warmup = warmup
        self.device = device
        self.memory_step = memory_step
        self._hook_time = 0.0
        self._step_start = 0.0
        self._update_start = 0.0
        self._handle: Any = None

    # the probe that comes first
    def first(self) -> Callback:
        probe = self

        class First(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                _sync(probe.device)
                probe._hook_time = 0.0
                probe._step_start = time.perf_counter()

        return First()

    def measuring(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step >= self.warmup

    def wrap(self, callback: Callback, hooks: tuple[str, ...]) -> None:
        """Time ``callback``'s hooks (their sum per step is the XGrad cost); one step also tracks their memory."""
        for name in hooks:
            original = getattr(callback, name)

            def timed(trainer: pl.Trainer, *args: Any, _original: Callable[..., Any] = original) -> Any:
                _sync(self.device)
                start = time.perf_counter()
                if trainer.global_step == self.memory_step:
                    with transient_bytes(self.device, self.times.transient.append):
                        result = _original(trainer, *args)
                else:
                    result = _original(trainer, *args)
                _sync(self.device)
                self._hook_time += time.perf_counter() - start
                return result

            setattr(callback, name, timed)

    # the probe that comes last
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
        if trainer.global_step == 2:  # the first step with optimizer state to predict from
            self.times.first_hooks.append(self._hook_time)
        if trainer.global_step - 1 >= self.warmup:  # global_step already counts this step
            self.times.step.append(time.perf_counter() - self._step_start)
            self.times.hooks.append(self._hook_time)
            self.times.update.append(self._update_time)

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
    probe = Probe(times, args.warmup, torch.device(args.device), memory_step=args.warmup)
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


def summarize(results: dict[str, dict[str, StepTimes]]) -> dict[str, dict[str, Any]]:
    """Medians and ratios per case."""
    summary: dict[str, dict[str, Any]] = {}
    for case, per_variant in results.items():
        model = case.split("-")[0]
        count, param_bytes, largest = param_stats(model)
        row: dict[str, Any] = {"tensors": count, "param_bytes": param_bytes, "largest_bytes": largest}
        for variant, t in per_variant.items():
            row[variant] = {
                "step_ms": 1e3 * median(t.step),
                "hooks_ms": 1e3 * median(t.hooks),
                "update_ms": 1e3 * median(t.update),
                "persistent_bytes": t.persistent,
                "transient_bytes": max(t.transient, default=0),
            }
        base, naive = row["baseline"], row["naive"]
        for variant in (*XGRAD_VARIANTS, "naive"):
            v = row[variant]
            v["step_overhead"] = v["step_ms"] / base["step_ms"] - 1
            v["hooks_over_update"] = v["hooks_ms"] / v["update_ms"]
            v["hooks_over_naive"] = v["hooks_ms"] / naive["hooks_ms"]
            v["first_step_hooks_s"] = median(per_variant[variant].first_hooks)
        summary[case] = row
    return summary


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _check(value: float, limit: float, applies: bool) -> str:
    """A ratio, with a verdict where the issue sets a target for this case."""
    text = f"{value:.2f}"
    return f"{text} {'✓' if value <= limit else '✗'}" if applies else text


def report(summary: dict[str, dict[str, Any]], command: str, device: str, wall: float, args: Any) -> str:
    lines = [
        "# Overhead: XGradCallback per training step",
        "",
        f"Command: `{command}`  ",
        f"Machine: {device}, torch {torch.__version__}, Lightning {pl.__version__}, Python "
        f"{platform.python_version()}; {args.runs} interleaved runs x {args.steps} measured steps (after "
        f"{args.warmup} warm-up steps) per variant; wall time {wall / 60:.1f} min.  ",
        "Medians over all measured steps of all runs. *hooks*: time inside the XGrad hooks per step (predict + "
        "restore); *update*: the optimizer's own `step` (foreach); *step*: the whole training step; *first "
        "predicted step*: the hooks' time at the first step with optimizer state (includes compiling).",
        "",
        "| case | variant | step ms | hooks ms | update ms | step overhead | first predicted step | "
        "held between steps | transient peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, row in summary.items():
        for variant in VARIANTS:
            v = row[variant]
            if variant == "baseline":
                lines.append(f"| {case} | {variant} | {v['step_ms']:.2f} |  | {v['update_ms']:.3f} |  |  |  |  |")
                continue
            lines.append(
                f"| {case} | {variant} | {v['step_ms']:.2f} | {v['hooks_ms']:.3f} | {v['update_ms']:.3f} | "
                f"{100 * v['step_overhead']:+.1f}% | {v['first_step_hooks_s']:.2f} s | "
                f"{_mib(v['persistent_bytes'])} | {_mib(v['transient_bytes'])} |"
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
            overhead = f"{100 * v['step_overhead']:+.1f}%"
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
    """Per case: the optimizer's update next to XGrad's hooks and the naive hooks, in ms per step."""
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
    fig, ax = plt.subplots(figsize=(2.0 + 1.9 * len(cases), 3.6))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        ax.bar([x + i * width for x in range(len(cases))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases)
    ax.set_ylabel("ms per step (median)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    cases = [f"{m}-{o}" for m in MODELS for o in OPTIMIZERS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=cases, default=cases)
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs per variant (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps per run (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="overhead", help="file name stem of the outputs")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.steps < 1 or args.warmup < 2:
        parser.error("--runs and --steps must be >= 1 and --warmup >= 2 (XGrad needs optimizer state)")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*max_steps.*")

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
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {case: {v: vars(t) for v, t in per.items()} for case, per in results.items()}
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"command": command, "device": device, "summary": summary, "raw": raw}, indent=1)
    )
    markdown = report(summary, command, device, wall, args)
    (args.out / f"{args.name}.md").write_text(markdown + "\n")
    plot(summary, args.out / f"{args.name}.png")
    print(markdown)
    print(f"\nwrote {args.out / args.name}.md, .png and .json")


if __name__ == "__main__":
    main()
