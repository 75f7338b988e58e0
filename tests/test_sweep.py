"""``python -m lightning_xgrad.sweep``: the statistics by hand, and real sweeps of a tiny LightningCLI program.

The end-to-end tests run ``tests/sweep_program.py`` as the user's command. Each of its runs records what it really
was (seed, XGradCallback steps, loggers, final val_loss as its Trainer saw it), and the tests read every run's
CSV files themselves, so the table, the paired deltas and the curves are checked against the runs, not against
the sweep's own reading of them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_xgrad.sweep import main, stats

XGRAD_METRICS = ("xgrad/relative_shift", "xgrad/prediction_cosine", "xgrad/prediction_error")

REPO = Path(__file__).resolve().parents[1]
PROGRAM = [sys.executable, str(REPO / "tests" / "sweep_program.py"), "fit"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]
EPOCHS = 3
#: XGradCallback's logging cadence in the sweep's runs (4 steps per epoch: steps 2, 4, ..., 10 are logged)
LOG_EVERY = 2


# ---------------------------------------------------------------------- statistics, by hand
def test_paired_delta_mean_standard_error_and_improved_seeds() -> None:
    values, reference = {0: 0.40, 1: 0.58, 2: 0.92}, {0: 0.50, 1: 0.70, 2: 1.00}
    delta = stats.paired_delta(values, reference, "min")
    deltas = [-0.10, -0.12, -0.08]
    mean = sum(deltas) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2) / math.sqrt(3)  # 0.02 / sqrt(3)
    assert delta.seeds == (0, 1, 2) and delta.deltas == pytest.approx(deltas)
    assert delta.mean == pytest.approx(-0.10) and delta.standard_error == pytest.approx(se)
    assert delta.improved == 3 and delta.verdict == "better"  # 0.10 > 2 * 0.0115
    flipped = stats.paired_delta(values, reference, "max")  # higher is better: the same deltas are worse
    assert flipped.improved == 0 and flipped.verdict == "worse"


def test_a_delta_within_two_standard_errors_is_no_difference() -> None:
    # the digits_sgd case: a mean delta of -0.0069 with a std of 0.0078 over 3 seeds (2 of 3 better)
    reference = {0: 0.05, 1: 0.06, 2: 0.04}
    values = {0: 0.05 - 0.0150, 1: 0.06 - 0.0077, 2: 0.04 + 0.0020}
    delta = stats.paired_delta(values, reference, "min")
    assert delta.mean == pytest.approx(-0.0069) and statistics.stdev(delta.deltas) == pytest.approx(0.0085, abs=1e-4)
    assert delta.improved == 2 and delta.verdict == "no difference detected"  # 0.0069 < 2 * 0.0049
    assert "no difference detected" in stats.verdict({0: reference, 2: values}, "min", "val_loss")


def test_fewer_than_three_seeds_never_name_a_best_s() -> None:
    reference, values = {0: 1.0, 1: 1.0}, {0: 0.5, 1: 0.4}  # better on both seeds, by a lot
    assert stats.paired_delta(values, reference, "min").verdict == "too few seeds (2 < 3)"
    assert stats.verdict({0: reference, 1: values}, "min", "val_loss").startswith("too few seeds for a verdict")
    one = stats.paired_delta({0: 0.5}, {0: 1.0}, "min")
    assert one.standard_error is None and one.verdict == "too few seeds (1 < 3)"


def test_verdict_names_the_best_s_and_compares_it_with_the_runner_up() -> None:
    baseline = {0: 1.00, 1: 1.10, 2: 0.90}
    finals = {
        0: baseline,
        1: {0: 0.90, 1: 1.01, 2: 0.79},  # -0.10, -0.09, -0.11: better
        2: {0: 0.89, 1: 0.99, 2: 0.80},  # -0.11, -0.11, -0.10: better, best mean; vs s=1: -0.01, -0.02, +0.01
        3: {0: 1.50, 1: 1.60, 2: 1.45},  # worse on every seed
    }
    text = stats.verdict(finals, "min", "val_loss")
    assert text.startswith("best s = 2: val_loss −0.1067 ± 0.003333")
    assert "better on 3 of 3 seeds" in text
    assert "s = 1 also beats s = 0, and s = 2 against s = 1 is within seed noise (−0.006667 ± 0.008819)" in text
    assert "worse than s = 0 beyond seed noise at s = 3" in text
    finals[2] = {0: 0.70, 1: 0.80, 2: 0.61}  # now clearly ahead of s=1 as well
    assert "it also beats s = 1 beyond seed noise" in stats.verdict(finals, "min", "val_loss")


def test_a_non_finite_metric_is_reported_not_averaged() -> None:
    finals = {0: {0: 1.0, 1: 1.1, 2: 0.9}, 1: {0: 0.5, 1: float("nan"), 2: 0.4}}
    assert stats.paired_delta(finals[1], finals[0], "min").verdict == "non-finite metric"
    assert "non-finite val_loss at s = 1" not in stats.verdict(finals, "min", "val_loss")  # too few seeds left
    finals[2] = {0: 0.9, 1: 1.0, 2: 0.8}
    assert "a non-finite val_loss at s = 1" in stats.verdict(finals, "min", "val_loss")


def test_a_diverged_run_is_reported_and_results_json_stays_strict_json(tmp_path) -> None:
    from lightning_xgrad.sweep.cli import SweepConfig, write_outputs
    from lightning_xgrad.sweep.runs import RunResult

    config = SweepConfig(("python", "x.py"), (0, 1), (0, 1, 2), "val_loss", "min", tmp_path)
    finals = {0: [1.0, 1.1, 0.9], 1: [0.8, float("nan"), 0.7]}
    results = [
        RunResult(s, seed, "finished", v, [{"epoch": 0.0, "step": 9.0, "val_loss": v}], {"val_loss": v})
        for s, values in finals.items()
        for seed, v in enumerate(values)
    ]
    text, _ = write_outputs(config, results)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert data["runs"][4]["final"] == "nan" and data["summary"][1]["verdict"] == "non-finite metric"
    row = next(line for line in text.splitlines() if line.startswith("| 1 "))
    # mean ± std of the finite values (0.8, 0.7), the diverged seed named; no delta, no count of improved seeds
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "1", "3/3", "0.75 ± 0.07071 (1 non-finite left out)", "", "", "non-finite metric"
    ]  # fmt: skip


# ---------------------------------------------------------------------- bad input, before any run
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0", "1"], "no command after `--`"),
        (["--steps", "0", "1", "--"], "no command after `--`"),
        (["--steps", "0", "-1", "--", "python", "x.py"], "--steps must be >= 0"),
        (["--steps", "0", "1", "1", "--", "python", "x.py"], "--steps has duplicates: [0, 1, 1]"),
        (["--seeds", "0", "1", "0", "--", "python", "x.py"], "--seeds has duplicates: [0, 1, 0]"),
        (["--seeds", "-3", "--", "python", "x.py"], "--seeds must be in [0, 2**32)"),
        (["--resume", "--", "python", "x.py"], "--resume needs --out DIR"),
        (["--mode", "up", "--", "python", "x.py"], "argument --mode: invalid choice: 'up'"),
        (["--check-timeout", "0", "--", "python", "x.py"], "argument --check-timeout: must be a number of seconds > 0"),
        (["--out", "o", "--bogus", "--", "python", "x.py"], "error: unrecognized arguments: --bogus\n"),
        # without `--`, the command's words land in the sweep's options: the error says where they go
        (
            ["--steps", "0", "1", "python", "x.py", "fit"],
            "error: the command to sweep goes after `--` (-- python my_cli.py fit --config my.yaml), and there is "
            "no `--`: argument --steps: invalid int value: 'python'\n",
        ),
        (
            ["python", "x.py", "fit", "--config", "c.yaml"],
            "error: the command to sweep goes after `--` (-- python my_cli.py fit --config my.yaml), and there is "
            "no `--`: unrecognized arguments: python x.py fit --config c.yaml\n",
        ),
    ],
)
def test_bad_input_is_refused_before_any_run(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no sweep folder, no run


def test_a_command_that_is_not_a_lightning_cli_program_is_refused_before_any_run(tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    assert main(["--out", str(out), "--", sys.executable, "-c", "print('hello')"]) == 2
    assert "printed no Trainer configuration with --print_config" in capsys.readouterr().err
    assert not out.exists()


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("first", "message"),
    [
        (
            "{dir}/digits.py",  # a script without its interpreter
            "the command starts with {dir}/digits.py, a file that is not executable: start the command with its "
            "interpreter (-- python {dir}/digits.py ...), or make it executable",
        ),
        (
            "no-such-program",
            "the command starts with 'no-such-program', which is neither a file nor a program on PATH: the "
            "command after `--` starts with the program that runs it (-- python my_cli.py fit ...)",
        ),
        (
            "{dir}/no-such-interpreter.py",  # executable, but its #! names an interpreter that does not exist
            "the command cannot be started ([Errno 2] No such file or directory: '{dir}/no-such-interpreter.py'): "
            "start it with its interpreter (-- python my_cli.py ...)",
        ),
    ],
)
def test_a_command_that_cannot_start_is_refused_in_one_line(first, message, tmp_path, capsys) -> None:
    (tmp_path / "digits.py").write_text("print('training')\n")
    _executable(tmp_path / "no-such-interpreter.py", "#!/no/such/python\nprint('training')\n")
    out = tmp_path / "out"
    assert main(["--out", str(out), "--", first.format(dir=tmp_path), "fit"], prog="xgrad-sweep") == 2
    assert capsys.readouterr().err == f"xgrad-sweep: error: {message.format(dir=tmp_path)}\n"
    assert not out.exists()


def test_a_program_on_the_working_directory_but_not_on_path_is_named(tmp_path, monkeypatch, capsys) -> None:
    _executable(tmp_path / "my_cli.py", "#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--", "my_cli.py", "fit"], prog="xgrad-sweep") == 2
    assert capsys.readouterr().err == (
        "xgrad-sweep: error: the command starts with my_cli.py, which is not on PATH: write it as ./my_cli.py, or "
        "start the command with its interpreter (-- python my_cli.py ...)\n"
    )
    assert list(tmp_path.iterdir()) == [tmp_path / "my_cli.py"]


#: a plain script (not a LightningCLI program) that ignores its arguments and trains for a minute, with a worker
#: process of its own as a data loader would have; it marks when its training starts, ends, and if the worker lives on
PLAIN_SCRIPT = """
import subprocess, sys, time
from pathlib import Path

