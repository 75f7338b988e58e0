"""``python -m lightning_xgrad.sweep`` (``xgrad-sweep``): does XGrad help my model, and with which s?

Runs the user's LightningCLI command once per (s, seed), as a subprocess (see :mod:`.runs`), reads the monitored
metric back from each run's CSV log, and writes the table, the verdict (see :mod:`.stats`), results.json and a
plot of the curves into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report, stats
from .plot import CurvePanel, plot_curves
from .runs import (
    DEFAULT_CHECK_TIMEOUT_S,
    FINISHED,
    NOT_RUN,
    RunResult,
    RunSpec,
    SweepError,
    check_command,
    collect,
    execute,
    json_safe,
    run_folder,
    tail,
)

DEFAULT_ROOT = Path("xgrad-sweeps")
#: how often the runs with XGrad log XGradCallback's prediction metrics, by default (every n optimizer steps)
DEFAULT_LOG_EVERY_N_STEPS = 10
STATE_FILE = "sweep.json"
#: the program's name in its usage line and errors when run as ``python -m lightning_xgrad.sweep`` (as the console
#: script ``xgrad-sweep``, argparse's default, the name it was invoked by, is right)
MODULE_PROG = "python -m lightning_xgrad.sweep"
#: an example of the command after ``--``
EXAMPLE_COMMAND = "-- python my_cli.py fit --config my.yaml"
USAGE = (
    "%(prog)s [--steps 0 1 2] [--seeds 0 1 2] [--monitor val_loss] [--mode min|max] [--log-every-n-steps N] "
    f"[--out DIR] [--resume] [--check-timeout SECONDS] {EXAMPLE_COMMAND} [more args]"
)


@dataclass(frozen=True)
class SweepConfig:
    """What to run: the user's command for every s in ``steps`` (0 first) and seed in ``seeds``, into ``out``; the
    runs with XGrad log its prediction metrics every ``log_every_n_steps`` optimizer steps (``None``: not at all)."""

    command: tuple[str, ...]
    steps: tuple[int, ...]
    seeds: tuple[int, ...]
    monitor: str
    mode: stats.Mode
    out: Path
    log_every_n_steps: int | None = DEFAULT_LOG_EVERY_N_STEPS

    def __post_init__(self) -> None:
        validate(self.steps, self.seeds, self.command, self.mode, self.log_every_n_steps)
        if 0 not in self.steps:
            raise ValueError(f"steps must include 0, the baseline the others are compared with, got {self.steps}")

    def plan(self) -> list[RunSpec]:
        """Seed by seed, every s for a seed before the next seed: paired results arrive early."""
        return [run_folder(self.out, s, seed, self.log_every_n_steps) for seed in self.seeds for s in self.steps]


def validate(
    steps: Sequence[int],
    seeds: Sequence[int],
    command: Sequence[str],
    mode: str = "min",
    log_every_n_steps: int | None = None,
) -> None:
    """Refuse bad input before any run starts (ValueError, naming the argument)."""
    if not command:
        raise ValueError(f"no command after `--`: give the LightningCLI command to sweep, e.g. {EXAMPLE_COMMAND}")
    if any(s < 0 for s in steps):
        raise ValueError(f"--steps must be >= 0 (s = 0 is the baseline without XGrad), got {list(steps)}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"--steps has duplicates: {list(steps)}")
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if any(not 0 <= seed < 2**32 for seed in seeds):
        raise ValueError(f"--seeds must be in [0, 2**32) (seed_everything's range), got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has duplicates: {list(seeds)}")
    if mode not in stats.MODES:
        raise ValueError(f"--mode must be one of {stats.MODES}, got {mode!r}")
    if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool) or log_every_n_steps < 1):
        raise ValueError(
            f"--log-every-n-steps must be >= 1 (0 on the command line: no logging), got {log_every_n_steps}"
        )


def run_sweep(
    config: SweepConfig,
    resume: bool = False,
    check: bool = True,
    desc: str = "runs",
    check_timeout: float = DEFAULT_CHECK_TIMEOUT_S,
) -> list[RunResult]:
    """Run every (s, seed) of ``config`` not finished yet (all of them unless ``resume``), one after the other,
    with a progress bar; return every run's result, in plan order.

    A run that fails is reported with the last lines of its log and the sweep goes on. Raises SweepError when
    ``out`` holds another sweep, when the command does not take the sweep's arguments or already has XGradCallback
    (``check``: one ``--print_config`` call before the first run, stopped after ``check_timeout`` seconds), and when
    the first finished run never logged the monitored metric (the message names the metrics it logged)."""
    from tqdm import tqdm

    echo = tqdm.write
    _check_out(config, resume)
    plan = config.plan()
    # a run is done once its process exited cleanly (whether it logged the monitored metric is read afresh)
    done = {spec for spec in plan if resume and collect(spec, config.monitor).returncode == 0}
    todo = [spec for spec in plan if spec not in done]
    if done:
        echo(f"resuming {config.out}: {len(done)} of {len(plan)} runs already finished, {len(todo)} to run")
    monitor_checked = False
    if done:
        _check_monitor(collect(next(spec for spec in plan if spec in done), config.monitor), config.monitor)
        monitor_checked = True
    if check and todo:
        with tempfile.TemporaryDirectory(prefix="xgrad-sweep-check-") as scratch:
            check_command(
                config.command,
                max(config.steps),
                config.seeds[0],
                Path(scratch),
                config.log_every_n_steps,
                check_timeout,
            )
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / STATE_FILE).write_text(json.dumps({"command": list(config.command)}, indent=1) + "\n")
    with tqdm(total=len(todo), desc=desc, unit="run", dynamic_ncols=True) as bar:
        for spec in todo:
            bar.set_postfix_str(spec.name)
            execute(config.command, spec)
            result = collect(spec, config.monitor)
            if result.returncode == 0 and not monitor_checked:
                _check_monitor(result, config.monitor)
                monitor_checked = True
            if result.status == FINISHED:
                echo(f"{spec.name}: {config.monitor}={stats.format_value(result.final)} ({result.seconds:.0f} s)")
            else:
                reason = report.describe(result, config.monitor)
                echo(f"{spec.name}: {reason}; last lines of {spec.log}:\n{_indent(tail(spec.log))}")
            bar.update()
    return [collect(spec, config.monitor) for spec in plan]


def _check_out(config: SweepConfig, resume: bool) -> None:
    """``out`` must be new, or hold a sweep of the same command when resuming."""
    state = config.out / STATE_FILE
    if state.is_file():
        previous = json.loads(state.read_text())
        if not resume:
            raise SweepError(
                f"--out {config.out} already holds a sweep: pass --resume to continue it, or choose another --out"
            )
        if previous["command"] != list(config.command):
            raise SweepError(
                f"--out {config.out} holds a sweep of another command ({shlex.join(previous['command'])}); "
                "--resume continues a sweep of the same command only"
            )


def _check_monitor(result: RunResult, monitor: str) -> None:
    if result.final is None:
        logged = ", ".join(name for name in result.finals) or "none"
        raise SweepError(
            f"--monitor {monitor} was never logged by the first run (s={result.steps} seed={result.seed}); it "
            f"logged: {logged}. Pass one of those as --monitor (with --mode max if higher is better)."
        )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def labels(steps: Sequence[int]) -> dict[int, str]:
    return {s: "0 (no XGrad)" if s == 0 else str(s) for s in steps}


def runs_wall_seconds(results: Sequence[RunResult]) -> float:
    """The wall time of the runs, from each run's own record: a resumed sweep counts the runs of earlier invocations
    too, and not the time it spent skipping them."""
    return sum(r.seconds or 0.0 for r in results)


def results_json(config: SweepConfig, results: Sequence[RunResult]) -> dict[str, Any]:
    finals = report.finals_by_steps(results)
    summary = []
    prediction = {metric: report.run_means(results, metric) for metric, _ in report.prediction_columns(results)}
    for s in config.steps:
        spread = stats.Spread.of(list(finals.get(s, {}).values()))
        delta = None if s == 0 else stats.paired_delta(finals.get(s, {}), finals.get(0, {}), config.mode)
        # the mean over seeds of each run's mean of XGradCallback's prediction metrics
        means = {metric: stats.Spread.of(per_s.get(s, [])) for metric, per_s in prediction.items()}
        summary.append(
            {
                "s": s,
                "finished": len(finals.get(s, {})),
                "mean": spread and spread.mean,
                "std": spread and spread.std,
                "delta_mean": delta and delta.mean,
                "delta_standard_error": delta and delta.standard_error,
                "paired_seeds": list(delta.seeds) if delta else [],
                "seeds_improved": delta and delta.improved,
                "verdict": stats.BASELINE if s == 0 else (delta.verdict if delta else "no paired seeds"),
                "prediction": {metric: spread.mean for metric, spread in means.items() if spread is not None},
            }
        )
    return {
        "command": list(config.command),
        "monitor": config.monitor,
        "mode": config.mode,
        "log_every_n_steps": config.log_every_n_steps,
        "steps": list(config.steps),
        "seeds": list(config.seeds),
        "machine": machine(),
        "runs_wall_seconds": round(runs_wall_seconds(results), 1),
        "summary": summary,
        "verdict": stats.verdict(finals, config.mode, config.monitor),
        "runs": [r.as_json() for r in results],
    }


def cpu_model() -> str:
    """The CPU's model name where the system tells it (Linux, macOS), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()} on {platform.system()}"


