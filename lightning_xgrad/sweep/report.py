"""The sweep's table and verdict as Markdown, and its results.json: per s, the metric over seeds and the paired
difference against s = 0 (see :mod:`.stats`), from the runs' results (see :mod:`.runs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import stats
from .runs import FAILED, FINISHED, NO_METRIC, RunResult

#: XGradCallback's prediction metrics, and the header of their columns
PREDICTION_METRICS = (("xgrad/prediction_cosine", "prediction cosine"), ("xgrad/prediction_error", "prediction error"))


def finals_by_steps(results: Sequence[RunResult], metric: str | None = None) -> dict[int, dict[int, float]]:
    """s -> seed -> the final value of ``metric`` (default: the monitored one) of every finished run."""
    finals: dict[int, dict[int, float]] = {}
    for r in results:
        finals.setdefault(r.steps, {})
        if r.status != FINISHED:
            continue
        value = r.final if metric is None else r.finals.get(metric)
        if value is not None:
            finals[r.steps][r.seed] = value
    return finals


def prediction_columns(results: Sequence[RunResult]) -> list[tuple[str, str]]:
    """``(metric, column header)`` for the prediction metrics the runs logged: one column per metric, or per
    optimizer where the runs had several (``xgrad/prediction_cosine/optimizer_0``: "prediction cosine, optimizer 0")."""
    logged = sorted({name for r in results for name in r.xgrad_means})
    columns = []
    for metric, header in PREDICTION_METRICS:
        for name in logged:
            if name == metric:
                columns.append((name, header))
            elif name.startswith(metric + "/"):
                columns.append((name, f"{header}, {name[len(metric) + 1 :].replace('_', ' ')}"))
    return columns


def run_means(results: Sequence[RunResult], metric: str) -> dict[int, list[float]]:
    """s -> the run means of an XGradCallback metric, over the finished runs that logged it."""
    means: dict[int, list[float]] = {}
    for r in results:
        if r.status == FINISHED and metric in r.xgrad_means:
            means.setdefault(r.steps, []).append(r.xgrad_means[metric])
    return means


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table with padded columns, so it reads as well in a terminal as rendered."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|", *(line(r) for r in rows)]


def table(
    results: Sequence[RunResult],
    monitor: str,
    mode: stats.Mode,
    labels: Mapping[int, str],
    label_header: str = "s",
    more_metrics: Sequence[str] = (),
) -> list[str]:
    """One row per s (in ``labels``' order): finished runs, mean ± std over seeds of the monitored metric (and of
    ``more_metrics``), the paired difference against s = 0 with its standard error, seeds improved, verdict, and
    where the runs logged them, XGradCallback's prediction metrics (see :func:`prediction_explanation`)."""
    finals = finals_by_steps(results)
    totals = {s: sum(r.steps == s for r in results) for s in labels}
    prediction = [(header, run_means(results, metric)) for metric, header in prediction_columns(results)]
    header = [
        label_header,
        "runs",
        f"{monitor} (mean ± std)",
        *more_metrics,
        f"Δ {monitor} vs s=0 (mean ± SE)",
        "seeds improved",
        "verdict",
        *(name for name, _ in prediction),
    ]
    rows = []
    for s, label in labels.items():
        values = finals.get(s, {})
        row = [label, f"{len(values)}/{totals[s]}", stats.format_spread(stats.Spread.of(list(values.values())))]
        for metric in more_metrics:
            row.append(stats.format_spread(stats.Spread.of(list(finals_by_steps(results, metric).get(s, {}).values()))))
        if s == 0:
            row += ["", "", stats.BASELINE]
        else:
            delta = stats.paired_delta(values, finals.get(0, {}), mode)
            if delta is None:
                row += ["", "", "no paired seeds"]
            else:
                improved = "" if delta.verdict == stats.NOT_FINITE else f"{delta.improved}/{delta.count}"
                row += [stats.format_delta(delta), improved, delta.verdict]
        row += [stats.format_spread(stats.Spread.of(means.get(s, []))) for _, means in prediction]
        rows.append(row)
    return markdown_table(header, rows)


def explanation(metric: str, mode: stats.Mode | None = None) -> str:
    """What the table's numbers are and what the verdict rule is."""
    direction = "" if mode is None else f" ({'lower' if mode == 'min' else 'higher'} is better)"
    return (
        f"{metric}: its last logged value in each run{direction}; mean ± sample std over seeds. Δ: the metric at "
        "s minus the metric at s = 0 with the same seed, mean ± its standard error (std of the differences / "
        f"√seeds). A verdict names s better or worse only when |mean Δ| > {stats.NOISE_STANDARD_ERRORS:g} standard "
        f"errors over at least {stats.MIN_SEEDS} seeds: a screen for seed noise, not a significance test (with 3 "
        "seeds, noise alone passes it about one time in five; more seeds make it stricter)."
    )


def prediction_explanation(results: Sequence[RunResult], log_every_n_steps: int | None = None) -> str:
    """What the prediction columns are and what they can and cannot say; empty when no run logged them."""
    if not prediction_columns(results):
        return ""
    every = "`log_every_n_steps`" if log_every_n_steps is None else str(log_every_n_steps)
    return (
        "prediction cosine, prediction error: XGradCallback's `xgrad/prediction_cosine` (the cosine between the "
        "prediction W_hat − W and the update W_next − W the optimizer then applied) and `xgrad/prediction_error` "
        f"(‖(W_hat − W) − s·(W_next − W)‖ / ‖s·(W_next − W)‖), logged every {every} optimizer steps: the "
        "mean of each run's logged values over the whole run, then mean ± sample std over seeds. They say how "
        "closely the prediction followed the trajectory (near 0 or negative: XGrad extrapolated noise), not whether "
        "the gradient taken at W_hat was a better one: read them next to Δ, not instead of it."
    )


def describe(result: RunResult, monitor: str) -> str:
    """Why a run has no result."""
    if result.status == NO_METRIC:
        return f"{NO_METRIC} (it exited cleanly but never logged {monitor})"
    if result.status == FAILED:
        return f"{FAILED} (exit status {result.returncode})"
    return result.status


def failures(results: Sequence[RunResult], monitor: str) -> list[str]:
    """One line per run that did not finish with the monitored metric."""
    return [
        f"- s={r.steps} seed={r.seed}: {describe(r, monitor)}" + (f", log: `{r.log}`" if r.log else "")
        for r in results
        if r.status != FINISHED
    ]
