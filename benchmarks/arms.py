"""Arms of the char-GPT benchmarks: training recipes run over seeds through the sweep machinery, in parallel, resumable.

An arm is one recipe of ``examples/char_gpt.py``: the command benchmarks/convergence.py runs for the ``char_gpt`` task
(``python examples/char_gpt.py fit --config examples/configs/char_gpt.yaml --data.seed={seed} ...``) with the arm's
flags (optimizer, lr, schedule, split) and, for an XGrad arm, ``XGradCallback`` added by flag. Each arm is a sweep of
``lightning_xgrad.sweep`` in its own folder, with s = 0 as far as the sweep is concerned: an XGrad arm carries the
callback in its command, so it can be tuned to another lr than its counterpart without XGrad. So every run is what
a user types, its metrics are read back from its CSV log, a finished run is never run again (the sweep's resume),
and a folder that holds another command is refused instead of mixed.

:func:`run_arms` runs ``jobs`` (arm, seed) runs at a time, seed 0 of every arm first, each a subprocess; Ctrl-C
stops the runs in progress (they are run again on resume) and starts no more.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.convergence import RESULTS, RUNS, TASKS, task_command
from lightning_xgrad.sweep import SweepConfig, run_sweep, stats
from lightning_xgrad.sweep.cli import DEFAULT_LOG_EVERY_N_STEPS
from lightning_xgrad.sweep.report import describe
from lightning_xgrad.sweep.runs import FINISHED, XGRAD_CLASS_PATH, RunResult, collect, json_safe

REPO = Path(__file__).resolve().parents[1]
TASK = TASKS["char_gpt"]
MONITOR = TASK.metrics[0]
#: quick mode's flags for every run: a tiny model, small batches, two validation batches, no sanity check
QUICK_FLAGS: tuple[str, ...] = (
    "--model.n_layer=1",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--data.batch_size=8",
    "--data.val_batches=2",
    "--trainer.num_sanity_val_steps=0",
)


@dataclass(frozen=True)
class Arm:
    """One recipe: ``key`` names its folder, ``label`` its row; ``flags`` are LightningCLI flags; ``xgrad_steps`` > 0
    adds ``XGradCallback(steps=xgrad_steps)``."""

    key: str
    label: str
    flags: tuple[str, ...]
    xgrad_steps: int = 0


def arm_command(arm: Arm, extra: Sequence[str], log_every_n_steps: int | None) -> tuple[str, ...]:
    """The arm's command for the sweep: the task's command, ``extra`` (quick mode's flags, the user's), the arm's
    flags after them (they win), and XGradCallback with its prediction metrics every ``log_every_n_steps`` steps."""
    flags = [*extra, *arm.flags]
    if arm.xgrad_steps:
        flags += [f"--trainer.callbacks+={XGRAD_CLASS_PATH}", f"--trainer.callbacks.steps={arm.xgrad_steps}"]
        if log_every_n_steps:
            flags.append(f"--trainer.callbacks.log_every_n_steps={log_every_n_steps}")
    return tuple(task_command(TASK, flags))


def arm_config(
    arm: Arm, seeds: Sequence[int], out: Path, extra: Sequence[str], log_every_n_steps: int | None
) -> SweepConfig:
    """The arm's sweep: its command over ``seeds`` into ``out / arm.key``."""
    command = arm_command(arm, extra, log_every_n_steps)
    return SweepConfig(command, (0,), tuple(seeds), MONITOR, TASK.mode, out / arm.key, None)


def run_arms(configs: dict[str, SweepConfig], jobs: int, desc: str = "runs") -> dict[str, list[RunResult]]:
    """Run every (arm, seed) of ``configs`` (label -> sweep) not finished yet, ``jobs`` at a time, under one progress
    bar with a line per run; return every arm's results in seed order, finished or not. Raises the sweep's
    SweepError (another command in an arm's folder, a metric never logged)."""
    from tqdm import tqdm

    tasks = [
        (label, replace(config, seeds=(seed,)))
        for seed in sorted({seed for config in configs.values() for seed in config.seeds})
        for label, config in configs.items()
        if seed in config.seeds
    ]
    todo = [(label, config) for label, config in tasks if collect(config.plan()[0], MONITOR).returncode != 0]
    out, err = sys.stdout, sys.stderr
    if len(todo) < len(tasks):
        print(f"{desc}: {len(tasks) - len(todo)} of {len(tasks)} runs already finished, {len(todo)} to run", file=out)
    if not todo:
        return _collect(configs)
    with (
        ThreadPoolExecutor(max_workers=jobs) as pool,
        tqdm(total=len(todo), desc=desc, unit="run", file=err, dynamic_ncols=True) as bar,
        open(os.devnull, "w") as sink,
        redirect_stdout(sink),  # each sweep's own bar and lines: the line per run below says it with the arm's name
        redirect_stderr(sink),
    ):
        futures = {pool.submit(run_sweep, config, resume=True, check=False): label for label, config in todo}
        try:
            for future in as_completed(futures):
                (result,) = future.result()
                bar.write(f"{futures[future]}, seed {result.seed}: {_outcome(result)}", file=out)
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the runs in progress were interrupted too
            raise
    return _collect(configs)


