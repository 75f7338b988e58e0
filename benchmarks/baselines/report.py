"""The baselines report: the lr each arm won on the tuning split, the reported runs over seeds, and the verdicts of
the noise rule (``lightning_xgrad.sweep.stats``) for each method with XGrad against the method alone, each method
against AdamW, and each method against AdamW with XGrad; the curves as a figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.arms import delta_json
from lightning_xgrad.sweep import stats
from lightning_xgrad.sweep.plot import CurvePanel, plot_curves
from lightning_xgrad.sweep.report import PREDICTION_METRICS, failures, markdown_table
from lightning_xgrad.sweep.runs import FINISHED, RunResult

from .methods import METHODS, REFERENCE, Schedule, arm_key, arm_label
from .tuning import Pick

SECONDARY = "val_ppl"


@dataclass(frozen=True)
class Study:
    """Everything the report says: what ran, what tuning found, what the seeds gave."""

    command: str
    machine: str
    wall: float
    methods: tuple[str, ...]
    grid: tuple[float, ...]
    tune: Schedule
    final: Schedule
    seeds: tuple[int, ...]
    xgrad_steps: int
    #: arm key -> lr -> the tuning run's final tuning-split loss (None: no result)
    tuning: Mapping[str, Mapping[float, float | None]]
    picks: Mapping[str, Pick | None]
    #: arm key -> the reported runs, in seed order (absent: no lr was picked)
    results: Mapping[str, Sequence[RunResult]]
    #: every run's time added up, tuning runs included
    run_minutes: float = 0.0

    def arms(self) -> list[tuple[str, str]]:
        """(key, label) of every arm, each method without then with XGrad."""
        return [
            (arm_key(m, x), arm_label(m, self.xgrad_steps if x else 0)) for m in self.methods for x in (False, True)
        ]


def finals(runs: Sequence[RunResult], metric: str | None = None) -> dict[int, float]:
    """seed -> the final value of ``metric`` (default: the monitored val_loss) of every finished run."""
    values = {}
    for r in runs:
        value = r.final if metric is None else r.finals.get(metric)
        if r.status == FINISHED and value is not None:
            values[r.seed] = value
    return values


def comparisons(study: Study) -> list[tuple[str, str, str, str]]:
    """(section, row label, arm, reference arm) of every verdict the report gives."""
    alone = {m: arm_key(m, False) for m in study.methods}
    rows = [("xgrad", METHODS[m], arm_key(m, True), alone[m]) for m in study.methods]
    if REFERENCE in study.methods:
        others = [m for m in study.methods if m != REFERENCE]
        rows += [("vs adamw", METHODS[m], alone[m], alone[REFERENCE]) for m in others]
        rows += [("vs adamw + xgrad", METHODS[m], alone[m], arm_key(REFERENCE, True)) for m in others]
    return rows


def paired(study: Study, arm: str, reference: str) -> stats.PairedDelta | None:
    if arm not in study.results or reference not in study.results:
        return None
    return stats.paired_delta(finals(study.results[arm]), finals(study.results[reference]), "min")


SECTIONS = {
    "xgrad": "XGrad on each method: the method + XGrad s={s} against the method alone, each at its own lr",
    "vs adamw": "Each method against AdamW, both without XGrad, each at its own lr",
    "vs adamw + xgrad": "Each method alone against AdamW + XGrad s={s}, each at its own lr",
}


def _lr(lr: float) -> str:
    return f"{lr:g}"


def tuning_table(study: Study) -> list[str]:
    header = ["method", *(f"lr {_lr(lr)}" for lr in study.grid), "picked lr", "at the grid's edge"]
    rows = []
    for key, label in study.arms():
        losses, chosen = study.tuning.get(key, {}), study.picks.get(key)
        cells = []
        for lr in study.grid:
            loss = losses.get(lr)
            text = "no result" if loss is None else stats.format_value(loss)
            cells.append(f"**{text}**" if chosen is not None and chosen.lr == lr else text)
        edge = "" if chosen is None else (f"yes, the {chosen.edge}" if chosen.edge else "no")
        rows.append([label, *cells, "none" if chosen is None else _lr(chosen.lr), edge])
    return markdown_table(header, rows)


def edge_note(study: Study) -> str:
    at_edge = [(label, study.picks[key]) for key, label in study.arms() if study.picks.get(key) is not None]
    edges = [f"{label} (lr {_lr(p.lr)}, the {p.edge})" for label, p in at_edge if p is not None and p.edge]
    if not edges:
        return "Every pick lies inside the grid: a neighbour on each side had a higher tuning loss."
    return (
        f"At the grid's edge: {', '.join(edges)}; a lr beyond the grid might do better for "
        f"{'it' if len(edges) == 1 else 'them'}. {len(at_edge) - len(edges)} of {len(at_edge)} picks lie inside."
    )


def results_table(study: Study) -> list[str]:
    prediction = [(metric, header) for metric, header in PREDICTION_METRICS]
    header = ["method", "lr", "runs", "val_loss (mean ± std)", SECONDARY, *(h for _, h in prediction)]
    rows = []
    for key, label in study.arms():
        runs = study.results.get(key, [])
        chosen = study.picks.get(key)
        loss, ppl = finals(runs), finals(runs, SECONDARY)
        row = [label, "" if chosen is None else _lr(chosen.lr), f"{len(loss)}/{len(runs) or len(study.seeds)}"]
        row += [
            stats.format_spread(stats.Spread.of(list(loss.values()))),
            stats.format_spread(stats.Spread.of(list(ppl.values()))),
        ]
        for metric, _ in prediction:
            means = [r.xgrad_means[metric] for r in runs if r.status == FINISHED and metric in r.xgrad_means]
            row.append(stats.format_spread(stats.Spread.of(means)))
        rows.append(row)
    return markdown_table(header, rows)


def verdict_tables(study: Study) -> list[str]:
    lines: list[str] = []
    rows_by_section: dict[str, list[list[str]]] = {}
    for section, label, arm, reference in comparisons(study):
        delta = paired(study, arm, reference)
        if delta is None:
            row = [label, "", "", "no reported runs"]
        else:
            improved = "" if delta.verdict == stats.NOT_FINITE else f"{delta.improved}/{delta.count}"
            row = [label, stats.format_delta(delta), improved, delta.verdict]
        rows_by_section.setdefault(section, []).append(row)
    for section, rows in rows_by_section.items():
        header = ["method", "Δ val_loss (mean ± SE)", "seeds improved", "verdict"]
        lines += [f"## {SECTIONS[section].format(s=study.xgrad_steps)}", "", *markdown_table(header, rows), ""]
    return lines


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def schedule_text(schedule: Schedule) -> str:
    return (
        f"{plural(schedule.steps, 'step')} ({plural(schedule.epochs, 'epoch')} of {schedule.batches} batches, "
        f"warm-up {plural(schedule.warmup_steps, 'step')})"
    )


def run_minutes(results: Sequence[Sequence[RunResult]]) -> float:
    """The time every run that has a result took, added up (they may have run two at a time, or before a resume)."""
    return sum(r.seconds or 0.0 for runs in results for r in runs) / 60


def markdown(study: Study) -> str:
    grid = ", ".join(_lr(lr) for lr in study.grid)
    lines = [
        "# Baselines: the char-GPT with the optimizers users would pick instead, each with and without XGrad",
        "",
        f"Command: `{study.command}`  ",
        f"Machine: {study.machine}; wall time {study.wall / 60:.1f} min (this invocation); the runs took "
        f"{study.run_minutes:.1f} min in all (each run's time, added up).  ",
        f"Tuning: every method, without and with XGrad (s = {study.xgrad_steps}), at every lr of {{{grid}}}, seed 0, "
        f"{schedule_text(study.tune)}, the cosine decay ending at the last step; trained on the training split less "
        "a held-out tuning split (the 10% of every module's text just before its validation part) and validated on "
        "that tuning split. The lr with the lowest final tuning-split val_loss is picked, per method and per arm "
        "(with XGrad the best lr may differ).  ",
        f"Reported runs: every arm at its own picked lr, seeds {list(study.seeds)}, {schedule_text(study.final)}, "
        "trained on the whole training split and validated on the validation split (the one "
        "benchmarks/results/convergence.md reports), so the lr was never picked on the text it is judged on.",
        "",
        "## Learning rates picked (tuning-split val_loss, seed 0; the pick in bold)",
        "",
        *tuning_table(study),
        "",
        edge_note(study),
        "",
        f"## Reported runs (validation split, {len(study.seeds)} seeds)",
        "",
        *results_table(study),
        "",
        *verdict_tables(study),
        f"val_loss: the last validation of each run. Δ: the method's val_loss minus the reference's with the same seed "
        "(same initial weights and data order), mean ± its standard error (std of the differences / √seeds). A "
        f"verdict says better or worse only when |mean Δ| > {stats.NOISE_STANDARD_ERRORS:g} standard errors over at "
        f"least {stats.MIN_SEEDS} seeds: a screen for seed noise, not a significance test. Prediction cosine and "
        "error: XGradCallback's metrics, the mean over each run, then over seeds (see convergence.md).",
    ]
    failed = [line for key, _ in study.arms() for line in failures(study.results.get(key, []), "val_loss")]
    if failed:
        lines += ["", "Runs without a result:", "", *failed]
    return "\n".join(lines) + "\n"


def curves(study: Study) -> dict[str, list[list[dict[str, float]]]]:
    """arm key -> the reported runs' validation curves in seed order (empty for a run without a result)."""
    return {
        key: [r.curve if r.status == FINISHED else [] for r in sorted(runs, key=lambda r: r.seed)]
        for key, runs in study.results.items()
    }


