"""The gap between AdamW with and without XGrad at points of a long run, and how it changes between them.

Runs with the same seed share initial weights and data order, so at every point the gap is the paired difference
``val_loss(XGrad) - val_loss(AdamW)`` seed by seed (negative: XGrad ahead), and the change of the gap from an
earlier point to a later one is again paired: ``gap_late - gap_early`` per seed, its mean and standard error over
seeds, judged by the same noise rule (``lightning_xgrad.sweep.stats``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lightning_xgrad.sweep import stats

Curve = Sequence[Mapping[str, float]]
METRIC = "val_loss"


def point_at(curve: Curve, fraction: float) -> tuple[int, float] | None:
    """``(steps trained, val_loss)`` of the first validation after at least ``fraction`` of the run's steps (the
    run's steps: those trained at its last validation); None for an empty curve. A row's ``step`` is the optimizer
    steps trained minus one, as Lightning logs it."""
    points = [(int(point["step"]) + 1, point[METRIC]) for point in curve if METRIC in point]
    if not points:
        return None
    total = points[-1][0]
    return next(p for p in points if p[0] >= fraction * total - 1e-9)


@dataclass(frozen=True)
class Gap:
    """At ``fraction`` of the run (``steps`` trained): seed -> val_loss of each arm, and the paired difference."""

    fraction: float
    steps: int | None
    baseline: dict[int, float]
    xgrad: dict[int, float]
    delta: stats.PairedDelta | None

    @property
    def per_seed(self) -> dict[int, float]:
        return dict(zip(self.delta.seeds, self.delta.deltas, strict=True)) if self.delta else {}


def gap_at(baseline: Mapping[int, Curve], xgrad: Mapping[int, Curve], fraction: float) -> Gap:
    """The gap at ``fraction``: both arms' curves (seed -> curve) read at the same point of the run."""
    values: list[dict[int, float]] = [{}, {}]
    steps = set()
    for arm, curves in enumerate((baseline, xgrad)):
        for seed, curve in curves.items():
            point = point_at(curve, fraction)
            if point is not None:
                steps.add(point[0])
                values[arm][seed] = point[1]
    if len(steps) > 1:
        raise ValueError(f"the runs validated at different steps at {fraction:.0%} of the run: {sorted(steps)}")
    delta = stats.paired_delta(values[1], values[0], "min")
    return Gap(fraction, steps.pop() if steps else None, values[0], values[1], delta)


#: what the change of the gap is called, by the earlier gap's sign (XGrad ahead: negative) and the change's verdict
GROWS, SHRINKS, REVERSES, PERSISTS = "grows", "shrinks", "reverses", "persists"


@dataclass(frozen=True)
class Trend:
    """How the gap changed from ``early`` to ``late``: the paired change ``gap_late - gap_early`` and its word."""

    early: Gap
    late: Gap
    change: stats.PairedDelta | None
    word: str


def trend(early: Gap, late: Gap) -> Trend:
    """``grows`` or ``shrinks`` (the gap's size, whichever arm is ahead at ``early``) when the change is beyond
    seed noise, ``reverses`` when it shrank past zero (the other arm ahead beyond noise at ``late``), ``persists``
    when the change is within noise, else what the rule said (too few seeds, non-finite)."""
    change = stats.paired_delta(late.per_seed, early.per_seed, "min")  # "better": the change is negative
    if change is None or early.delta is None:
        return Trend(early, late, change, "no paired seeds")
    if change.verdict == stats.NO_DIFFERENCE:
        return Trend(early, late, change, PERSISTS)
    if change.verdict not in (stats.BETTER, stats.WORSE):
        return Trend(early, late, change, change.verdict)
    toward_xgrad = change.verdict == stats.BETTER
    xgrad_ahead = early.delta.mean < 0
    if toward_xgrad == xgrad_ahead:
        return Trend(early, late, change, GROWS)
    reversed_ = late.delta is not None and late.delta.verdict == (stats.WORSE if xgrad_ahead else stats.BETTER)
    return Trend(early, late, change, REVERSES if reversed_ else SHRINKS)
