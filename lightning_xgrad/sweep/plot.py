"""Validation curves of a sweep: the metric per s (mean over seeds) and, below it, the paired difference against
s = 0, where differences too small to see on the metric's own scale are plain. Needs matplotlib (optional)."""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import NOISE_STANDARD_ERRORS

#: what the shaded bands mean, printed under the figure
BANDS = (
    "Lines: mean over seeds. Shaded: top, min to max over seeds; bottom, ±{k:g} standard errors of the paired "
    "difference (same seed, s minus s = 0)."
)


@dataclass(frozen=True)
class CurvePanel:
    """One task: its metric's curve per s and seed. ``curves[s][seed]`` is a list of points with ``epoch``,
    ``step`` and ``metric``; ``labels[s]`` names s in the legend (s = 0 is the baseline)."""

    title: str
    metric: str
    curves: Mapping[int, Mapping[int, Sequence[Mapping[str, float]]]]
    labels: Mapping[int, str]


def _x_axis(panel: CurvePanel) -> str:
    """Epochs when every curve has one point per epoch, else optimizer steps."""
    for per_seed in panel.curves.values():
        for curve in per_seed.values():
            epochs = [point.get("epoch") for point in curve]
            if None in epochs or len(set(epochs)) != len(epochs):
                return "step"
    return "epoch"


def _points(curve: Sequence[Mapping[str, float]], metric: str, axis: str) -> dict[float, float]:
    """x -> the metric, finite values only (a diverged run drops out where it diverged)."""
    offset = 1 if axis == "epoch" else 0  # epoch 0 ends after one epoch of training
    return {
        point[axis] + offset: point[metric]
        for point in curve
        if metric in point and axis in point and math.isfinite(point[metric])
    }


def _by_x(curves: Mapping[int, Mapping[float, float]]) -> dict[float, list[float]]:
    """x -> the values of the seeds that have one there (curves may end early or diverge)."""
    values: dict[float, list[float]] = {}
    for points in curves.values():
        for x, value in points.items():
            values.setdefault(x, []).append(value)
    return dict(sorted(values.items()))


def _marker(xs: Sequence[float]) -> str | None:
    """Dots on short curves only: on long ones they hide the line."""
    return "." if len(xs) <= 30 else None


def _zoom_on_second_half(ax: Any, spans: Sequence[tuple[float, float, float]]) -> None:
    """Fit the y axis to the second half of training when the first half would squash it: early differences are
    large and say little about where a run ends. What is cut off is marked on the axes."""
    if not spans:
        return
    middle = (min(x for x, _, _ in spans) + max(x for x, _, _ in spans)) / 2
    late = [(low, high) for x, low, high in spans if x >= middle]
    low, high = min(0.0, *(lo for lo, _ in late)), max(0.0, *(hi for _, hi in late))
    full_low, full_high = min(0.0, *(lo for _, lo, _ in spans)), max(0.0, *(hi for _, _, hi in spans))
    margin = 0.15 * (high - low) or 1e-12
    if (full_high - full_low) > 2.0 * (high - low + 2 * margin):
        ax.set_ylim(low - margin, high + margin)
        ax.text(
            0.02,
            0.96,
            "zoomed on the second half: early points off scale",
            transform=ax.transAxes,
            fontsize=7,
            va="top",
            color="0.35",
        )


def plot_curves(panels: Sequence[CurvePanel], path: Path) -> bool:
    """Write the figure to ``path``; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = len(panels)
    fig, axes = plt.subplots(
        2, columns, figsize=(4.8 * columns, 6.4), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 2]}
    )
    for column, panel in enumerate(panels):
        top, bottom = axes[0][column], axes[1][column]
        axis = _x_axis(panel)
        per_s = {
            s: {seed: _points(curve, panel.metric, axis) for seed, curve in per_seed.items() if curve}
            for s, per_seed in panel.curves.items()
        }
        positive = True
        colors = {}
        for s in panel.labels:
            by_x = _by_x(per_s.get(s, {}))
            if not by_x:
                continue
            xs, values = list(by_x), list(by_x.values())
            positive &= all(v > 0 for row in values for v in row)
            (line,) = top.plot(xs, [statistics.fmean(v) for v in values], label=panel.labels[s], marker=_marker(xs))
            colors[s] = line.get_color()
            top.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.15, color=colors[s])
        if positive and top.has_data():
            top.set_yscale("log")  # convergence curves span decades: the late epochs stay readable
        bottom.axhline(0.0, color=colors.get(0, "black"), linewidth=1, label=panel.labels.get(0, "s = 0"))
        baseline = per_s.get(0, {})
        spans: list[tuple[float, float, float]] = []
        for s in panel.labels:
            if s == 0 or s not in colors:
                continue
            paired = {
                seed: {x: value - baseline[seed][x] for x, value in points.items() if x in baseline[seed]}
                for seed, points in per_s[s].items()
                if seed in baseline
            }
            by_x = _by_x(paired)
            if not by_x:
                continue
            xs, deltas = list(by_x), list(by_x.values())
            means = [statistics.fmean(d) for d in deltas]
            bottom.plot(xs, means, color=colors[s], marker=_marker(xs), label=panel.labels[s])
            # ±2 standard errors where two or more seeds are paired
            half = [
                NOISE_STANDARD_ERRORS * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0 for d in deltas
            ]
            if any(len(d) > 1 for d in deltas):
                low = [m - h for m, h in zip(means, half, strict=True)]
                high = [m + h for m, h in zip(means, half, strict=True)]
                bottom.fill_between(xs, low, high, alpha=0.15, color=colors[s])
            spans += [(x, m - h, m + h) for x, m, h in zip(xs, means, half, strict=True)]
        _zoom_on_second_half(bottom, spans)
        top.set_title(panel.title)
        top.set_ylabel(panel.metric + (" (log scale)" if top.get_yscale() == "log" else ""))
        bottom.set_ylabel(f"Δ {panel.metric} vs {panel.labels.get(0, 's = 0')}")
        bottom.set_xlabel(axis)
        for ax in (top, bottom):
            ax.grid(alpha=0.3, which="both" if ax is top else "major")
        if top.get_legend_handles_labels()[0]:
            top.legend(fontsize=8)
    footer = textwrap.wrap(BANDS.format(k=NOISE_STANDARD_ERRORS), width=80 * columns)
    fig.text(0.5, 0.005, "\n".join(footer), ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.01 + 0.025 * len(footer), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
