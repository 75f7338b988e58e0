"""Baseline vs. XGrad on scikit-learn's handwritten digits, with a small CNN, on CPU in under a minute.

For each optimizer and seed it trains the digits CNN of ``examples/digits.py`` once plainly and once per requested
``XGradCallback(steps=s)``, with identical data order and initial weights, and prints a side-by-side table of
the final validation loss and accuracy. The model has no BatchNorm and no dropout, so the only difference
between the runs is the weights at which the gradients are taken. ``make demo`` runs it with the defaults.

Run it from the repository root (with the package installed, e.g. ``pip install -e ".[examples]"``)::

    python examples/demo.py                                     # SGD and AdamW, one seed, XGrad s=1
    python examples/demo.py --seeds 3 --steps 1 2 --no-progress-bar

One run of either side is a LightningCLI command of ``examples/digits.py``, e.g.
``python examples/digits.py fit --config examples/configs/digits_sgd.yaml`` for the SGD baseline.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from _quiet import quiet  # beside this file
from _report import method_name, print_table, summary  # beside this file
from digits import OPTIMIZERS, train  # beside this file


def main(argv: list[str] | None = None) -> None:
    """Run baseline and XGrad for every optimizer and seed, then print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds, 0..N-1 (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[1], help="XGrad prediction steps to compare (default: 1)"
    )
    parser.add_argument(
        "--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS), help="(default: sgd adamw)"
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1:
        parser.error("--epochs and --seeds must be at least 1")

    quiet()
    start = time.perf_counter()
    methods: list[int | None] = [None, *args.steps]
    # results[(optimizer, method)] = list over seeds of {"val_loss": ..., "val_acc": ...}
    results: dict[tuple[str, int | None], list[dict[str, float]]] = {}
    for optimizer in args.optimizers:
        for seed in range(args.seeds):
            for steps in methods:
                t0 = time.perf_counter()
                progress_bar = not args.no_progress_bar
                metrics = train(steps, optimizer, epochs=args.epochs, seed=seed, progress_bar=progress_bar)
                results.setdefault((optimizer, steps), []).append(metrics)
                print(
                    f"[{optimizer} seed={seed} {method_name(steps)}] val_loss={metrics['val_loss']:.4f} "
                    f"val_acc={metrics['val_acc']:.4f} ({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )

    header = ["optimizer", "method", "val_loss", "val_acc", "Δ val_loss", "Δ val_acc"]
    rows = []
    for optimizer in args.optimizers:
        base = results[(optimizer, None)]
        for steps in methods:
            runs = results[(optimizer, steps)]
            row = [optimizer, method_name(steps)]
            row += [summary([r[k] for r in runs], digits=4) for k in ("val_loss", "val_acc")]
            if steps is None:
                row += ["", ""]
            else:
                for key in ("val_loss", "val_acc"):
                    deltas = [r[key] - b[key] for r, b in zip(runs, base, strict=True)]
                    row.append(summary(deltas, signed=True, digits=4))
            rows.append(row)
    epochs = f"{args.epochs} epoch" + ("s" if args.epochs > 1 else "")
    seeds = f"mean ± std over {args.seeds} seeds" if args.seeds > 1 else "1 seed"
    caption = "Δ = XGrad - baseline, run for run at the same seed"
    print_table(f"Digits, final validation after {epochs}, {seeds}", caption, header, rows, label_columns=2)
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"wall time (all runs): {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