folder = Path(sys.argv[1])
(folder / "training started").touch()
worker = "import sys, time; from pathlib import Path; time.sleep(3); Path(sys.argv[1]).touch()"
subprocess.Popen([sys.executable, "-c", worker, str(folder / "worker lived on")])
time.sleep(60)
(folder / "training finished").touch()
"""


def test_a_plain_script_is_stopped_and_refused_within_seconds(tmp_path, capsys) -> None:
    script = tmp_path / "train.py"
    script.write_text(PLAIN_SCRIPT)
    out = tmp_path / "out"
    start = time.monotonic()
    argv = ["--out", str(out), "--check-timeout", "2", "--", sys.executable, str(script), str(tmp_path)]
    assert main(argv, prog="xgrad-sweep") == 2
    elapsed = time.monotonic() - start
    assert capsys.readouterr().err == (
        "xgrad-sweep: error: the command did not answer --print_config within 2 s, so the sweep stopped it before "
        "any run: a LightningCLI program prints its configuration and exits, a plain script trains instead. Sweep a "
        "LightningCLI program, or if yours takes longer to start, raise --check-timeout\n"
    )
    assert elapsed < 10, elapsed  # the script would train for 60 s
    assert (tmp_path / "training started").exists() and not out.exists()
    time.sleep(max(0.0, start + 5 - time.monotonic()))
    # stopped, its worker too (the whole process group), before its training ended
    assert not (tmp_path / "worker lived on").exists() and not (tmp_path / "training finished").exists()


#: a plain Lightning script: it constructs a Trainer and would then train for a minute
PLAIN_LIGHTNING_SCRIPT = """
import sys, time
from pathlib import Path
import lightning.pytorch as pl

