"""The figures: the step timing's (per case, XGrad's hooks next to the optimizer's update, and the whole-step
overhead) and the compile sizes' (compiled over eager hooks by bucket size, with the default threshold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .steps import VARIANTS

LABELS = {"xgrad": "XGradCallback", "xgrad-compiled": "XGradCallback(compile=True)", "naive": "naive XGrad"}


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Per case: left, the optimizer's update next to XGrad's hooks and the naive hooks, in ms per step; right, the
    whole-step overhead of each variant (median over pairs of neighbouring steps) with its 95% bootstrap interval.
    ``summary`` is the JSON's ``summary``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(summary)
    variants = [v for v in VARIANTS if all(v in summary[c] for c in cases)]
    bars = {"optimizer update": [summary[c][variants[0]]["update_ms"] for c in cases]}
    bars.update({f"{LABELS[v]} hooks": [summary[c][v]["hooks_ms"] for c in cases] for v in variants})
    overhead_labels = {v: LABELS[v] for v in variants}
    fig, (left, right) = plt.subplots(1, 2, figsize=(4.0 + 3.8 * len(cases), 4.0))
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        left.bar([x + i * width for x in range(len(cases))], values, width, label=label)
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases)
    left.set_ylabel("ms per step (median)")
    left.set_title("time inside the hooks vs the optimizer's update", fontsize=10)
    left.legend(fontsize=7)
    width = 0.8 / len(overhead_labels)
    for i, (variant, label) in enumerate(overhead_labels.items()):
        values = [100 * summary[c][variant]["step_overhead"] for c in cases]
        low = [100 * summary[c][variant]["step_overhead_ci"][0] for c in cases]
        high = [100 * summary[c][variant]["step_overhead_ci"][1] for c in cases]
        errors = [
            [v - lo for v, lo in zip(values, low, strict=True)],
            [h - v for v, h in zip(values, high, strict=True)],
        ]
        right.bar([x + i * width for x in range(len(cases))], values, width, yerr=errors, capsize=3, label=label)
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_ylabel("whole-step overhead, % (median)")
    right.set_title("whole training step, with vs without (bars: 95% interval)", fontsize=10)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compile_sizes(sizes: dict[str, Any], path: Path) -> None:
    """Compiled over eager hooks against the bucket's parameter MiB (log scale), one marker per number of tensors;
    the line at 1 (even) and the default ``compile_min_bytes``, from which ``compile=True`` compiles. ``sizes`` is the
    JSON's ``compile_sizes``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sizes["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for tensors in sorted({row["tensors"] for row in rows}):
        chosen = sorted((row for row in rows if row["tensors"] == tensors), key=lambda row: row["bytes"])
        mib = [row["bytes"] / 2**20 for row in chosen]
        ax.plot(
            mib,
            [row["compiled_over_eager"] for row in chosen],
            "o-",
            label=f"{tensors} tensor{'s' if tensors > 1 else ''}",
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    threshold = sizes["default_min_bytes"] / 2**20
    ax.axvline(threshold, color="grey", linestyle="--", linewidth=1.0)
    ax.text(threshold * 1.08, ax.get_ylim()[1], f"default compile_min_bytes\n({threshold:g} MiB): compiled from here",
            fontsize=7, va="top")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("parameters in the bucket, MiB (log scale)")
    ax.set_ylabel("compiled / eager hooks (median)")
    ax.set_title("AdamW prediction + restore, compiled kernel forced vs eager (below 1: compiled faster)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
