"""Baseline vs. XGrad on a two-optimizer GAN: MLPs on scikit-learn's digits, manual optimization, CPU, about a minute.

For each seed it trains the GAN of ``examples/digits_gan.py`` (an MLP generator and discriminator, each with its own
Adam, non-saturating loss, manual optimization) once plainly and once per requested ``XGradCallback(steps=s)``, from
the same initial weights, data order and noise, and prints a table of the final sample quality: ``val_fd``, the
Frechet distance to the real digits in pixel space (lower is better), and ``val_is``, an inception-like score from a
logistic-regression digit classifier (higher is better, at most 10). See ``examples/digits_gan.py`` for both.

Run it from the repository root (with the package installed, e.g. ``pip install -e ".[examples]"``)::

    python examples/gan_demo.py                                    # one seed, baseline and XGrad s=1
    python examples/gan_demo.py --seeds 3 --steps 1 2 --no-progress-bar

One run of either side is a LightningCLI command of ``examples/digits_gan.py``, e.g.
``python examples/digits_gan.py fit --config examples/configs/digits_gan.yaml`` for the baseline.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import torch
from _quiet import quiet  # beside this file
from _report import method_name, print_table, summary  # beside this file
from digits_gan import reference_scores, train  # beside this file


def main(argv: list[str] | None = None) -> None:
    """Run the baseline and every requested XGrad s for every seed, then print the comparison table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100, help="epochs per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds, 0..N-1 (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[1], help="XGrad prediction steps to compare (default: 1)"
    )
    parser.add_argument("--g-every", type=int, default=1, help="step the generator every n batches (default: 1)")
    parser.add_argument("--no-progress-bar", action="store_true", help="hide Lightning's progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1 or args.g_every < 1:
        parser.error("--epochs, --seeds and --g-every must be at least 1")

    quiet()
    torch.set_num_threads(1)  # MLPs this small run faster on one thread (about 1.5x on a 2-core CPU)
    start = time.perf_counter()
    methods: list[int | None] = [None, *args.steps]
    results: dict[int | None, list[dict[str, float]]] = {}
    for seed in range(args.seeds):
        for steps in methods:
            t0 = time.perf_counter()
            metrics = train(
                steps, epochs=args.epochs, seed=seed, progress_bar=not args.no_progress_bar, g_every=args.g_every
            )
            results.setdefault(steps, []).append(metrics)
            print(
                f"[seed={seed} {method_name(steps)}] val_fd={metrics['val_fd']:.3f} val_is={metrics['val_is']:.3f} "
                f"d_loss={metrics['d_loss']:.3f} g_loss={metrics['g_loss']:.3f} ({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
    for runs in results.values():
        for metrics in runs:
            if not all(math.isfinite(v) for v in metrics.values()):
                print(f"warning: a run ended with non-finite metrics: {metrics}")

    header = ["method", "val_fd ↓", "val_is ↑", "Δ val_fd", "Δ val_is"]
    rows = []
    base = results[None]
    for steps in methods:
        runs = results[steps]
        row = [method_name(steps), *(summary([r[k] for r in runs], digits=3) for k in ("val_fd", "val_is"))]
        if steps is None:
            row += ["", ""]
        else:
            for key in ("val_fd", "val_is"):
                row.append(summary([r[key] - b[key] for r, b in zip(runs, base, strict=True)], signed=True, digits=3))
        rows.append(row)
    reference = reference_scores()
    epochs = f"{args.epochs} epoch" + ("s" if args.epochs > 1 else "")
    seeds = f"mean ± std over {args.seeds} seeds" if args.seeds > 1 else "1 seed"
    g_every = f", generator stepped every {args.g_every} batches" if args.g_every > 1 else ""
    caption = "Δ = XGrad - baseline, run for run at the same seed"
    print_table(f"Digits GAN, final validation after {epochs}{g_every}, {seeds}", caption, header, rows)
    print(
        f"real data for scale: val_fd {reference['val_fd']:.3f} between two halves of the digits, "
        f"val_is {reference['val_is']:.3f} of all the digits"
    )
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"wall time (all runs): {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
