"""The benchmark figures the README and the docs quote are the published results' figures: every cell of the
convergence, prediction metrics, companion and overhead tables, and the numbers the first screen quotes (the README's
and the docs home page's), read back from ``benchmarks/results/*.md``. Each table is checked in every file that
shows it (``TABLES``).

A republished benchmark whose README or docs page was not updated (or one edited by hand) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: the first line of each table's header -> the files that show it (each must)
TABLES = {
    "task | baseline": ("README.md", "docs/benchmarks.md"),
    "task | s | prediction cosine": ("docs/prediction-metrics.md",),
    "digits, AdamW (`digits_cprop.yaml`)": ("docs/companions.md",),
    "digits (`digits_ahb.yaml`, lr 0.05)": ("docs/companions.md",),
    "model, optimizer": ("docs/benchmarks.md",),
    "point of the run": ("docs/benchmarks.md",),
    "method | lr 0.001": ("docs/benchmarks.md",),
    "method | lr | runs": ("docs/benchmarks.md",),
}
#: the files whose first screen (up to the first ``## `` heading) quotes the headline figures
FIRST_SCREENS = ("README.md", "docs/index.md")

#: convergence-table label -> (task, metric)
CONVERGENCE_ROWS = {
    "digits, SGD momentum: val_loss": ("digits_sgd", "val_loss"),
    "digits, AdamW: val_loss": ("digits_adamw", "val_loss"),
    "char GPT, AdamW: val_loss": ("char_gpt", "val_loss"),
    "char GPT: val_ppl": ("char_gpt", "val_ppl"),
    "digits GAN, Adam x 2: val_fd": ("digits_gan", "val_fd"),
}
#: overhead-table label -> case
OVERHEAD_ROWS = {
    "CNN, AdamW": "cnn-adamw",
    "CNN, SGD momentum": "cnn-sgd",
    "MLP, AdamW": "mlp-adamw",
    "MLP, SGD momentum": "mlp-sgd",
}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """The first table under each ``## heading``, as rows keyed by the header's cells; the key is the heading's first
    word."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading, header = line[3:].split()[0], None
        elif line.startswith("|") and heading and heading not in tables:
            header = _cells(line)
            tables[heading] = []
        elif line.startswith("|") and header is not None:
            if not set(line) <= set("|-: "):
                tables[heading].append(dict(zip(header, _cells(line), strict=True)))
        else:
            header = None
    return tables


def _text(name: str) -> str:
    return (REPO / name).read_text()


def _shown_table(name: str, first_header_cell: str) -> dict[str, list[str]]:
    """The table of file ``name`` whose header starts with ``first_header_cell``: label -> the other cells."""
    assert name in TABLES[first_header_cell], f"add {name} to TABLES[{first_header_cell!r}]"
    lines = _text(name).splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |")]
    assert len(starts) == 1, f"{name} has {len(starts)} tables headed {first_header_cell!r}, not one"
    start = starts[0]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        rows[cells[0]] = cells[1:]
    return rows


def _by_method(name: str) -> dict[str, dict[str, dict[str, str]]]:
    """task -> method ("baseline", "XGrad s=1", ...) -> column -> cell, from a published convergence report."""
    tables = _tables((RESULTS / f"{name}.md").read_text())
    return {task: {row["method"]: row for row in rows} for task, rows in tables.items() if rows}


def _column(row: dict[str, str], prefix: str) -> str:
    """The cell of the column named ``prefix`` or starting with it ("val_loss (mean ± std)", "Δ val_loss vs ...")."""
    return next(cell for name, cell in row.items() if name == prefix or name.startswith(f"{prefix} "))


def _delta(row: dict[str, str]) -> str:
    """How the tables quote a paired difference: "Δ (seeds better, verdict)"."""
    return f"{_column(row, 'Δ')} ({row['seeds improved']}, {row['verdict']})"


@pytest.fixture(scope="module")
def convergence() -> dict[str, dict[str, dict[str, str]]]:
    return _by_method("convergence")


@pytest.fixture(scope="module")
def companions() -> dict[str, dict[str, dict[str, str]]]:
    return _by_method("companions")