pl.Trainer(logger=False, enable_checkpointing=False)
time.sleep(60)
Path(sys.argv[1], "training finished").touch()
"""


def test_a_plain_lightning_script_is_refused_when_it_constructs_its_trainer(tmp_path, capsys) -> None:
    """Refused as soon as its Trainer exists, long before the time limit (120 s here)."""
    script = tmp_path / "train.py"
    script.write_text(PLAIN_LIGHTNING_SCRIPT)
    out = tmp_path / "out"
    start = time.monotonic()
    argv = ["--out", str(out), "--check-timeout", "120", "--", sys.executable, str(script), str(tmp_path)]
    assert main(argv, prog="xgrad-sweep") == 2
    elapsed = time.monotonic() - start
    assert capsys.readouterr().err == (
        "xgrad-sweep: error: the command constructed a Lightning Trainer instead of printing its configuration for "
        "--print_config, so the sweep stopped it before any run: a LightningCLI program prints its configuration and "
        "exits, a plain script trains. Sweep a LightningCLI program (lightning.pytorch.cli.LightningCLI)\n"
    )
    assert elapsed < 50, elapsed  # the imports, not the 60 s of training nor the 120 s limit
    assert not (tmp_path / "training finished").exists() and not out.exists()


@pytest.mark.parametrize(
    ("command", "message"),
    [
        # an interpreter that cannot import Lightning (-S: without its site-packages), as from a venv without it
        (
            [sys.executable, "-S", str(REPO / "tests" / "sweep_program.py"), "fit"],
            "the program's environment cannot import lightning (ModuleNotFoundError: No module named 'lightning'); "
            f"the command runs {sys.executable}: install what the program needs there, or start the command with a "
            "Python that has it (-- /path/to/python my_cli.py ...):",
        ),
        (
            [sys.executable, "-c", "import sys; print('starting'); raise RuntimeError('no data in ' + sys.argv[1])"],
            "the command raised RuntimeError: no data in --seed_everything=0 when the sweep checked it with "
            "--print_config appended:",
        ),
    ],
)
def test_a_failing_program_is_reported_by_its_own_exception(command, message, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--out", str(out), "--", *command], prog="xgrad-sweep") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xgrad-sweep: error: {message}\n  $ "), err
    assert "does not accept the sweep's arguments" not in err and not out.exists()


def test_an_out_folder_holding_a_sweep_needs_resume(tmp_path, capsys) -> None:
    (tmp_path / "sweep.json").write_text(json.dumps({"command": ["python", "a.py"]}))
    assert main(["--out", str(tmp_path), "--", "python", "a.py"]) == 2
    assert "already holds a sweep: pass --resume to continue it" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--resume", "--", "python", "b.py"]) == 2
    assert "holds a sweep of another command (python a.py)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]


def test_module_entry_point_and_console_script() -> None:
    """``python -m lightning_xgrad.sweep`` runs without importing Lightning; ``xgrad-sweep`` points at main."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["xgrad-sweep"] == "lightning_xgrad.sweep:main"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.run(
        [sys.executable, "-m", "lightning_xgrad.sweep", "--seeds", "1", "1", "--", "python", "x.py"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert process.returncode == 2 and "--seeds has duplicates: [1, 1]" in process.stderr
    assert process.stderr.startswith("usage: python -m lightning_xgrad.sweep [--steps 0 1 2] ")
    assert "\npython -m lightning_xgrad.sweep: error: --seeds has duplicates" in process.stderr
    probe = "import sys, lightning_xgrad.sweep; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout == "[]\n"


def test_the_console_script_names_itself_in_its_usage_and_errors(tmp_path) -> None:
    """Run as pip's console script runs it (the entry point checked above): ``main()`` from a script named
    ``xgrad-sweep``."""
    script = tmp_path / "bin" / "xgrad-sweep"
    script.parent.mkdir()
    script.write_text("import sys\nfrom lightning_xgrad.sweep import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, str(script), "--seeds", "1", "1", "--", "python", "x.py"]
    process = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert process.returncode == 2
    assert process.stderr.startswith("usage: xgrad-sweep [--steps 0 1 2] [--seeds 0 1 2] ")
    assert process.stderr.endswith("\nxgrad-sweep: error: --seeds has duplicates: [1, 1]\n")


# ---------------------------------------------------------------------- real sweeps
@pytest.fixture
def subprocess_env(monkeypatch) -> None:
    """The runs import this checkout's lightning_xgrad."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """seeds 0 1 2, s = 0 1, with a user logger in the config; the run s=1 seed=2 fails the first time, and a
    --resume after the cause is gone runs it alone."""
    tmp = tmp_path_factory.mktemp("sweep")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    config = tmp / "user.yaml"
    config.write_text(
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n"
        f"    init_args: {{save_dir: {tmp / 'userlogs'}, name: mine}}\n"
    )
    record, flag, out = tmp / "runs.jsonl", tmp / "fail-{seed}", tmp / "out"
    (tmp / "fail-2").touch()
    command = [
        *PROGRAM,
        "--config",
        str(config),
        f"--model.record={record}",
        "--model.data_seed={seed}",
        f"--model.fail_flag={flag}",
        f"--trainer.max_epochs={EPOCHS}",
        *QUIET,
    ]
    argv = ["--steps", "1", "--seeds", "0", "1", "2", "--log-every-n-steps", str(LOG_EVERY), "--out", str(out)]
    argv += ["--", *command]
    sweep_cmd = [sys.executable, "-m", "lightning_xgrad.sweep", *argv]
    first = subprocess.run(sweep_cmd, capture_output=True, text=True, env={**os.environ, **env})
    first_json = json.loads((out / "results.json").read_text())
    (tmp / "fail-2").unlink()
    records_before = _records(record)
    second = subprocess.run(
        [*sweep_cmd[:3], "--resume", *argv], capture_output=True, text=True, env={**os.environ, **env}
    )
    return {
        "tmp": tmp,
        "out": out,
        "first": first,
        "first_json": first_json,
        "records_before": records_before,
        "second": second,
        "records": _records(record),
        "results": json.loads((out / "results.json").read_text()),
        "markdown": (out / "results.md").read_text(),
    }


def test_a_failing_run_is_reported_and_the_sweep_goes_on(sweep) -> None:
    first = sweep["first"]
    assert first.returncode == 1, first.stderr[-3000:]
    assert "s=1 seed=2: failed (exit status 1); last lines of" in first.stdout
    assert "RuntimeError: failing on purpose" in first.stdout  # the log's last lines
    assert "1 of 6 runs have no result" in first.stderr
    assert "runs: 100%|" in first.stderr and "6/6 [" in first.stderr  # the progress bar over the runs
    statuses = {(r["s"], r["seed"]): r["status"] for r in sweep["first_json"]["runs"]}
    assert statuses == {(0, 0): "finished", (1, 0): "finished", (0, 1): "finished", (1, 1): "finished",
                        (0, 2): "finished", (1, 2): "failed"}  # fmt: skip
    assert len(sweep["records_before"]) == 5  # the runs after seed 0 went on


def test_resume_runs_only_what_did_not_finish(sweep) -> None:
    second = sweep["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "5 of 6 runs already finished, 1 to run" in second.stdout
    new = sweep["records"][len(sweep["records_before"]) :]
    assert [(r["seed"], r["xgrad_steps"]) for r in new] == [(2, [1])]
    assert all(run["status"] == "finished" for run in sweep["results"]["runs"])


def test_every_run_gets_its_seed_xgrad_and_both_loggers(sweep) -> None:
    records, out = sweep["records"], sweep["out"]
    assert sorted((r["seed"], tuple(r["xgrad_steps"])) for r in records) == [
        (0, ()), (0, (1,)), (1, ()), (1, (1,)), (2, ()), (2, (1,))
    ]  # fmt: skip
    for r in records:
        assert r["data_seed"] == r["seed"]  # {seed} in the command
        s = 1 if r["xgrad_steps"] else 0
        assert r["xgrad_log_every"] == ([LOG_EVERY] if s else [])
        # the user's logger first, as configured; the sweep's CSVLogger added into the run's folder
        assert r["loggers"] == [
            ["CSVLogger", str(sweep["tmp"] / "userlogs")],
            ["CSVLogger", str(out / "runs" / f"s{s}-seed{r['seed']}")],
        ]
        assert r["epochs"] == EPOCHS
    # the user's own logger still logged every run
    user_finals = sorted(
        float([row for row in _csv_rows(path) if row["val_loss"]][-1]["val_loss"])
        for path in (sweep["tmp"] / "userlogs").rglob("metrics.csv")
    )
    assert user_finals == pytest.approx(sorted(r["val_loss"] for r in records), rel=1e-6)


def test_a_resumed_sweep_reports_the_wall_time_of_all_its_runs(sweep) -> None:
    """Each run's own recorded duration, those of the first invocation too."""
    seconds = [
        json.loads((sweep["out"] / "runs" / f"s{s}-seed{seed}" / "status.json").read_text())["seconds"]
        for seed in (0, 1, 2)
        for s in (0, 1)
    ]
    assert f"6 of 6 runs finished; wall time of the runs {sum(seconds) / 60:.1f} min; " in sweep["markdown"]
    assert sweep["results"]["runs_wall_seconds"] == round(sum(seconds), 1)
    assert [run["seconds"] for run in sweep["results"]["runs"]] == seconds


def test_table_matches_the_runs_and_the_paired_deltas_by_hand(sweep) -> None:
    finals = {(1 if r["xgrad_steps"] else 0, r["seed"]): r["val_loss"] for r in sweep["records"]}
    baseline = [finals[0, seed] for seed in (0, 1, 2)]
    xgrad = [finals[1, seed] for seed in (0, 1, 2)]
    deltas = [x - b for x, b in zip(xgrad, baseline, strict=True)]
    mean = sum(deltas) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2 / 3)
    improved = sum(d < 0 for d in deltas)
    s0, s1 = sweep["results"]["summary"]
    assert s0["mean"] == pytest.approx(sum(baseline) / 3, rel=1e-6)
    assert s0["std"] == pytest.approx(statistics.stdev(baseline), rel=1e-5)
    assert s1["mean"] == pytest.approx(sum(xgrad) / 3, rel=1e-6)
    assert s1["delta_mean"] == pytest.approx(mean, rel=1e-5) and s1["delta_standard_error"] == pytest.approx(
        se, rel=1e-5
    )
    assert s1["seeds_improved"] == improved and s1["paired_seeds"] == [0, 1, 2]
    expected = "better" if mean < -2 * se else "worse" if mean > 2 * se else "no difference detected"
    assert s1["verdict"] == expected
    row = next(line for line in sweep["markdown"].splitlines() if line.startswith("| 1 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["1", "3/3"] and cells[4:6] == [f"{improved}/3", expected]
    assert cells[3] == f"{mean:+.4g} ± {se:.4g}".replace("-", "−")
    assert cells[2].startswith(f"{sum(xgrad) / 3:.4g} ± ")
    # next to them, the prediction's cosine and error: per run the mean of what its CSV log holds, then over seeds
    header = next(line for line in sweep["markdown"].splitlines() if line.startswith("| s "))
    assert [c.strip() for c in header.strip("|").split("|")][6:] == ["prediction cosine", "prediction error"]
    for cell, metric in zip(cells[6:], ("xgrad/prediction_cosine", "xgrad/prediction_error"), strict=True):
        means = [statistics.fmean(_logged(sweep, 1, seed, metric)) for seed in (0, 1, 2)]
        assert cell == f"{statistics.fmean(means):.4g} ± {statistics.stdev(means):.4g}".replace("-", "−")
        assert s1["prediction"][metric] == pytest.approx(statistics.fmean(means), rel=1e-12)
    baseline_row = next(line for line in sweep["markdown"].splitlines() if line.startswith("| 0 (no XGrad) "))
    assert [c.strip() for c in baseline_row.strip("|").split("|")][6:] == ["", ""] and s0["prediction"] == {}
    assert "not whether the gradient taken at W_hat was a better one" in sweep["markdown"]


def _logged(sweep: dict, s: int, seed: int, metric: str) -> list[float]:
    rows = _csv_rows(sweep["out"] / "runs" / f"s{s}-seed{seed}" / "csv" / "metrics.csv")
    return [float(row[metric]) for row in rows if row.get(metric)]


def test_curves_and_finals_are_what_the_csv_logs_hold(sweep) -> None:
    runs = sweep["results"]["runs"]
    assert len(runs) == 6
    for run in runs:
        rows = _csv_rows(sweep["out"] / "runs" / f"s{run['s']}-seed{run['seed']}" / "csv" / "metrics.csv")
        val = [row for row in rows if row["val_loss"]]
        assert len(val) == EPOCHS
        assert [p["val_loss"] for p in run["curve"]] == [float(row["val_loss"]) for row in val]
        assert [p["epoch"] for p in run["curve"]] == [float(row["epoch"]) for row in val]
        assert run["final"] == float(val[-1]["val_loss"])
        assert run["finals"]["train_loss"] == float([row for row in rows if row["train_loss"]][-1]["train_loss"])
        # XGradCallback's metrics at its logging steps, in the runs with XGrad only: their means over the run
        steps = [int(row["step"]) for row in rows if row.get("xgrad/prediction_cosine")]
        assert steps == ([2, 4, 6, 8, 10] if run["s"] else [])
        expected = {m: statistics.fmean(_logged(sweep, 1, run["seed"], m)) for m in XGRAD_METRICS} if run["s"] else {}
        assert run["xgrad_means"] == pytest.approx(expected, rel=1e-12)
    assert (sweep["out"] / "curves.png").stat().st_size > 10_000
    assert "**Verdict**:" in sweep["markdown"] and "| 0 (no XGrad) | 3/3 " in sweep["markdown"]


def test_a_monitor_the_first_run_never_logs_stops_the_sweep(tmp_path, subprocess_env, monkeypatch, capsys) -> None:
    """Checked after the first run, naming what it logged. Also: no logger in the user's config, default --out."""
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "runs.jsonl"
    command = [*PROGRAM, f"--model.record={record}", "--trainer.max_epochs=1", *QUIET]
    assert main(["--steps", "0", "--seeds", "0", "1", "--monitor", "val_acc", "--", *command]) == 2
    err = capsys.readouterr().err
    assert "--monitor val_acc was never logged by the first run (s=0 seed=0); it logged: train_loss, val_loss" in err
    (sweep,) = (tmp_path / "xgrad-sweeps").iterdir()  # the default --out: a new folder under xgrad-sweeps/
    assert [p.name for p in (sweep / "runs").iterdir()] == ["s0-seed0"]
    assert len(_records(record)) == 1
    # without a logger of the user's, the sweep's CSVLogger is the only one (Lightning's default one is not made)
    assert _records(record)[0]["loggers"] == [["CSVLogger", str(sweep.resolve() / "runs" / "s0-seed0")]]


def test_xgrad_already_in_the_command_is_refused_before_any_run(tmp_path, subprocess_env, capsys) -> None:
    command = [*PROGRAM, "--model.record=x", "--trainer.callbacks+=lightning_xgrad.XGradCallback"]
    assert main(["--out", str(tmp_path / "out"), "--", *command]) == 2
    assert "XGradCallback is already in the command's configuration" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