def _collect(configs: dict[str, SweepConfig]) -> dict[str, list[RunResult]]:
    return {label: [collect(spec, config.monitor) for spec in config.plan()] for label, config in configs.items()}


def _outcome(result: RunResult) -> str:
    if result.status == FINISHED:
        return f"{MONITOR}={stats.format_value(result.final)} ({result.seconds or 0:.0f} s)"
    return f"{describe(result, MONITOR)}, log: {result.log}"


def prepare_environment(threads: int | None) -> None:
    """The runs' environment: this checkout first on ``PYTHONPATH`` (the runs import its ``lightning_xgrad``, whatever
    is installed), and ``threads`` intra-op threads per run (``OMP_NUM_THREADS``, which torch reads at start: two runs
    at once on two cores should get one each; None: torch's default, one per core)."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *(p for p in paths if p and p != str(REPO))])
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def add_shared_options(parser: argparse.ArgumentParser, name: str, quick: str) -> None:
    """The options both char-GPT benchmarks share: logging, parallel runs, quick mode (``quick``: its help), the
    output (``name``: the default file name stem) and the LightningCLI arguments after ``--``."""
    parser.add_argument(
        "--log-every-n-steps",
        type=int,
        default=DEFAULT_LOG_EVERY_N_STEPS,
        metavar="N",
        help="XGradCallback logs its prediction metrics every N steps; 0: not at all (default: %(default)s)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="runs at a time, each a process (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads per run (default: torch's, one per core; with --jobs 2 on 2 cores, 1)",
    )
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, help="the run folder (default: a new folder under benchmarks/runs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out: finished runs are kept")
    parser.add_argument("--publish", action="store_true", help="also write the results to benchmarks/results/")
    parser.add_argument("--name", default=name, help="file name stem of the outputs (default: %(default)s)")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plot from a results JSON")
    parser.add_argument("extra", nargs="*", help="more LightningCLI arguments for every run, after --")


def check_shared_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks of :func:`add_shared_options`' options: --threads >= 1, --log-every-n-steps >= 0, --resume needs
    --out, a used --out needs --resume, and a --quick run is never published."""
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.log_every_n_steps < 0:
        parser.error("--log-every-n-steps must be >= 0")
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR, the folder of the run to continue")
    if args.out is not None and args.out.is_dir() and any(args.out.iterdir()) and not (args.resume or args.replot):
        parser.error(f"--out {args.out} holds a run: pass --resume to continue it, or choose another folder")
    if args.quick and args.publish:
        parser.error("--quick checks that everything runs; its numbers are not results: no --publish")


def output_folders(args: argparse.Namespace) -> list[Path]:
    """Where the results go: --out (default: a new folder under benchmarks/runs/), and benchmarks/results/ with
    --publish."""
    out = args.out if args.out is not None else RUNS / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return [out, RESULTS] if args.publish else [out]


def write_outputs(
    folders: Sequence[Path], name: str, text: str, data: dict[str, Any], plot: Callable[[Any, Path], Any]
) -> None:
    """``name``.md, .json and .png into every folder, the report printed."""
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(json_safe(data), indent=1) + "\n")
        (folder / f"{name}.md").write_text(text)
        plot(data, folder / f"{name}.png")
    print(text)
    print("wrote " + ", ".join(f"{folder / name}.md, .png and .json" for folder in folders))


def replot(source: Path, folders: Sequence[Path], name: str, plot: Callable[[Any, Path], Any]) -> None:
    """Only redraw ``name``.png in every folder from a results JSON."""
    data = json.loads(source.read_text())
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        plot(data, folder / f"{name}.png")
    print("wrote " + ", ".join(str(folder / f"{name}.png") for folder in folders))


def delta_json(delta: stats.PairedDelta | None) -> dict[str, Any] | None:
    """A paired difference as the results JSON keeps it (``None`` without one)."""
    if delta is None:
        return None
    return {
        "seeds": list(delta.seeds),
        "deltas": list(delta.deltas),
        "mean": delta.mean,
        "standard_error": delta.standard_error,
        "improved": delta.improved,
        "verdict": delta.verdict,
    }