def markdown(config: SweepConfig, results: Sequence[RunResult]) -> str:
    finished = sum(r.status == FINISHED for r in results)
    lines = [
        f"# XGrad sweep: {config.monitor} ({'lower' if config.mode == 'min' else 'higher'} is better)",
        "",
        f"Command: `{shlex.join(config.command)}`  ",
        f"s: {' '.join(map(str, config.steps))}; seeds: {' '.join(map(str, config.seeds))}; {finished} of "
        f"{len(results)} runs finished; wall time of the runs {runs_wall_seconds(results) / 60:.1f} min; {machine()}.",
        "",
        *report.table(results, config.monitor, config.mode, labels(config.steps)),
        "",
        f"**Verdict**: {stats.verdict(report.finals_by_steps(results), config.mode, config.monitor)}.",
        "",
        report.explanation(config.monitor, config.mode),
    ]
    if report.prediction_columns(results):
        lines += ["", report.prediction_explanation(results, config.log_every_n_steps)]
    failed = report.failures(results, config.monitor)
    if failed:
        lines += ["", "Runs without a result:", "", *failed]
    return "\n".join(lines) + "\n"


def write_outputs(config: SweepConfig, results: Sequence[RunResult]) -> tuple[str, list[Path]]:
    """results.md, results.json and curves.png in ``out``; the Markdown and the paths written."""
    text = markdown(config, results)
    paths = [config.out / "results.md", config.out / "results.json"]
    curves = {s: {r.seed: r.curve for r in results if r.steps == s and r.status == FINISHED} for s in config.steps}
    legend = {s: "s = 0 (no XGrad)" if s == 0 else f"XGrad s = {s}" for s in config.steps}
    panel = CurvePanel(f"XGrad sweep: {config.monitor}", config.monitor, curves, legend)
    if plot_curves([panel], config.out / "curves.png"):
        paths.append(config.out / "curves.png")
    else:
        text += "\nNo curves.png: matplotlib is not installed (`pip install 'lightning-xgrad[sweep]'`).\n"
    paths[0].write_text(text)
    paths[1].write_text(json.dumps(json_safe(results_json(config, results)), indent=1) + "\n")
    return text, paths


