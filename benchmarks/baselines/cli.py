"""The command line: tune every arm's lr, run every arm at its lr over seeds, write the report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from benchmarks.arms import (
    QUICK_FLAGS,
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
from .methods import GRID, METHODS, QUICK_GRID, Schedule, arm_key, seeds_arm, tuning_arm
from .report import Study, as_json, markdown, plot, run_minutes
from .tuning import pick, tuning_losses

PROGRAM = "python -m benchmarks.baselines"
#: quick mode: a tiny model for 2 epochs of 5 batches (tuning: 1 epoch), 1 seed, two lrs
QUICK_BATCHES, QUICK_EPOCHS, QUICK_TUNE_EPOCHS = 5, 2, 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=PACKAGE_DOC.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to compare, each with and without XGrad (default: all: {' '.join(METHODS)})",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        metavar="LR",
        help=f"the lr grid (default: {' '.join(f'{lr:g}' for lr in GRID)})",
    )
    parser.add_argument(
        "--tune-epochs", type=int, default=3, metavar="N", help="epochs of a tuning run (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, metavar="N", help="epochs of a reported run (default: the config's, 10)")
    parser.add_argument(
        "--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 of the reported runs (default: %(default)s)"
    )
    parser.add_argument("--xgrad-steps", type=int, default=1, metavar="S", help="XGrad's s (default: %(default)s)")
    quick = "a tiny model, a few steps, lrs 0.001 0.01, 1 seed: a check that everything runs, not a result"
    add_shared_options(parser, "baselines", quick)
    args = parser.parse_args(argv)
    if min(args.tune_epochs, args.seeds, args.jobs, args.xgrad_steps) < 1 or (
        args.epochs is not None and args.epochs < 1
    ):
        parser.error("--tune-epochs, --epochs, --seeds, --jobs and --xgrad-steps must be >= 1")
    if args.lrs is not None and (len(set(args.lrs)) < 2 or min(args.lrs) <= 0):
        parser.error("--lrs needs at least two different positive values")
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
    batches = QUICK_BATCHES if args.quick else None
    tune = Schedule.of_config(QUICK_TUNE_EPOCHS if args.quick else args.tune_epochs, batches)
    final = Schedule.of_config(args.epochs or (QUICK_EPOCHS if args.quick else None), batches)
    grid = tuple(sorted(set(args.lrs))) if args.lrs else QUICK_GRID if args.quick else GRID
    seeds = tuple(range(1 if args.quick else args.seeds))
    extra = [*(QUICK_FLAGS if args.quick else ()), *args.extra]
    log_every = args.log_every_n_steps or None
    arms = [(m, s) for m in args.methods for s in (0, args.xgrad_steps)]
    command = f"{PROGRAM} " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    try:
        tuning_arms = {(m, s, lr): tuning_arm(m, s, lr, tune) for m, s in arms for lr in grid}
        configs = {arm.label: arm_config(arm, (0,), out / "tuning", extra, log_every) for arm in tuning_arms.values()}
        tuned = run_arms(configs, args.jobs, "tuning")
        losses = {
            arm_key(m, bool(s)): tuning_losses({lr: tuned[tuning_arms[m, s, lr].label] for lr in grid}) for m, s in arms
        }
        picks = {key: pick(values) for key, values in losses.items()}
        seed_arms = {
            arm_key(m, bool(s)): seeds_arm(m, s, chosen.lr, final)
            for m, s in arms
            if (chosen := picks[arm_key(m, bool(s))]) is not None
        }
        configs = {arm.label: arm_config(arm, seeds, out / "seeds", extra, log_every) for arm in seed_arms.values()}
        ran = run_arms(configs, args.jobs, "seeds")
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = {key: ran[arm.label] for key, arm in seed_arms.items()}
    study = Study(
        command, machine(), time.perf_counter() - start, tuple(args.methods), grid, tune, final, seeds,
        args.xgrad_steps, losses, picks, results, run_minutes([*tuned.values(), *ran.values()]),
    )  # fmt: skip
    text, data = markdown(study), as_json(study)
    write_outputs(targets, args.name, text, data, plot)
    incomplete = sum(r.status != FINISHED for runs in [*tuned.values(), *ran.values()] for r in runs)
    if incomplete or len(seed_arms) < len(arms):
        print(f"{incomplete} runs have no result; {len(arms) - len(seed_arms)} arms have no lr", file=sys.stderr)
        return 1
    return 0
