"""The char-GPT benchmarks: the baselines (lr tuned per arm on a held-out split, then seeds) and the long run (the gap
along the run). Their arithmetic on hand-made numbers, and each benchmark's quick mode end to end (tiny real runs,
into a temporary folder), checked against what the runs' own CSV logs and commands hold."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from lightning_xgrad.sweep import stats
from lightning_xgrad.sweep.runs import RunResult

from .toolkit import load_example

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")


# ---------------------------------------------------------------------- picking the lr


def test_the_pick_is_the_lowest_finite_tuning_loss_and_says_whether_it_is_at_the_edge() -> None:
    from benchmarks.baselines.tuning import pick

    assert pick({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.7}) == pick({3e-3: 1.5, 1e-3: 2.0, 1e-2: 1.7})
    inside = pick({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.7})
    assert inside is not None and (inside.lr, inside.loss, inside.edge) == (3e-3, 1.5, None)
    diverged = pick({1e-3: 2.0, 3e-3: 1.9, 1e-2: math.nan, 3e-2: None})  # the larger lrs diverged or failed
    assert diverged is not None and (diverged.lr, diverged.edge) == (3e-3, None)  # inside the grid that was run
    top = pick({1e-3: 2.0, 1e-2: 1.0})
    assert top is not None and top.edge == "highest"
    assert pick({1e-3: 1.0, 1e-2: 1.0}).edge == "lowest"  # a tie goes to the smaller lr
    assert pick({1e-3: math.inf, 1e-2: None}) is None


# ---------------------------------------------------------------------- the baselines report


def _result(seed: int, loss: float) -> RunResult:
    curve = [{"epoch": 0.0, "step": 99.0, "val_loss": loss + 0.5}, {"epoch": 1.0, "step": 199.0, "val_loss": loss}]
    return RunResult(0, seed, "finished", loss, curve, {"val_loss": loss, "val_ppl": math.exp(loss)})


def _rows(text: str, label: str) -> list[list[str]]:
    """The cells of every table row that starts with ``label``, in the order of the tables."""
    lines = [line for line in text.splitlines() if line.startswith("| ") and line[2:].split(" |")[0].strip() == label]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_baselines_report_gives_each_verdict_from_the_paired_differences() -> None:
    from benchmarks.baselines.methods import Schedule
    from benchmarks.baselines.report import Study, as_json, markdown
    from benchmarks.baselines.tuning import Pick

    finals = {  # arm -> val_loss for seeds 0, 1, 2
        "adamw": (1.30, 1.32, 1.31),
        "adamw-xgrad": (1.27, 1.30, 1.28),  # −0.03, −0.02, −0.03: better
        "nadam": (1.31, 1.30, 1.33),  # +0.01, −0.02, +0.02 against AdamW: noise
        "nadam-xgrad": (1.32, 1.31, 1.34),  # +0.01 on every seed: worse
    }
    grid = (1e-3, 3e-3, 1e-2)
    picks = {"adamw": Pick(3e-3, 1.5, None), "adamw-xgrad": Pick(1e-2, 1.4, "highest"), "nadam": None}
    picks["nadam-xgrad"] = Pick(1e-3, 1.6, "lowest")
    tuning = {key: {1e-3: 1.6, 3e-3: 1.5, 1e-2: 1.4} for key in finals}
    study = Study(
        "cmd", "machine", 60.0, ("adamw", "nadam"), grid, Schedule(3, 100, 0.1), Schedule(10, 100, 0.1), (0, 1, 2),
        1, tuning, picks, {key: [_result(seed, v) for seed, v in enumerate(values)] for key, values in finals.items()},
    )  # fmt: skip
    text = markdown(study)
    data = as_json(study)
    verdicts = {(c["section"], c["method"]): c for c in data["comparisons"]}
    xgrad_on_adamw = verdicts["xgrad", "AdamW"]
    assert xgrad_on_adamw["deltas"] == pytest.approx([-0.03, -0.02, -0.03])
    assert xgrad_on_adamw["mean"] == pytest.approx(-0.08 / 3)
    assert xgrad_on_adamw["standard_error"] == pytest.approx(statistics.stdev([-0.03, -0.02, -0.03]) / math.sqrt(3))
    assert xgrad_on_adamw["verdict"] == stats.BETTER
    assert verdicts["xgrad", "NAdam"]["verdict"] == stats.WORSE
    assert verdicts["vs adamw", "NAdam"]["verdict"] == stats.NO_DIFFERENCE
    assert verdicts["vs adamw + xgrad", "NAdam"]["deltas"] == pytest.approx([0.04, 0.0, 0.05])
    assert _rows(text, "AdamW")[2] == ["AdamW", "−0.02667 ± 0.003333", "3/3", "better"]  # XGrad on AdamW
    # the picks, the one in bold, and the edges named
    assert _rows(text, "AdamW + XGrad s=1")[0] == [
        "AdamW + XGrad s=1",
        "1.6",
        "1.5",
        "**1.4**",
        "0.01",
        "yes, the highest",
    ]
    assert _rows(text, "NAdam")[0][4:] == ["none", ""]
    assert (
        "At the grid's edge: AdamW + XGrad s=1 (lr 0.01, the highest), NAdam + XGrad s=1 (lr 0.001, the lowest)" in text
    )
    assert "1 of 3 picks lie inside" in text


# ---------------------------------------------------------------------- the gap along the long run


def _curve(values: list[float], batches: int = 100) -> list[dict[str, float]]:
    return [{"epoch": float(i), "step": float((i + 1) * batches - 1), "val_loss": v} for i, v in enumerate(values)]


def test_the_gap_is_read_at_the_same_point_of_every_run_and_its_change_is_paired() -> None:
    from benchmarks.long_run.gaps import GROWS, PERSISTS, REVERSES, SHRINKS, gap_at, point_at, trend

    curve = _curve([3.0, 2.5, 2.0, 1.8, 1.7, 1.6, 1.5, 1.45, 1.4, 1.38])
    assert point_at(curve, 0.2) == (200, 2.5) and point_at(curve, 0.5) == (500, 1.7) and point_at(curve, 1.0)[0] == 1000
    assert point_at(curve, 0.25) == (300, 2.0)  # the first validation at or after 250 steps
    baseline = {seed: _curve([2.0, 1.5, 1.2]) for seed in range(3)}

    def xgrad(early: list[float], late: list[float]) -> dict[int, list[dict[str, float]]]:
        return {seed: _curve([2.0 + early[seed], 1.5, 1.2 + late[seed]]) for seed in range(3)}

    cases = {
        GROWS: ([-0.01, -0.02, -0.01], [-0.03, -0.04, -0.04]),
        SHRINKS: ([-0.05, -0.06, -0.05], [-0.02, -0.02, -0.025]),
        REVERSES: ([-0.05, -0.06, -0.05], [0.02, 0.03, 0.025]),
        PERSISTS: ([-0.03, -0.02, -0.03], [-0.02, -0.03, -0.03]),
    }
    for word, (early, late) in cases.items():
        runs = xgrad(early, late)
        first, last = gap_at(baseline, runs, 1 / 3), gap_at(baseline, runs, 1.0)
        assert first.steps == 100 and last.steps == 300
        assert first.delta is not None and first.delta.deltas == pytest.approx(early)
        result = trend(first, last)
        assert result.change is not None
        assert result.change.deltas == pytest.approx([b - a for a, b in zip(early, late, strict=True)])
        assert result.word == word, (word, result.change)
    two_seeds = {seed: curve for seed, curve in xgrad([-0.1] * 3, [-0.2] * 3).items() if seed < 2}
    assert trend(gap_at(baseline, two_seeds, 0.2), gap_at(baseline, two_seeds, 1.0)).word.startswith("too few seeds")
    with pytest.raises(ValueError, match="different steps"):
        gap_at(baseline, {0: _curve([2.0, 1.5, 1.2], batches=50)}, 0.5)


# ---------------------------------------------------------------------- quick modes end to end


@pytest.fixture
def run_environment(monkeypatch):
    """The environment the benchmarks set for their runs (PYTHONPATH, OMP_NUM_THREADS) is put back afterwards."""
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _logged(folder: Path) -> list[dict[str, str]]:
    """A run's validation rows, read from its CSV log."""
    with (folder / "csv" / "metrics.csv").open() as file:
        return [row for row in csv.DictReader(file) if row["val_loss"]]


