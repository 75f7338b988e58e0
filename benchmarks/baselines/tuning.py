"""The lr each arm is run at: the grid value with the lowest final tuning-split loss (seed 0, the short run)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lightning_xgrad.sweep.runs import FINISHED, RunResult


def tuning_losses(results: Mapping[float, Sequence[RunResult]]) -> dict[float, float | None]:
    """lr -> the tuning run's last ``val_loss`` (on the tuning split); None for a run without a result. A diverged
    run keeps its non-finite loss: it is never picked."""
    losses: dict[float, float | None] = {}
    for lr, runs in sorted(results.items()):
        finished = [r.final for r in runs if r.status == FINISHED and r.final is not None]
        losses[lr] = finished[0] if finished else None
    return losses


@dataclass(frozen=True)
class Pick:
    """The best lr of a grid and where it sits: ``edge`` is "lowest" or "highest" when it is the grid's end (the
    best lr may lie beyond it), else None."""

    lr: float
    loss: float
    edge: str | None


def pick(losses: Mapping[float, float | None]) -> Pick | None:
    """The lr with the lowest finite loss (the smaller lr on a tie); None when no run has one."""
    finite = {lr: loss for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}
    if not finite:
        return None
    best = min(finite, key=lambda lr: (finite[lr], lr))
    grid = sorted(losses)
    edge = None
    if len(grid) > 1:
        edge = "lowest" if best == grid[0] else "highest" if best == grid[-1] else None
    return Pick(best, finite[best], edge)
