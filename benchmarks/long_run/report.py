"""The long-run report: the final table, the gap at points of the run, how it changed, and the curves."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.arms import delta_json
from lightning_xgrad.sweep import report as sweep_report
from lightning_xgrad.sweep import stats
from lightning_xgrad.sweep.plot import CurvePanel, plot_curves
from lightning_xgrad.sweep.runs import FINISHED, RunResult

from .gaps import GROWS, PERSISTS, REVERSES, SHRINKS, Gap, Trend

MONITOR, SECONDARY = "val_loss", "val_ppl"


@dataclass(frozen=True)
class LongRun:
    """What ran and what it gave: the baseline's and XGrad's runs (in seed order), the gaps and their trends."""

    command: str
    machine: str
    wall: float
    epochs: int
    batches: int
    warmup_steps: int | None
    xgrad_steps: int
    seeds: tuple[int, ...]
    labels: tuple[str, str]
    baseline: Sequence[RunResult]
    xgrad: Sequence[RunResult]
    gaps: Sequence[Gap]
    trends: Sequence[Trend]
    log_every_n_steps: int | None = None

    @property
    def steps(self) -> int:
        return self.epochs * self.batches


def curves(runs: Sequence[RunResult]) -> list[list[dict[str, float]]]:
    """The validation curves in seed order, empty for a run without a result (position i stays seed i)."""
    return [r.curve if r.status == FINISHED else [] for r in sorted(runs, key=lambda r: r.seed)]


def final_table(run: LongRun) -> list[str]:
    """The sweep's table (s = 0: AdamW, s = the XGrad arm's): final val_loss and val_ppl, paired Δ, verdict."""
    results = [*run.baseline, *(dataclasses.replace(r, steps=run.xgrad_steps) for r in run.xgrad)]
    labels = {0: run.labels[0], run.xgrad_steps: run.labels[1]}
    return sweep_report.table(results, MONITOR, "min", labels, "method", (SECONDARY,))


def _fraction(gap: Gap) -> str:
    return f"{gap.fraction:.0%}"


def gap_table(run: LongRun) -> list[str]:
    header = ["point of the run", "steps", f"{run.labels[0]} val_loss", f"{run.labels[1]} val_loss"]
    header += ["Δ val_loss (mean ± SE)", "seeds improved", "verdict"]
    rows = []
    for gap in run.gaps:
        d = gap.delta
        rows.append(
            [
                _fraction(gap),
                "" if gap.steps is None else f"{gap.steps:,}",
                stats.format_spread(stats.Spread.of(list(gap.baseline.values()))),
                stats.format_spread(stats.Spread.of(list(gap.xgrad.values()))),
                stats.format_delta(d),
                "" if d is None or d.verdict == stats.NOT_FINITE else f"{d.improved}/{d.count}",
                "no paired seeds" if d is None else d.verdict,
            ]
        )
    return sweep_report.markdown_table(header, rows)


def trend_table(run: LongRun) -> list[str]:
    header = ["from", "to", "Δ then", "Δ at the end", "change of Δ (mean ± SE)", "the gap"]
    rows = [
        [
            _fraction(t.early),
            _fraction(t.late),
            stats.format_delta(t.early.delta),
            stats.format_delta(t.late.delta),
            stats.format_delta(t.change),
            t.word,
        ]
        for t in run.trends
    ]
    return sweep_report.markdown_table(header, rows)


def summary(run: LongRun) -> str:
    """One sentence per trend: how the gap went from each earlier point to the end."""
    if not run.trends:
        return "No trend: the runs have no paired validation points."
    sentences = [
        f"from {_fraction(t.early)} to {_fraction(t.late)} of the run the gap {_says(t.word)} (Δ "
        f"{stats.format_delta(t.early.delta)} → {stats.format_delta(t.late.delta)}, change "
        f"{stats.format_delta(t.change)})"
        for t in run.trends
    ]
    return "**Verdict**: " + "; ".join(sentences) + "."


def _says(word: str) -> str:
    return word if word in (GROWS, SHRINKS, REVERSES, PERSISTS) else f"cannot be judged: {word}"


def markdown(run: LongRun) -> str:
    warmup = "100 steps as in the config" if run.warmup_steps is None else f"{run.warmup_steps} steps"
    lines = [
        f"# Long run: {run.labels[0]} with and without XGrad over {run.steps:,} steps",
        "",
        f"Command: `{run.command}`  ",
        f"Machine: {run.machine}; wall time {run.wall / 60:.1f} min (this invocation).  ",
        f"The char-GPT config (examples/configs/char_gpt.yaml) trained {run.epochs} epochs of {run.batches} batches "
        f"({run.steps:,} steps) instead of the config's 10 epochs of 100: warm-up {warmup}, then the cosine decay "
        "to 0.1 × lr stretched to the last step (the schedule reads `trainer.estimated_stepping_batches`); "
        f"validated every epoch on the reported split; seeds {list(run.seeds)}.",
        "",
        "## At the end",
        "",
        *final_table(run),
        "",
        "## The gap along the run (Δ: XGrad minus AdamW, same seed; negative: XGrad ahead)",
        "",
        *gap_table(run),
        "",
        *trend_table(run),
        "",
        summary(run),
        "",
        "Each point: the first validation after that fraction of the run's steps, the same for every run. The "
        "change of Δ is paired too: Δ at the end minus Δ then, seed by seed, mean ± its standard error. The gap "
        f"grows or shrinks only when that change is beyond {stats.NOISE_STANDARD_ERRORS:g} standard errors over at "
        f"least {stats.MIN_SEEDS} seeds (reverses: it shrank past zero, the other arm ahead beyond noise at the end); "
        "it persists when the change is within seed noise.",
        "",
        sweep_report.explanation("val_loss", "min"),
    ]
    prediction = sweep_report.prediction_explanation(list(run.xgrad), run.log_every_n_steps)
    if prediction:
        lines += ["", prediction]
    failed = sweep_report.failures([*run.baseline, *run.xgrad], MONITOR)
    if failed:
        lines += ["", "Runs without a result:", "", *failed]
    return "\n".join(lines) + "\n"


def as_json(run: LongRun) -> dict[str, Any]:
    return {
        "command": run.command,
        "machine": run.machine,
        "wall_seconds": round(run.wall, 1),
        "epochs": run.epochs,
        "batches": run.batches,
        "steps": run.steps,
        "warmup_steps": run.warmup_steps,
        "xgrad_steps": run.xgrad_steps,
        "seeds": list(run.seeds),
        "labels": {"0": run.labels[0], str(run.xgrad_steps): run.labels[1]},
        "gaps": [
            {
                "fraction": g.fraction,
                "steps": g.steps,
                "baseline": {str(k): v for k, v in g.baseline.items()},
                "xgrad": {str(k): v for k, v in g.xgrad.items()},
                "delta": delta_json(g.delta),
            }
            for g in run.gaps
        ],
        "trends": [
            {"from": t.early.fraction, "to": t.late.fraction, "change": delta_json(t.change), "gap": t.word}
            for t in run.trends
        ],
        "results": {"0": curves(run.baseline), str(run.xgrad_steps): curves(run.xgrad)},
        "runs": [r.as_json() for r in [*run.baseline, *run.xgrad]],
    }


def plot(data: Mapping[str, Any], path: Path) -> bool:
    """From the JSON: the validation curves of both arms over the whole run, over their paired difference."""
    labels = {int(s): label for s, label in data["labels"].items()}
    per_s = {int(s): dict(enumerate(runs)) for s, runs in data["results"].items()}
    title = f"char-GPT, {data['steps']:,} steps"
    return plot_curves([CurvePanel(title, MONITOR, per_s, labels)], path)