def as_json(study: Study) -> dict[str, Any]:
    return {
        "command": study.command,
        "machine": study.machine,
        "wall_seconds": round(study.wall, 1),
        "run_minutes": round(study.run_minutes, 1),
        "methods": list(study.methods),
        "grid": list(study.grid),
        "tune": {"steps": study.tune.steps, "warmup_steps": study.tune.warmup_steps, "seed": 0},
        "final": {"steps": study.final.steps, "warmup_steps": study.final.warmup_steps},
        "seeds": list(study.seeds),
        "xgrad_steps": study.xgrad_steps,
        "tuning": {key: {_lr(lr): loss for lr, loss in losses.items()} for key, losses in study.tuning.items()},
        "picks": {
            key: None if p is None else {"lr": p.lr, "loss": p.loss, "edge": p.edge} for key, p in study.picks.items()
        },
        "comparisons": [
            {
                "section": section,
                "method": label,
                "arm": arm,
                "reference": reference,
                **(delta_json(paired(study, arm, reference)) or {"verdict": "no reported runs"}),
            }
            for section, label, arm, reference in comparisons(study)
        ],
        "labels": dict(study.arms()),
        "results": curves(study),
        "runs": {key: [r.as_json() for r in runs] for key, runs in study.results.items()},
    }


def plot(data: Mapping[str, Any], path: Path) -> bool:
    """From the JSON: every method alone against AdamW, then per method the method alone against it with XGrad."""
    results, labels, methods = data["results"], data["labels"], data["methods"]

    def panel(title: str, keys: Sequence[str]) -> CurvePanel:
        present = [key for key in keys if key in results]
        return CurvePanel(
            title,
            "val_loss",
            {i: dict(enumerate(results[key])) for i, key in enumerate(present)},
            {i: labels[key] for i, key in enumerate(present)},
        )

    panels = []
    if REFERENCE in methods and len(methods) > 1:
        panels.append(
            panel(
                "Each method vs AdamW",
                [arm_key(m, False) for m in [REFERENCE, *(m for m in methods if m != REFERENCE)]],
            )
        )
    panels += [panel(f"{METHODS[m]}: with and without XGrad", [arm_key(m, False), arm_key(m, True)]) for m in methods]
    return plot_curves([p for p in panels if p.curves], path)
