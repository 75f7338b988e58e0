"""The step timing's figure: per case, XGrad's hooks next to the optimizer's update, and the whole-step overhead."""

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
