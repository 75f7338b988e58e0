"""The command line: both arms over seeds, then the gaps, the report and the figure."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from benchmarks.arms import (
    QUICK_FLAGS,
    Arm,
    add_shared_options,
    arm_config,
    check_shared_args,
    output_folders,
    prepare_environment,
    replot,
    run_arms,
    write_outputs,
)
from benchmarks.convergence import machine
from lightning_xgrad.sweep.runs import FINISHED, SweepError

from . import __doc__ as PACKAGE_DOC
from .gaps import gap_at, trend
from .report import LongRun, as_json, curves, markdown, plot

PROGRAM = "python -m benchmarks.long_run"
BATCHES = 100  # the config's batches per epoch
#: the warm-up's share of the run in the config (100 of 1,000 steps), kept for longer runs
WARMUP_SHARE = 0.1
#: quick mode: a tiny model, 4 epochs of 5 batches with a 2-step warm-up, 2 seeds
QUICK_BATCHES, QUICK_EPOCHS, QUICK_WARMUP, QUICK_SEEDS = 5, 4, 2, 2


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=PACKAGE_DOC.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--epochs", type=int, default=50, metavar="N", help="epochs of 100 steps (default: %(default)s)"
    )
    parser.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--xgrad-steps", type=int, default=1, metavar="S", help="XGrad's s (default: %(default)s)")
    parser.add_argument(
        "--at",
        type=float,
        nargs="+",
        default=[0.2, 0.5, 1.0],
        metavar="FRACTION",
        help="points of the run where the gap is compared, the last one with each earlier one (default: 0.2 0.5 1)",
    )
    add_shared_options(parser, "long_run", "a tiny model, 20 steps, 2 seeds: not a result")
    args = parser.parse_args(argv)
    if min(args.epochs, args.seeds, args.jobs, args.xgrad_steps) < 1:
        parser.error("--epochs, --seeds, --jobs and --xgrad-steps must be >= 1")
    if not all(0 < f <= 1 for f in args.at) or len(set(args.at)) < 2:
        parser.error("--at needs at least two different fractions in (0, 1]")
    check_shared_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    targets = output_folders(args)
    out = targets[0]
    if args.replot is not None:
        replot(args.replot, targets, args.name, plot)
        return 0

    prepare_environment(args.threads)
    epochs = QUICK_EPOCHS if args.quick else args.epochs
    batches = QUICK_BATCHES if args.quick else BATCHES
    seeds = tuple(range(QUICK_SEEDS if args.quick else args.seeds))
    # the config's warm-up (100 of its 1,000 steps) stretched with the run, as the cosine decay is
    warmup = QUICK_WARMUP if args.quick else round(WARMUP_SHARE * epochs * batches)
    quick = (*QUICK_FLAGS, f"--data.train_batches_per_epoch={batches}")
    extra = [*(quick if args.quick else ()), *args.extra]
    flags = (f"--trainer.max_epochs={epochs}", f"--model.warmup_steps={warmup}")
    labels = ("AdamW", f"AdamW + XGrad s={args.xgrad_steps}")
    arms = [Arm("adamw", labels[0], flags), Arm("adamw-xgrad", labels[1], flags, args.xgrad_steps)]
    log_every = args.log_every_n_steps or None
    command = f"{PROGRAM} " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    try:
        results = run_arms({arm.label: arm_config(arm, seeds, out, extra, log_every) for arm in arms}, args.jobs)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    baseline, xgrad = results[labels[0]], results[labels[1]]
    fractions = sorted(set(args.at))
    by_seed = [dict(zip(seeds, curves(runs), strict=True)) for runs in (baseline, xgrad)]
    gaps = [gap_at(by_seed[0], by_seed[1], f) for f in fractions]
    run = LongRun(
        command, machine(), time.perf_counter() - start, epochs, batches, warmup, args.xgrad_steps, seeds, labels,
        baseline, xgrad, gaps, [trend(gap, gaps[-1]) for gap in gaps[:-1]], log_every,
    )  # fmt: skip
    text, data = markdown(run), as_json(run)
    write_outputs(targets, args.name, text, data, plot)
    incomplete = sum(r.status != FINISHED for r in [*baseline, *xgrad])
    if incomplete:
        print(f"{incomplete} runs have no result: see the report", file=sys.stderr)
        return 1
    return 0
