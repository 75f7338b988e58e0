"""Convergence benchmark: baseline vs XGrad (s in a list) on every example task, over seeds, through LightningCLI.

Each run is what a user types: ``examples/<task>.py fit --config examples/configs/<task>.yaml``, plus
``--trainer.callbacks+=lightning_xgrad.XGradCallback --trainer.callbacks.steps=s`` for XGrad, with the seed set on
``seed_everything`` and on the data and model where they take one. Validation metrics are recorded after every
validation epoch. Writes, under ``--out`` (default benchmarks/results):

- ``convergence.md``: per task, mean ± std over seeds of the final metrics, the paired delta against the baseline,
  how many seeds improved, and the best s;
- ``convergence.png``: validation curves of each task's primary metric (mean over seeds, band = min..max);
- ``convergence.json``: every curve, to re-plot or re-tabulate without re-running.

    python benchmarks/convergence.py                           # every task, s = 1 2, 3 seeds
    python benchmarks/convergence.py --sweep                   # "which s?": s = 0 1 2 3, best per task
    python benchmarks/convergence.py --tasks digits_sgd --seeds 2 --steps 1
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@dataclass(frozen=True)
class Task:
    """One example program and config; ``metrics[0]`` is the primary metric."""

    example: str
    model: str
    data: str
    config: str
    metrics: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    #: the example's LightningCLI subclass (argument links), or LightningCLI itself
    cli: str | None = None


TASKS: dict[str, Task] = {
    "digits_sgd": Task(
        "digits", "DigitsClassifier", "DigitsDataModule", "digits_sgd.yaml", ("val_loss", "val_acc"), (False, True)
    ),
    "digits_adamw": Task(
        "digits", "DigitsClassifier", "DigitsDataModule", "digits_adamw.yaml", ("val_loss", "val_acc"), (False, True)
    ),
    "char_gpt": Task(
        "char_gpt",
        "CharGPT",
        "CharTextDataModule",
        "char_gpt.yaml",
        ("val_loss", "val_ppl"),
        (False, False),
        cli="CharGPTCLI",
    ),
    "digits_gan": Task(
        "digits_gan", "DigitsGAN", "DigitsGANData", "digits_gan.yaml", ("val_fd", "val_is"), (False, True)
    ),
    # the companion methods: the baseline row is the method alone, the XGrad rows the method with XGrad
    "digits_cprop": Task(
        "digits", "DigitsClassifier", "DigitsDataModule", "digits_cprop.yaml", ("val_loss", "val_acc"), (False, True)
    ),
    "digits_ahb": Task(
        "digits", "DigitsClassifier", "DigitsDataModule", "digits_ahb.yaml", ("val_loss", "val_acc"), (False, True)
    ),
}


class CurveRecorder(Callback):
    """The task's metrics after every validation epoch (not the sanity check)."""

    def __init__(self, metrics: tuple[str, ...]) -> None:
        self.metrics = metrics
        self.curve: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {m: float(trainer.callback_metrics[m]) for m in self.metrics if m in trainer.callback_metrics}
        self.curve.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **values})


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` as its script sees itself (its folder on sys.path for shared helpers)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_args(task: Task, model_cls: type, data_cls: type, seed: int, steps: int, extra: list[str]) -> list[str]:
    """The command-line arguments of one run (``steps=0``: the baseline, no callback)."""
    args = ["--config", str(EXAMPLES / "configs" / task.config), f"--seed_everything={seed}"]
    for prefix, cls in (("data", data_cls), ("model", model_cls)):
        if "seed" in inspect.signature(cls.__init__).parameters:
            args.append(f"--{prefix}.seed={seed}")
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
    if steps > 0:
        args += ["--trainer.callbacks+=lightning_xgrad.XGradCallback", f"--trainer.callbacks.steps={steps}"]
    return args + extra


def run(task: Task, module: ModuleType, seed: int, steps: int, extra: list[str]) -> list[dict[str, float]]:
    """Train once; the validation curve."""
    model_cls, data_cls = getattr(module, task.model), getattr(module, task.data)
    args = cli_args(task, model_cls, data_cls, seed, steps, extra)
    cli_cls = getattr(module, task.cli) if task.cli else LightningCLI
    cli = cli_cls(model_cls, data_cls, args=args, run=False, save_config_callback=None)
    recorder = CurveRecorder(task.metrics)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder.curve


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(results: dict[str, Any], seeds: list[int], steps_list: list[int], command: str, wall: float) -> str:
    """The markdown table: final metrics per method, paired deltas of the primary metric, best s per task."""
    lines = [
        "# Convergence: baseline vs XGrad",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Lightning {pl.__version__}, Python {platform.python_version()}; wall time {wall / 60:.1f} min.  ",
        f"Seeds: {seeds}. Mean ± sample std over seeds of the final validation metrics; Δ = XGrad − baseline, "
        "taken seed by seed; 'seeds better' counts seeds where the primary metric improved.",
        "",
    ]
    for name, per_method in results.items():
        task = TASKS[name]
        primary, better_up = task.metrics[0], task.higher_is_better[0]
        finals = {s: [curve[-1] for curve in per_method[str(s)]] for s in [0, *steps_list]}
        header = ["method", *task.metrics, f"Δ {primary}", "seeds better"]
        lines += [f"## {name} ({task.config})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        best_s, best_value = 0, statistics.fmean(f[primary] for f in finals[0])
        for s in [0, *steps_list]:
            row = ["baseline" if s == 0 else f"XGrad s={s}"]
            row += [_mean_std([f[m] for f in finals[s]]) for m in task.metrics]
            if s == 0:
                row += ["", ""]
            else:
                deltas = [f[primary] - b[primary] for f, b in zip(finals[s], finals[0], strict=True)]
                improved = sum((d > 0) == better_up and d != 0 for d in deltas)
                sign = "+" if statistics.fmean(deltas) >= 0 else "−"
                spread = f" ± {statistics.stdev(deltas):.4f}" if len(deltas) > 1 else ""
                row += [f"{sign}{abs(statistics.fmean(deltas)):.4f}{spread}", f"{improved}/{len(deltas)}"]
                mean = statistics.fmean(f[primary] for f in finals[s])
                if (mean > best_value) == better_up and mean != best_value:
                    best_s, best_value = s, mean
            lines.append("| " + " | ".join(row) + " |")
        verdict = (
            "no s beats the baseline on the mean: XGrad does not help here"
            if best_s == 0
            else f"best s = {best_s} by the mean {primary}"
        )
        lines += ["", f"**{name}**: {verdict}.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], steps_list: list[int], path: Path) -> None:
    """Validation curves of each task's primary metric: mean over seeds, band from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6), squeeze=False)
    for ax, (name, per_method) in zip(axes[0], results.items(), strict=True):
        primary = TASKS[name].metrics[0]
        for s in [0, *steps_list]:
            curves = per_method[str(s)]
            length = min(len(c) for c in curves)
            epochs = [c["epoch"] + 1 for c in curves[0][:length]]
            values = [[c[i][primary] for c in curves] for i in range(length)]
            label = "baseline" if s == 0 else f"XGrad s={s}"
            line = ax.plot(epochs, [statistics.fmean(v) for v in values], label=label)[0]
            ax.fill_between(
                epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.15, color=line.get_color()
            )
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(primary)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="XGrad s values (default: 1 2)")
    parser.add_argument("--sweep", action="store_true", help="s = 0 1 2 3 and report the best s per task")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="convergence", help="file name stem of the outputs")
    parser.add_argument("extra", nargs="*", help="more LightningCLI arguments for every run, after --")
    args = parser.parse_args(argv)
    steps_list = [1, 2, 3] if args.sweep else sorted({s for s in args.steps if s > 0})
    if args.seeds < 1 or any(s < 0 for s in args.steps):
        parser.error("--seeds must be >= 1 and --steps >= 0")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*args parameter is intended to run from within Python.*")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    command = "python benchmarks/convergence.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    seeds = list(range(args.seeds))
    plan = [(name, seed, s) for name in args.tasks for seed in seeds for s in [0, *steps_list]]
    results: dict[str, dict[str, list[list[dict[str, float]]]]] = {}
    modules = {name: load_example(TASKS[name].example) for name in args.tasks}
    start = time.perf_counter()
    for name, seed, s in tqdm(plan, desc="runs", unit="run"):
        curve = run(TASKS[name], modules[name], seed, s, args.extra)
        if not curve:
            raise SystemExit(f"{name} seed={seed} s={s}: no validation epoch ran, so there is nothing to compare")
        if any(not math.isfinite(v) for point in curve for v in point.values()):
            tqdm.write(f"warning: {name} seed={seed} s={s} produced non-finite metrics: {curve[-1]}")
        results.setdefault(name, {}).setdefault(str(s), []).append(curve)
        final = ", ".join(f"{m}={curve[-1][m]:.4f}" for m in TASKS[name].metrics if m in curve[-1])
        tqdm.write(f"{name} seed={seed} s={s}: {final}")
    wall = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    markdown = report(results, seeds, steps_list, command, wall)
    (args.out / f"{args.name}.md").write_text(markdown + "\n")
    plot(results, steps_list, args.out / f"{args.name}.png")
    print(markdown)
    print(f"\nwrote {args.out / args.name}.md, .png and .json")


if __name__ == "__main__":
    main()
