"""Seed statistics of a sweep: mean and spread per s, the paired difference against s = 0, and the verdict.

Runs with the same seed share initial weights and data order, so the difference that XGrad makes is measured seed
by seed (a paired difference) and its noise by the standard error of those differences over seeds. The rule that
names a winner is deliberately simple: a mean paired difference beyond ``NOISE_STANDARD_ERRORS`` standard errors
over at least ``MIN_SEEDS`` seeds. It screens out seed noise; it is not a significance test (with 3 seeds, pure
noise passes it about one time in five: Student's t with 2 degrees of freedom), and more seeds make it stricter.
Pure Python: no Lightning, no NumPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Mode = Literal["min", "max"]
MODES: tuple[str, ...] = ("min", "max")
#: the fewest seeds whose paired differences may name a better or worse s
MIN_SEEDS = 3
#: how many standard errors the mean paired difference must clear
NOISE_STANDARD_ERRORS = 2.0

BASELINE = "baseline"
BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no difference detected"
NOT_FINITE = "non-finite metric"


def too_few_seeds(count: int) -> str:
    return f"too few seeds ({count} < {MIN_SEEDS})"


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation of one metric over seeds, of its finite values (std is None below two);
    ``non_finite`` counts the NaN and infinite values left out (diverged runs)."""

    count: int
    mean: float
    std: float | None
    non_finite: int = 0

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        finite = [v for v in values if math.isfinite(v)]
        mean = statistics.fmean(finite) if finite else math.nan
        std = statistics.stdev(finite) if len(finite) > 1 else None
        return cls(len(finite), mean, std, len(values) - len(finite))


@dataclass(frozen=True)
class PairedDelta:
    """``values[seed] - reference[seed]`` over the seeds both have, and what it says.

    ``standard_error`` is the sample standard deviation of the differences over sqrt(n) (None below two seeds);
    ``improved`` counts seeds where ``values`` is better than ``reference`` in the direction ``mode`` says.
    """

    seeds: tuple[int, ...]
    deltas: tuple[float, ...]
    mean: float
    standard_error: float | None
    improved: int
    verdict: str

    @property
    def count(self) -> int:
        return len(self.deltas)


def paired_delta(values: Mapping[int, float], reference: Mapping[int, float], mode: Mode) -> PairedDelta | None:
    """The paired difference of ``values`` against ``reference`` (both: seed -> final metric); None without a
    common seed. The verdict is ``better`` or ``worse`` only when the mean difference is beyond
    ``NOISE_STANDARD_ERRORS`` standard errors over at least ``MIN_SEEDS`` seeds."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    seeds = tuple(seed for seed in values if seed in reference)
    if not seeds:
        return None
    deltas = tuple(values[seed] - reference[seed] for seed in seeds)
    if not all(math.isfinite(d) for d in deltas):
        return PairedDelta(seeds, deltas, math.nan, None, 0, NOT_FINITE)
    mean = statistics.fmean(deltas)
    se = statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) > 1 else None
    sign = -1.0 if mode == "min" else 1.0  # > 0: better
    improved = sum(sign * d > 0 for d in deltas)
    if len(deltas) < MIN_SEEDS:
        verdict = too_few_seeds(len(deltas))
    elif abs(mean) > NOISE_STANDARD_ERRORS * (se or 0.0):
        verdict = BETTER if sign * mean > 0 else WORSE
    else:
        verdict = NO_DIFFERENCE
    return PairedDelta(seeds, deltas, mean, se, improved, verdict)


def format_value(value: float | None) -> str:
    """Four significant digits (metrics of any scale), a real minus sign for negative numbers."""
    if value is None:
        return ""
    return f"{value:.4g}".replace("-", "−")


def format_signed(value: float) -> str:
    text = f"{value:+.4g}"
    return text.replace("-", "−")


def format_spread(spread: Spread | None) -> str:
    if spread is None:
        return ""
    if not spread.count:
        return f"{spread.non_finite} non-finite"
    text = format_value(spread.mean) if spread.std is None else f"{format_value(spread.mean)} ± {spread.std:.4g}"
    return text + (f" ({spread.non_finite} non-finite left out)" if spread.non_finite else "")


def format_delta(delta: PairedDelta | None) -> str:
    if delta is None or not math.isfinite(delta.mean):
        return ""
    if delta.standard_error is None:
        return format_signed(delta.mean)
    return f"{format_signed(delta.mean)} ± {delta.standard_error:.4g}"


def verdict(finals: Mapping[int, Mapping[int, float]], mode: Mode, metric: str) -> str:
    """One sentence: the best s, or that no difference was detected. ``finals``: s -> seed -> final metric; s = 0
    is the baseline. The best s is the one with the best mean paired difference among those that beat s = 0 beyond
    seed noise; the sentence says whether it also beats the runner-up beyond noise."""
    baseline = finals.get(0, {})
    compared = {s: paired_delta(values, baseline, mode) for s, values in sorted(finals.items()) if s != 0}
    deltas = {s: d for s, d in compared.items() if d is not None}
    if not compared:
        return "no s > 0 to compare with s = 0"
    if not deltas or all(d.count < MIN_SEEDS or d.verdict == NOT_FINITE for d in deltas.values()):
        return (
            f"too few seeds for a verdict: it needs at least {MIN_SEEDS} seeds finished with a finite {metric} "
            "both at s = 0 and at the s compared"
        )
    better = sorted((s for s, d in deltas.items() if d.verdict == BETTER), key=lambda s: abs(deltas[s].mean))
    worse = [s for s, d in deltas.items() if d.verdict == WORSE]
    diverged = [s for s, d in deltas.items() if d.verdict == NOT_FINITE]
    notes = []
    if worse:
        notes.append(f"worse than s = 0 beyond seed noise at s = {_join(worse)}")
    if diverged:
        notes.append(f"a non-finite {metric} at s = {_join(diverged)}")
    if not better:
        text = f"no difference detected: no s beats s = 0 by more than {NOISE_STANDARD_ERRORS:g} standard errors"
        return text + "".join(f"; {note}" for note in notes)
    best = better[-1]
    d = deltas[best]
    text = (
        f"best s = {best}: {metric} {format_delta(d)} (mean ± standard error of the paired difference) against "
        f"s = 0, better on {d.improved} of {d.count} seeds"
    )
    if len(better) > 1:
        runner_up = better[-2]
        head_to_head = paired_delta(finals[best], finals[runner_up], mode)
        assert head_to_head is not None
        if head_to_head.verdict == BETTER:
            text += f"; it also beats s = {runner_up} beyond seed noise ({format_delta(head_to_head)})"
        else:
            others = _join([s for s in better if s != best])
            text += (
                f"; s = {others} also beat{'s' if len(better) == 2 else ''} s = 0, and s = {best} against "
                f"s = {runner_up} is within seed noise ({format_delta(head_to_head)})"
            )
    return text + "".join(f"; {note}" for note in notes)


def _join(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)