@pytest.fixture(scope="module")
def overhead() -> dict[tuple[str, str], dict[str, str]]:
    """(case, variant) -> column -> cell, from the first table of the published overhead.md."""
    text = (RESULTS / "overhead.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = _cells(lines[0])
    rows = {}
    for line in lines[1:]:
        cells = _cells(line)
        if cells[0] == "case":  # the next table
            break
        row = dict(zip(header, cells, strict=True))
        rows[row["case"], row["variant"]] = row
    return rows


@pytest.mark.parametrize("name", TABLES["task | baseline"])
def test_the_convergence_table_is_the_published_one(convergence, name: str) -> None:
    shown = _shown_table(name, "task | baseline")
    assert set(shown) == set(CONVERGENCE_ROWS)
    for label, (task, metric) in CONVERGENCE_ROWS.items():
        published = convergence[task]
        runs = [published[method] for method in ("baseline", "XGrad s=1", "XGrad s=2")]
        expected = [_column(row, metric) for row in runs]
        expected += ["", ""] if metric == "val_ppl" else [_delta(row) for row in runs[1:]]
        assert shown[label] == expected, label


@pytest.mark.parametrize("name", TABLES["task | s | prediction cosine"])
def test_the_prediction_metrics_table_is_the_published_one(convergence, companions, name: str) -> None:
    shown = _shown_table(name, "task | s | prediction cosine")
    tasks = {
        "digits, SGD momentum": (convergence["digits_sgd"], "XGrad"),
        "digits, AdamW": (convergence["digits_adamw"], "XGrad"),
        "char GPT, AdamW": (convergence["char_gpt"], "XGrad"),
        "digits, adaptive heavy-ball SGD": (companions["digits_ahb"], "heavy-ball + XGrad"),
    }
    lines = [line for line in _text(name).splitlines() if line.startswith(tuple(f"| {label} | " for label in tasks))]
    assert len(lines) == 2 * len(tasks) and len(shown) == len(tasks)  # one row per task and s
    for line in lines:
        label, s, cosine, error, delta = _cells(line)
        published, prefix = tasks[label]
        row = published[f"{prefix} s={s}"]
        assert [cosine, error, delta] == [row["prediction cosine"], row["prediction error"], _delta(row)], line


def test_the_companion_tables_are_the_published_ones(convergence, companions) -> None:
    """Each companion table's rows: the main benchmark's baseline, the method alone, the method with XGrad s = 1, 2."""
    for header, (task, method, baseline_task, names) in {
        "digits, AdamW (`digits_cprop.yaml`)": ("digits_cprop", "CProp", "digits_adamw", ["AdamW + CProp"]),
        "digits (`digits_ahb.yaml`, lr 0.05)": ("digits_ahb", "heavy-ball", "digits_sgd", ["adaptive heavy-ball SGD"]),
    }.items():
        (name,) = TABLES[header]
        shown = list(_shown_table(name, header).values())
        published = companions[task]
        runs = [convergence[baseline_task]["baseline"], published[f"{method} alone"]]
        runs += [published[f"{method} + XGrad s={s}"] for s in (1, 2)]
        assert len(names) == 1 and len(shown) == len(runs), header
        for cells, row in zip(shown, runs, strict=True):
            metrics = [name.split()[0] for name in row if name.startswith("val_")]
            assert cells == [_column(row, metric) for metric in metrics], header


@pytest.fixture(scope="module")
def long_run() -> dict:
    return json.loads((RESULTS / "long_run.json").read_text())


@pytest.mark.parametrize("name", TABLES["point of the run"])
def test_the_long_run_table_is_the_published_one(name: str) -> None:
    published = _tables((RESULTS / "long_run.md").read_text())["The"]  # "## The gap along the run"
    shown = _shown_table(name, "point of the run")
    assert shown == {row["point of the run"]: [cell for key, cell in row.items() if key != "point of the run"]
                     for row in published}  # fmt: skip


@pytest.mark.parametrize("name", FIRST_SCREENS)
def test_the_first_screen_says_whether_the_gain_lasts(long_run, name: str) -> None:
    first = " ".join(_first_screen(name).split())
    gaps = {gap["fraction"]: gap for gap in long_run["gaps"]}
    assert {0.2, 0.5, 1.0} <= set(gaps) and long_run["steps"] == 5000
    assert all(gap["delta"]["verdict"] == "better" for gap in gaps.values())
    assert [trend["gap"] for trend in long_run["trends"]] == ["shrinks", "shrinks"]
    early, middle, end = (_signed(gaps[f]["delta"]["mean"], 3) for f in (0.2, 0.5, 1.0))
    assert f"shrank from {early} at 1,000 steps to {middle} at 2,500 and {end} at the end" in first
    assert gaps[1.0]["delta"]["improved"] == 3 and "still better on every seed" in first


@pytest.fixture(scope="module")
def baselines() -> dict:
    return json.loads((RESULTS / "baselines.json").read_text())


@pytest.mark.parametrize(("header", "heading"), [("method | lr 0.001", "Learning"), ("method | lr | runs", "Reported")])
def test_the_baselines_tables_are_the_published_ones(header: str, heading: str) -> None:
    """The tuning table and the reported runs, as ``## Learning rates picked`` and ``## Reported runs`` publish them."""
    published = _tables((RESULTS / "baselines.md").read_text())[heading]
    for name in TABLES[header]:
        shown = _shown_table(name, header)
        assert shown == {row["method"]: [cell for key, cell in row.items() if key != "method"] for row in published}


@pytest.mark.parametrize("name", FIRST_SCREENS)
def test_the_first_screen_compares_with_the_alternatives(baselines, name: str) -> None:
    """The final val_loss of each arm (mean over seeds), and the verdicts: AdamW + XGrad below every alternative on
    every seed; XGrad worse on NAdam and schedule-free AdamW, no difference on Lookahead."""
    first = " ".join(_first_screen(name).split())

    def mean(arm: str) -> str:
        finals = [run["final"] for run in baselines["runs"][arm] if run["status"] == "finished"]
        assert len(finals) == 3, arm
        return f"{sum(finals) / len(finals):.3f}"

    comparisons = {(c["section"], c["arm"]): c for c in baselines["comparisons"]}
    assert f"AdamW + XGrad ({mean('adamw-xgrad')}) ended below NAdam ({mean('nadam')}), schedule-free AdamW " in first
    assert f"({mean('schedulefree_adamw')}) and Lookahead over AdamW ({mean('lookahead_adamw')}) on every seed" in first
    for method in ("nadam", "schedulefree_adamw", "lookahead_adamw"):
        versus = comparisons["vs adamw + xgrad", method]
        assert versus["verdict"] == "worse" and versus["improved"] == 0, method  # the alternative, on every seed
    nadam, free, lookahead = (
        comparisons["xgrad", f"{m}-xgrad"] for m in ("nadam", "schedulefree_adamw", "lookahead_adamw")
    )
    assert nadam["verdict"] == free["verdict"] == "worse" and lookahead["verdict"] == "no difference detected"
    quoted = f"worse with NAdam ({_signed(nadam['mean'], 3)}) and schedule-free AdamW ({_signed(free['mean'], 3)})"
    assert quoted in first and "no difference with Lookahead" in first


@pytest.mark.parametrize("name", TABLES["model, optimizer"])
def test_the_overhead_table_is_the_published_one(overhead, name: str) -> None:
    shown = _shown_table(name, "model, optimizer")
    assert set(shown) == set(OVERHEAD_ROWS)
    for label, case in OVERHEAD_ROWS.items():
        xgrad, compiled = overhead[case, "xgrad"], overhead[case, "xgrad-compiled"]
        without, hooks, ratio, step, with_compile = shown[label]
        assert without == f"{float(xgrad['step without ms']):.1f} ms", label
        assert hooks == f"{float(xgrad['hooks ms']):.2f} ms", label
        assert ratio == f"{float(xgrad['hooks ms']) / float(xgrad['update ms']):.2f}", label
        assert step == xgrad["step overhead"].replace("-", "−"), label
        compiled_step = compiled["step overhead"].split()[0]
        assert with_compile.startswith(f"hooks {float(compiled['hooks ms']):.2f} ms"), label
        assert with_compile.endswith(f", {compiled_step}"), label


def _first_screen(name: str) -> str:
    text = _text(name)
    return text[: text.index("\n## ")]


def _number(cell: str) -> float:
    """The first number of a cell ("−0.0134 ± 0.0050" -> -0.0134)."""
    return float(cell.split()[0].replace("−", "-"))


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def _percent(cell: str) -> float:
    return float(cell.split("%")[0])


@pytest.mark.parametrize("name", FIRST_SCREENS)
def test_the_first_screen_quotes_the_published_figures(convergence, overhead, name: str) -> None:
    first = " ".join(_first_screen(name).split())
    adamw_delta = _number(_column(convergence["digits_adamw"]["XGrad s=1"], "Δ"))
    gpt_delta = _number(_column(convergence["char_gpt"]["XGrad s=1"], "Δ"))
    ppl = [_number(_column(convergence["char_gpt"][m], "val_ppl")) for m in ("baseline", "XGrad s=1")]
    assert f"({_signed(adamw_delta, 3)} at s = 1)" in first
    assert f"({_signed(gpt_delta, 3)}, perplexity {ppl[0]:.2f} → {ppl[1]:.2f})" in first
    for model, then in (("cnn", " of the training step on a compute-bound CNN"), ("mlp", " on an MLP")):
        low, high = sorted(
            (_percent(overhead[f"{model}-{optimizer}", "xgrad"]["step overhead"]), label)
            for optimizer, label in (("sgd", "SGD momentum"), ("adamw", "AdamW"))
        )  # the smaller overhead first
        assert f"+{low[0]:.1f}% ({low[1]}) to +{high[0]:.1f}% ({high[1]}){then}" in first, model


@pytest.mark.parametrize("name", FIRST_SCREENS)
def test_the_first_screen_states_where_xgrad_did_not_help(convergence, name: str) -> None:
    """The verdicts it quotes: SGD momentum nothing at s = 1 and a margin at s = 2, the GAN worse at s = 2."""
    first = " ".join(_first_screen(name).split())
    sgd1, sgd2 = convergence["digits_sgd"]["XGrad s=1"], convergence["digits_sgd"]["XGrad s=2"]
    assert sgd1["verdict"] == "no difference detected" and "s = 1 made no difference" in first
    mean, error = _column(sgd2, "Δ").split(" ± ")
    assert sgd2["verdict"] == "better"
    quoted = f"({_signed(_number(mean), 4)} ± {float(error):.4f}, {sgd2['seeds improved'].replace('/', ' of ')} seeds)"
    assert f"s = 2 helped by a margin just past seed noise {quoted}" in first
    gan1, gan2 = convergence["digits_gan"]["XGrad s=1"], convergence["digits_gan"]["XGrad s=2"]
    assert gan1["verdict"] == "no difference detected" and gan2["verdict"] == "worse"
    assert gan2["seeds improved"] == "0/3" and "did not help at s = 1 and was worse on every seed at s = 2" in first
