"""The results as markdown tables with their targets, and the files a run writes (``NAME.md``, ``NAME.json``,
``NAME.png``, ``NAME-compile.png``). The JSON holds ``command``, ``device``, ``torch``; with the step timing ``summary``
(what the tables and the plot show), ``raw`` (every recorded value) and ``precision``; with the calls measurement
``calls``; with the compile sizes ``compile_sizes``."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_xgrad._internal.chunks import default_chunk_bytes
from lightning_xgrad.rules.compiled import DEFAULT_COMPILE_MIN_BYTES

from .calls import CALL_WARMUP_STEPS
from .models import has_compiled_kernel
from .plot import plot, plot_compile_sizes
from .steps import VARIANTS, XGRAD_VARIANTS

#: targets for the hooks' time over the optimizer's own update on the optimizer-bound mlp, by (optimizer, variant):
#: near the passes over the parameters that an in-place, bit-exact prediction needs against the update's own
HOOKS_OVER_UPDATE_TARGETS = {("adamw", "xgrad"): 0.6, ("adamw", "xgrad-compiled"): 0.4}
HOOKS_OVER_UPDATE_TARGETS |= {("sgd", "xgrad"): 0.9, ("sgd", "xgrad-compiled"): 0.9}
#: ``compile=True`` must never be slower than eager: the compiled hooks over the eager hooks, where a rule is compiled
COMPILED_OVER_EAGER_TARGET = 1.0
#: the hooks over the naive XGrad's hooks, on the optimizer-bound mlp
HOOKS_OVER_NAIVE_TARGET = 0.5
#: the whole-step overhead target on the compute-bound cnn
STEP_OVERHEAD_TARGET = 0.01
#: ATen calls (and CUDA launches) per predict() + restore() may grow at most this much from the smallest model to
#: the largest: the calls follow the parameters' bytes over the chunk budget, not the number of tensors
CALL_GROWTH_TARGET = 2.0


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _kib(n: float) -> str:
    return f"{n / 2**10:.1f} KiB"


def _check(value: float, limit: float, applies: bool) -> str:
    """A ratio, with a verdict where a target applies to this case."""
    text = f"{value:.2f}"
    return f"{text} {'✓' if value <= limit else '✗'}" if applies else text


def _overhead(v: dict[str, Any]) -> str:
    low, high = v["step_overhead_ci"]
    return f"{100 * v['step_overhead']:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"


def _variants(row: dict[str, Any], variants: tuple[str, ...]) -> list[str]:
    """The variants of ``variants`` a case was measured with (``--variants`` may leave some out)."""
    return [v for v in variants if v in row]


def steps_report(summary: dict[str, dict[str, Any]], command: str, device: str, wall: float, args: Any) -> str:
    """The step timing as markdown: the measured times and memory per case and variant, then the targets."""
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
        f"compiled / eager: the hooks with `compile=True` over the eager hooks, ≤ {COMPILED_OVER_EAGER_TARGET:g} "
        "where `compile=True` compiles; the momentum rules have no kernel and parameters under the default "
        f"`compile_min_bytes` ({_mib(DEFAULT_COMPILE_MIN_BYTES)}) are predicted eagerly, so there the ratio compares "
        "two eager runs. "
        f"*budget*: the callback's default `chunk_bytes` on {args.device}, "
        f"{_mib(budget)}: its temporaries are chunked to at most max(largest tensor, budget).",
        "",
        f"| case | variant | tensors | params | largest tensor | hooks / update | hooks / naive "
        f"(≤ {HOOKS_OVER_NAIVE_TARGET:g}) | step overhead (≤ {100 * STEP_OVERHEAD_TARGET:g}%) | held / params (≤ 1.0) "
        "| transient / max(largest, budget) (≤ 1.0) | compiled / eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
                f"{_check(v['hooks_over_naive'], HOOKS_OVER_NAIVE_TARGET, optimizer_bound)} | {overhead} | "
                f"{_check(v['persistent_bytes'] / row['param_bytes'], 1.0, True)} | "
                f"{_check(v['transient_bytes'] / max(row['largest_bytes'], budget), 1.0, True)} | "
                f"{_compiled_over_eager(case, variant, row)} |"
            )
    return "\n".join(lines)


def _compiled_over_eager(case: str, variant: str, row: dict[str, Any]) -> str:
    """The compiled hooks over the eager hooks of the same case, checked where ``compile=True`` compiles it."""
    if variant != "xgrad-compiled" or "xgrad" not in row:
        return ""
    ratio = row[variant]["hooks_ms"] / row["xgrad"]["hooks_ms"]
    optimizer = case.split("-", 1)[1]
    if not has_compiled_kernel(optimizer):
        return f"{ratio:.2f} (eager: no kernel)"
    if row["param_bytes"] < DEFAULT_COMPILE_MIN_BYTES:
        return f"{ratio:.2f} (eager: under compile_min_bytes)"
    return _check(ratio, COMPILED_OVER_EAGER_TARGET, True)


def compile_report(sizes: dict[str, Any], command: str, device: str) -> str:
    """The compile-sizes measurement as markdown: eager and compiled hooks per bucket, and where the default
    threshold puts each bucket."""
    threshold = sizes["default_min_bytes"]
    lines = [
        "# Where `compile=True` pays off",
        "",
        f"Command: `{command}`  ",
        f"Machine: {device}, torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "`OptimizerPredictor` predict() + restore() for AdamW (foreach) over one bucket of n float32 tensors, eager "
        "and with the compiled kernel forced (`compile=True, compile_min_bytes=0`), with a forward and backward of "
        "the step timing's cnn between them, as a training step runs between the callback's hooks. The variants "
        f"alternate, {sizes['rounds']} rounds of {sizes['repeats']} each; medians. *default*: what `compile=True` "
        f"does with the default `compile_min_bytes` ({_mib(threshold)}): buckets under it are predicted eagerly, so "
        f"compiled / eager ≤ {COMPILED_OVER_EAGER_TARGET:g} is the target for the buckets at or over it.",
        "",
        "| tensors | elements each | bucket | eager ms | compiled ms | compiled / eager | default |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sizes["rows"]:
        compiled = row["bytes"] >= threshold
        lines.append(
            f"| {row['tensors']} | {row['elements']} | {_mib(row['bytes'])} | {row['eager_ms']:.3f} | "
            f"{row['compiled_ms']:.3f} | {_check(row['compiled_over_eager'], COMPILED_OVER_EAGER_TARGET, compiled)} | "
            f"{'compiled' if compiled else 'eager'} |"
        )
    return "\n".join(lines)


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


def plots(data: dict[str, Any], folder: Path, name: str) -> list[Path]:
    """The figures of what ``data`` holds, drawn into ``folder``: ``NAME.png`` for a step timing,
    ``NAME-compile.png`` for the compile sizes."""
    drawn = []
    if "summary" in data:
        drawn.append(folder / f"{name}.png")
        plot(data["summary"], drawn[-1])
    if "compile_sizes" in data:
        drawn.append(folder / f"{name}-compile.png")
        plot_compile_sizes(data["compile_sizes"], drawn[-1])
    return drawn


def write(folders: list[Path], name: str, data: dict[str, Any], markdown: str) -> list[str]:
    """``NAME.json``, ``NAME.md`` and the figures (:func:`plots`) into each folder. Returns what was written."""
    written = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(data, indent=1))
        (folder / f"{name}.md").write_text(markdown + "\n")
        written += [str(folder / f"{name}.md"), str(folder / f"{name}.json")]
        written += [str(path) for path in plots(data, folder, name)]
    return written