def new_folder(root: Path) -> Path:
    """A folder under ``root`` named by the time, that no other sweep has taken."""
    stem = time.strftime("%Y%m%d-%H%M%S")
    folder, count = root / stem, 1
    while folder.exists():
        count += 1
        folder = root / f"{stem}-{count}"
    return folder


def positive_seconds(text: str) -> float:
    """``--check-timeout``'s value: a number of seconds > 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return seconds


def parser_for(prog: str | None = None) -> argparse.ArgumentParser:
    """The sweep's options (everything before ``--``); ``prog`` names the program in its usage line and errors
    (default: how it was invoked, ``xgrad-sweep`` for the console script)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=USAGE,
        description=(
            "Does XGrad help my model, and with which s? Runs a LightningCLI command once per (s, seed), s = 0 "
            "without XGrad, and compares the monitored metric seed by seed. Each run gets --seed_everything=SEED, "
            "for s > 0 --trainer.callbacks+=lightning_xgrad.XGradCallback --trainer.callbacks.steps=S, and a "
            "CSVLogger into its folder (added to the loggers the command already has). {seed} in the command is "
            "replaced by the run's seed."
        ),
        exit_on_error=False,  # parse() words the errors: a missing `--` is the likelier cause of most
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[0, 1, 2], help="values of s (default: 0 1 2; 0 is always run)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--monitor", default="val_loss", help="the logged metric to compare (default: val_loss)")
    parser.add_argument("--mode", choices=stats.MODES, default="min", help="min: lower is better (default); max")
    parser.add_argument(
        "--log-every-n-steps",
        type=int,
        default=DEFAULT_LOG_EVERY_N_STEPS,
        metavar="N",
        help="in the runs with XGrad, log its prediction metrics every N optimizer steps; 0: not at all "
        "(default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, help="the sweep's folder (default: a new folder under xgrad-sweeps/)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --out: skip finished runs")
    parser.add_argument(
        "--check-timeout",
        type=positive_seconds,
        default=DEFAULT_CHECK_TIMEOUT_S,
        metavar="SECONDS",
        help="before any run, the command is checked with --print_config appended; a program that has not answered "
        "within SECONDS (it trains instead: not a LightningCLI program) is stopped and refused (default: %(default)g)",
    )
    return parser


def parse(
    argv: Sequence[str], prog: str | None = None
) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser]:
    """The sweep's options and the command after ``--``; exits with status 2 and a one-line error on bad options,
    saying that the command goes after ``--`` when there is none."""
    parser = parser_for(prog)
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    try:
        args, unknown = parser.parse_known_args(argv[:split])
    except argparse.ArgumentError as error:
        problem = str(error)
    else:
        if not unknown:
            return args, argv[split + 1 :], parser
        problem = f"unrecognized arguments: {' '.join(unknown)}"
    if "--" not in argv:
        problem = f"the command to sweep goes after `--` ({EXAMPLE_COMMAND}), and there is no `--`: {problem}"
    parser.error(problem)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The command line; returns 0 when every run finished with the metric, 1 when some did not, 2 on bad input.
    ``prog``: the program's name in its messages (default: how it was invoked)."""
    args, command, parser = parse(sys.argv[1:] if argv is None else argv, prog)
    steps = list(args.steps)
    log_every = args.log_every_n_steps or None  # 0: no logging
    try:
        validate(steps, args.seeds, command, args.mode, log_every)
    except ValueError as error:
        parser.error(str(error))
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR, the folder of the sweep to continue")
    steps = sorted({0, *steps})
    out = args.out if args.out is not None else new_folder(DEFAULT_ROOT)
    config = SweepConfig(tuple(command), tuple(steps), tuple(args.seeds), args.monitor, args.mode, out, log_every)
    try:
        results = run_sweep(config, resume=args.resume, check_timeout=args.check_timeout)
    except SweepError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with --resume --out {out}", file=sys.stderr)
        results = [collect(spec, config.monitor) for spec in config.plan()]
        write_outputs(config, results)
        return 130
    text, paths = write_outputs(config, results)
    print(text)
    print("wrote " + ", ".join(str(p) for p in paths))
    incomplete = [r for r in results if r.status != FINISHED]
    if incomplete:
        not_run = sum(r.status == NOT_RUN for r in incomplete)
        print(f"{len(incomplete)} of {len(results)} runs have no result ({not_run} not run)", file=sys.stderr)
        return 1
    return 0
