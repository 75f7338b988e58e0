"""Convergence benchmark: baseline vs XGrad (s in a list) on every example task, over seeds, through LightningCLI.

Each task is a sweep of the package's own ``lightning_xgrad.sweep`` (the machinery behind
``python -m lightning_xgrad.sweep``): every run is what a user types, run as a subprocess,
``python examples/<example>.py fit --config examples/configs/<task>.yaml --data.seed=SEED`` (and ``--model.seed``
where the model takes one), with the config's own logger switched off, plus what the sweep appends:
``--seed_everything=SEED``, ``--trainer.callbacks+=lightning_xgrad.XGradCallback --trainer.callbacks.steps=s
--trainer.callbacks.log_every_n_steps=N`` for s > 0, and a CSVLogger into the run's folder, from which the validation
metrics and XGradCallback's prediction metrics are read back. Writes into
``--out`` (default: a new folder under ``benchmarks/runs/``, which git ignores), next to every run's folder:

- ``<name>.md``: per task, mean ± std over seeds of the final metrics, the paired delta against the baseline with
  its standard error, seeds improved, a verdict that names a best s only when the paired difference is beyond
  2 standard errors over at least 3 seeds, and next to them the prediction's cosine and error (XGradCallback's
  ``xgrad/prediction_cosine`` and ``xgrad/prediction_error``: per run the mean over its logged values, logged every
  ``--log-every-n-steps`` optimizer steps, then mean ± std over seeds);
- ``<name>.png``: per task, validation curves of the primary metric (log scale) over the paired delta against the
  baseline;
- ``<name>.json``: every curve, to re-plot without re-running (``--replot``).

``--publish`` also writes the three files to ``benchmarks/results/``, the published results the docs link to.

    python benchmarks/convergence.py --publish                 # the published run: every task, s = 1 2, 3 seeds
    python benchmarks/convergence.py --sweep                   # "which s?": s = 0 1 2 3, best per task
    python benchmarks/convergence.py --tasks digits_sgd --seeds 2 --steps 1
    python benchmarks/convergence.py --replot benchmarks/results/convergence.json --publish  # redraw the plot only
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lightning_xgrad.sweep import SweepConfig, run_sweep, stats
from lightning_xgrad.sweep import report as sweep_report
from lightning_xgrad.sweep.cli import DEFAULT_LOG_EVERY_N_STEPS, cpu_model
from lightning_xgrad.sweep.plot import CurvePanel, plot_curves
from lightning_xgrad.sweep.runs import FINISHED, RunResult, SweepError

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:  # the examples' helpers import as the example programs import them
    sys.path.insert(0, str(EXAMPLES))
from _loader import load_example  # noqa: E402  (examples/_loader.py, shared with the tests)

CONFIGS = EXAMPLES / "configs"
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "benchmarks" / "runs"


@dataclass(frozen=True)
class Task:
    """One example program and config; ``metrics[0]`` is the primary metric, the one the verdict is about."""

    example: str
    model: str
    data: str
    config: str
    metrics: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    #: what the run without XGrad is (the companion tasks: the method alone)
    baseline: str = "baseline"
    #: what the runs with XGrad add it to
    method: str = ""

    def label(self, steps: int) -> str:
        if steps == 0:
            return self.baseline
        return f"{self.method} + XGrad s={steps}" if self.method else f"XGrad s={steps}"

    @property
    def mode(self) -> stats.Mode:
        return "max" if self.higher_is_better[0] else "min"


DIGITS = ("digits", "DigitsClassifier", "DigitsDataModule")
DIGITS_METRICS = ("val_loss", "val_acc"), (False, True)
TASKS: dict[str, Task] = {
    "digits_sgd": Task(*DIGITS, "digits_sgd.yaml", *DIGITS_METRICS),
    "digits_adamw": Task(*DIGITS, "digits_adamw.yaml", *DIGITS_METRICS),
    "char_gpt": Task(
        "char_gpt", "CharGPT", "CharTextDataModule", "char_gpt.yaml", ("val_loss", "val_ppl"), (False, False)
    ),
    "digits_gan": Task(
        "digits_gan", "DigitsGAN", "DigitsGANData", "digits_gan.yaml", ("val_fd", "val_is"), (False, True)
    ),
    # the companion methods: the baseline row is the method alone, the XGrad rows the method with XGrad
    "digits_cprop": Task(*DIGITS, "digits_cprop.yaml", *DIGITS_METRICS, baseline="CProp alone", method="CProp"),
    "digits_ahb": Task(*DIGITS, "digits_ahb.yaml", *DIGITS_METRICS, baseline="heavy-ball alone", method="heavy-ball"),
}


def seed_flags(task: Task) -> list[str]:
    """``--data.seed={seed}`` and ``--model.seed={seed}`` where the class takes a seed (split, order, noise)."""
    module = load_example(task.example)
    return [
        f"--{part}.seed={{seed}}"
        for part, cls in (("data", getattr(module, task.data)), ("model", getattr(module, task.model)))
        if "seed" in inspect.signature(cls.__init__).parameters
    ]


def task_command(task: Task, extra: Sequence[str]) -> list[str]:
    """The user's command of a task; the sweep appends the seed, XGrad and its logger, and fills in ``{seed}``."""
    return [
        sys.executable,
        str(EXAMPLES / f"{task.example}.py"),
        "fit",
        "--config",
        str(CONFIGS / task.config),
        *seed_flags(task),
        "--trainer.logger=false",  # the config's own logger: the sweep's CSVLogger is the only one
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def machine() -> str:
    return (
        f"{cpu_model()}, {platform.machine()}; torch {version('torch')}, Lightning {version('lightning')}, "
        f"Python {platform.python_version()}"
    )


def curves_of(results: Sequence[RunResult], steps: int) -> list[list[dict[str, float]]]:
    """The validation curves of the runs at ``steps`` in seed order (the JSON's ``results``); empty for a run
    without a result, so position i stays seed i."""
    runs = sorted((r for r in results if r.steps == steps), key=lambda r: r.seed)
    return [r.curve if r.status == FINISHED else [] for r in runs]


def report(
    results: dict[str, list[RunResult]],
    seeds: Sequence[int],
    steps_list: Sequence[int],
    command: str,
    wall: float,
    log_every_n_steps: int | None = None,
) -> str:
    """The Markdown report: per task, the sweep's table (with the task's other metrics) and its verdict."""
    lines = [
        "# Convergence: baseline vs XGrad",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; wall time {wall / 60:.1f} min.  ",
        f"Seeds: {list(seeds)}. Runs are deterministic: the same command reproduces these numbers on the same CPU "
        "model with the same library versions; another CPU gives slightly different numbers (its floating-point "
        "kernels round differently), within the seed spread.",
        "",
    ]
    for name, runs in results.items():
        task = TASKS[name]
        primary = task.metrics[0]
        labels = {s: task.label(s) for s in [0, *steps_list]}
        table = sweep_report.table(runs, primary, task.mode, labels, "method", task.metrics[1:])
        verdict = stats.verdict(sweep_report.finals_by_steps(runs), task.mode, primary)
        lines += [f"## {name} ({task.config})", "", *table, "", f"**{name}**: {verdict}.", ""]
        failed = sweep_report.failures(runs, primary)
        if failed:
            lines += ["Runs without a result:", "", *failed, ""]
    lines.append(sweep_report.explanation("the primary metric (first column)"))
    prediction = sweep_report.prediction_explanation([r for runs in results.values() for r in runs], log_every_n_steps)
    if prediction:
        lines += ["", prediction]
    return "\n".join(lines)


def plot(curves: dict[str, dict[str, list[list[dict[str, float]]]]], path: Path) -> bool:
    """Per task: the primary metric's validation curves over the paired delta against the baseline."""
    panels = []
    for name, per_s in curves.items():
        task = TASKS[name]
        steps = sorted(int(s) for s in per_s)
        panels.append(
            CurvePanel(
                name,
                task.metrics[0],
                {s: dict(enumerate(per_s[str(s)])) for s in steps},  # the curves are in seed order
                {s: task.label(s) for s in steps},
            )
        )
    return plot_curves(panels, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="XGrad s values (default: 1 2)")
    parser.add_argument("--sweep", action="store_true", help="s = 0 1 2 3 and report the best s per task")
    parser.add_argument(
        "--log-every-n-steps",
        type=int,
        default=DEFAULT_LOG_EVERY_N_STEPS,
        metavar="N",
        help="XGradCallback logs its prediction metrics every N optimizer steps; 0: not at all (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="the run folder (default: a new folder under benchmarks/runs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out: skip finished runs")
    parser.add_argument(
        "--publish", action="store_true", help="also write the results to benchmarks/results/ (the published ones)"
    )
    parser.add_argument("--name", default="convergence", help="file name stem of the outputs")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plot from a results JSON")
    parser.add_argument("extra", nargs="*", help="more LightningCLI arguments for every run, after --")
    args = parser.parse_args(argv)
    steps_list = [1, 2, 3] if args.sweep else sorted({s for s in args.steps if s > 0})
    if args.seeds < 1 or any(s < 0 for s in args.steps) or args.log_every_n_steps < 0:
        parser.error("--seeds must be >= 1, --steps and --log-every-n-steps >= 0")
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR, the folder of the run to continue")
    out = args.out if args.out is not None else RUNS / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    targets = [out, RESULTS] if args.publish else [out]

    if args.replot is not None:
        curves = json.loads(args.replot.read_text())["results"]
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            plot(curves, folder / f"{args.name}.png")
        print("wrote " + ", ".join(str(folder / f"{args.name}.png") for folder in targets))
        return 0

    command = "python benchmarks/convergence.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    seeds = list(range(args.seeds))
    results: dict[str, list[RunResult]] = {}
    start = time.perf_counter()
    try:
        for name in args.tasks:
            task = TASKS[name]
            config = SweepConfig(
                tuple(task_command(task, args.extra)), (0, *steps_list), tuple(seeds), task.metrics[0], task.mode,
                out / name, args.log_every_n_steps or None,
            )  # fmt: skip
            results[name] = run_sweep(config, resume=args.resume, check=False, desc=name)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start

    curves = {name: {str(s): curves_of(runs, s) for s in [0, *steps_list]} for name, runs in results.items()}
    data: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "seeds": seeds,
        "results": curves,
        "runs": {name: [r.as_json() for r in runs] for name, runs in results.items()},
    }
    markdown = report(results, seeds, steps_list, command, wall, args.log_every_n_steps or None)
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.name}.json").write_text(json.dumps(data, indent=1) + "\n")
        (folder / f"{args.name}.md").write_text(markdown + "\n")
        plot(curves, folder / f"{args.name}.png")
    print(markdown)
    print("\nwrote " + ", ".join(f"{folder / args.name}.md, .png and .json" for folder in targets))
    incomplete = sum(r.status != FINISHED for runs in results.values() for r in runs)
    if incomplete:
        print(f"{incomplete} runs have no result: see the table", file=sys.stderr)
    return 1 if incomplete else 0


if __name__ == "__main__":
    raise SystemExit(main())