def _command(folder: Path) -> list[str]:
    return json.loads((folder / "status.json").read_text())["command"]


def test_baselines_quick_picks_each_arms_lr_on_the_tuning_split_and_runs_it_on_the_reported_one(
    run_environment, tmp_path, capsys
) -> None:
    from benchmarks.baselines.cli import main

    out = tmp_path / "baselines"
    assert main(["--quick", "--methods", "adamw", "--jobs", "2", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads((out / "baselines.json").read_text())
    text = (out / "baselines.md").read_text()
    char_gpt = load_example("char_gpt")
    for arm in ("adamw", "adamw-xgrad"):
        # the pick, recomputed from the tuning runs' own logs: the lr whose last tuning-split val_loss is lowest
        last = {
            float(folder.name.removeprefix("lr")): float(_logged(folder / "runs" / "s0-seed0")[-1]["val_loss"])
            for folder in (out / "tuning" / arm).iterdir()
        }
        assert sorted(last) == [0.001, 0.01]
        best = min(last, key=last.__getitem__)
        assert data["picks"][arm]["lr"] == best and data["tuning"][arm] == {f"{k:g}": v for k, v in last.items()}
        assert data["picks"][arm]["edge"] == ("lowest" if best == 0.001 else "highest")
        # tuning: trained without the tuning split, validated on it; the reported runs: neither, at the picked lr
        tuning_run = out / "tuning" / arm / f"lr{best:g}" / "runs" / "s0-seed0"
        tuning_command, reported = _command(tuning_run), _command(out / "seeds" / arm / "runs" / "s0-seed0")
        assert {"--data.tuning_fraction=0.1", "--data.val_split=tuning"} <= set(tuning_command)
        assert not any(flag.startswith(("--data.tuning_fraction", "--data.val_split")) for flag in reported)
        assert f"--model.lr={best:g}" in reported and ("--trainer.callbacks.steps=1" in reported) == arm.endswith(
            "xgrad"
        )
        hparams = yaml.safe_load((tuning_run / "csv" / "hparams.yaml").read_text())
        assert hparams["optimizer"] == "adamw" and hparams["lr"] == best
        # the data the tuning run was given: its validation windows are the tuning split's, which holds none of the
        # training text (both are cut from the same modules at different places) nor the reported split
        data_flags = {
            f.split("=")[0][7:]: yaml.safe_load(f.split("=")[1]) for f in tuning_command if f.startswith("--data.")
        }
        data_flags.pop("seed")
        module = char_gpt.CharTextDataModule(**data_flags)
        (x, _), *_ = module.val_dataloader()
        assert torch.equal(x[0], module.tuning_ids[:64])
        full = char_gpt.CharTextDataModule()
        assert len(module.train_ids) + len(module.tuning_ids) == len(full.train_ids)
        assert torch.equal(module.val_ids, full.val_ids)
    # the reported runs' finals and the verdict row, from their own logs
    (row,) = [c for c in data["comparisons"] if c["section"] == "xgrad"]
    finals = {arm: float(_logged(out / "seeds" / arm / "runs" / "s0-seed0")[-1]["val_loss"]) for arm in data["picks"]}
    assert row["deltas"] == [finals["adamw-xgrad"] - finals["adamw"]]
    assert _rows(text, "AdamW")[2][1] == stats.format_signed(row["deltas"][0])
    assert (out / "baselines.png").stat().st_size > 10_000
    # a resumed run runs nothing again and reports the same
    capsys.readouterr()
    assert main(["--quick", "--methods", "adamw", "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert (
        "tuning: 4 of 4 runs already finished, 0 to run" in printed and "seeds: 2 of 2 runs already finished" in printed
    )
    assert json.loads((out / "baselines.json").read_text())["comparisons"] == data["comparisons"]
    with pytest.raises(SystemExit):
        main(["--quick", "--methods", "adamw", "--out", str(out)])  # a folder with a run needs --resume
    assert "holds a run: pass --resume" in capsys.readouterr().err


def test_long_run_quick_reports_the_paired_gap_recomputed_from_the_curves(run_environment, tmp_path) -> None:
    from benchmarks.long_run.cli import main

    out = tmp_path / "long"
    assert main(["--quick", "--jobs", "2", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads((out / "long_run.json").read_text())
    text = (out / "long_run.md").read_text()
    logged = {
        arm: {seed: _logged(out / arm / "runs" / f"s0-seed{seed}") for seed in (0, 1)}
        for arm in ("adamw", "adamw-xgrad")
    }
    assert [int(row["step"]) for row in logged["adamw"][0]] == [4, 9, 14, 19]  # 4 epochs of 5 steps
    at = {0.2: 1, 0.5: 2, 1.0: 4}  # the epoch of the first validation after 20%, 50% and 100% of 20 steps
    deltas = {}
    for gap in data["gaps"]:
        epoch = at[gap["fraction"]]
        assert gap["steps"] == 5 * epoch
        by_seed = [
            float(logged["adamw-xgrad"][seed][epoch - 1]["val_loss"])
            - float(logged["adamw"][seed][epoch - 1]["val_loss"])
            for seed in (0, 1)
        ]
        deltas[gap["fraction"]] = by_seed
        assert gap["delta"]["deltas"] == pytest.approx(by_seed, abs=1e-12)
        assert gap["delta"]["mean"] == pytest.approx(statistics.fmean(by_seed), abs=1e-12)
        assert gap["delta"]["standard_error"] == pytest.approx(statistics.stdev(by_seed) / math.sqrt(2), rel=1e-9)
        row = next(line for line in text.splitlines() if line.startswith(f"| {gap['fraction']:.0%} "))
        assert stats.format_delta(stats.paired_delta(dict(enumerate(by_seed)), {0: 0.0, 1: 0.0}, "min")) in row
    for trend in data["trends"]:  # Δ at the end minus Δ then, seed by seed
        change = [b - a for a, b in zip(deltas[trend["from"]], deltas[1.0], strict=True)]
        assert trend["change"]["deltas"] == pytest.approx(change, abs=1e-12)
        assert trend["gap"] == "too few seeds (2 < 3)"
    assert data["results"]["1"][0] == [
        {key: float(value) for key, value in row.items() if value} for row in logged["adamw-xgrad"][0]
    ]  # the plotted curve is the logged one
    assert (out / "long_run.png").stat().st_size > 10_000
