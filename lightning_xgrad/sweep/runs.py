"""One sweep run: the user's command with what the sweep appends, run as a subprocess, and its metrics read back.

A run is the user's LightningCLI command with ``--seed_everything=SEED``, for s > 0
``--trainer.callbacks+=lightning_xgrad.XGradCallback --trainer.callbacks.steps=S`` (and
``--trainer.callbacks.log_every_n_steps=N`` when the sweep asks for XGradCallback's metrics), and a CSVLogger
appended to ``trainer.logger`` (``+=``, so a logger the user configured keeps logging) that writes
``csv/metrics.csv`` into the run's folder. ``{seed}`` anywhere in the command is replaced by the run's seed (for a
data module or model that takes a seed of its own). The run's output goes to ``log.txt`` and its outcome to
``status.json`` in its folder; a finished run is never run again by ``--resume``. Nothing here imports Lightning.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

XGRAD_CLASS_PATH = "lightning_xgrad.XGradCallback"
CSV_LOGGER_CLASS_PATH = "lightning.pytorch.loggers.CSVLogger"
SEED_PLACEHOLDER = "{seed}"
#: the statuses of a run in results.json
FINISHED, FAILED, NO_METRIC, NOT_RUN = "finished", "failed", "metric not logged", "not run"
#: CSVLogger's bookkeeping columns, not metrics
INDEX_COLUMNS = ("epoch", "step")
#: what the metrics XGradCallback logs are named like (``xgrad/prediction_cosine``, ``xgrad/relative_shift``, ...)
XGRAD_METRIC_PREFIX = "xgrad/"
#: seconds the ``--print_config`` check may take before the sweep stops the command: a LightningCLI program answers
#: once its imports are done (torch and Lightning take about 10 s on a busy 2-core machine, more from a cold network
#: disk); a program that trains instead of answering would otherwise train in full before the sweep can refuse it
DEFAULT_CHECK_TIMEOUT_S = 60.0
#: the line a Python traceback ends with: the exception's name, and its message after ": "
EXCEPTION_LINE = re.compile(r"(?P<name>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?")
MISSING_MODULE = re.compile(r"No module named '(?P<module>[^']+)'")
#: what Lightning prints when a Trainer is constructed, which a LightningCLI program asked for --print_config never
#: does: the probe stops a program that prints it at once (a plain script about to train), not at the time limit
TRAINER_STARTED = re.compile(r"^GPU available: ", re.MULTILINE)


class SweepError(Exception):
    """A problem with the sweep's input, found before (or, for the monitored metric, after the first) run."""


@dataclass(frozen=True)
class RunSpec:
    """One (s, seed) of a sweep, where its files go, and how often XGradCallback logs its metrics in it (every n
    optimizer steps; ``None``: not at all)."""

    steps: int
    seed: int
    folder: Path
    log_every_n_steps: int | None = None

    @property
    def name(self) -> str:
        return f"s={self.steps} seed={self.seed}"

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"

    @property
    def status_file(self) -> Path:
        return self.folder / "status.json"

    @property
    def metrics_csv(self) -> Path:
        return self.folder / "csv" / "metrics.csv"


def run_folder(out: Path, steps: int, seed: int, log_every_n_steps: int | None = None) -> RunSpec:
    return RunSpec(steps, seed, out / "runs" / f"s{steps}-seed{seed}", log_every_n_steps)


def appended_args(steps: int, seed: int, folder: Path, log_every_n_steps: int | None = None) -> list[str]:
    """What the sweep adds to the user's command for one run."""
    args = [f"--seed_everything={seed}"]
    if steps > 0:
        args += [f"--trainer.callbacks+={XGRAD_CLASS_PATH}", f"--trainer.callbacks.steps={steps}"]
        if log_every_n_steps is not None:
            args.append(f"--trainer.callbacks.log_every_n_steps={log_every_n_steps}")
    # name "csv" and an empty version: the metrics land in <folder>/csv/metrics.csv, with no version_N folder
    return [
        *args,
        f"--trainer.logger+={CSV_LOGGER_CLASS_PATH}",
        f"--trainer.logger.save_dir={folder.resolve()}",  # absolute: the program may change its directory
        "--trainer.logger.name=csv",
        "--trainer.logger.version=",
    ]


def run_command(command: Sequence[str], spec: RunSpec) -> list[str]:
    """The full command line of one run."""
    user = [arg.replace(SEED_PLACEHOLDER, str(spec.seed)) for arg in command]
    return [*user, *appended_args(spec.steps, spec.seed, spec.folder, spec.log_every_n_steps)]


@dataclass
class RunResult:
    """What one run left: its status, the monitored metric's last value and curve, every metric's last value."""

    steps: int
    seed: int
    status: str
    final: float | None = None
    #: the rows of metrics.csv where the monitored metric was logged: epoch, step and every metric in that row
    curve: list[dict[str, float]] = field(default_factory=list)
    #: the last value of every metric the run logged
    finals: dict[str, float] = field(default_factory=dict)
    #: the mean over the whole run of every metric XGradCallback logged (``xgrad/...``, at its logging steps)
    xgrad_means: dict[str, float] = field(default_factory=dict)
    returncode: int | None = None
    seconds: float | None = None
    log: str | None = None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["s"] = data.pop("steps")
        return {key: json_safe(value) for key, value in data.items()}


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinity as strings, at any depth: results.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a CSVLogger metrics file, each with only the columns that hold a value in that row."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [
            {key: float(value) for key, value in row.items() if value not in ("", None)} for row in csv.DictReader(file)
        ]


def logged_metric_names(rows: Sequence[dict[str, float]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(key for key in row if key not in INDEX_COLUMNS))
    return list(names)


def collect(spec: RunSpec, monitor: str) -> RunResult:
    """The result of a run from its folder: status.json and csv/metrics.csv (``not run`` without a status)."""
    if not spec.status_file.is_file():
        return RunResult(spec.steps, spec.seed, NOT_RUN)
    status = json.loads(spec.status_file.read_text())
    rows = read_metrics(spec.metrics_csv)
    finals: dict[str, float] = {}
    for row in rows:
        finals.update({key: value for key, value in row.items() if key not in INDEX_COLUMNS})
    curve = [row for row in rows if monitor in row]
    xgrad_values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(XGRAD_METRIC_PREFIX):
                xgrad_values.setdefault(key, []).append(value)
    result = RunResult(
        spec.steps,
        spec.seed,
        status["status"],
        curve=curve,
        finals=finals,
        xgrad_means={key: statistics.fmean(values) for key, values in xgrad_values.items()},
        returncode=status.get("returncode"),
        seconds=status.get("seconds"),
        log=str(spec.log),
    )
    if result.status == FINISHED:
        if curve:
            result.final = curve[-1][monitor]
        else:
            result.status = NO_METRIC
    return result


def execute(command: Sequence[str], spec: RunSpec) -> None:
    """Run once, from scratch: the folder is emptied first, output goes to log.txt, the outcome to status.json."""
    shutil.rmtree(spec.folder, ignore_errors=True)
    spec.folder.mkdir(parents=True, exist_ok=True)
    argv = run_command(command, spec)
    start = time.perf_counter()
    with spec.log.open("w") as log:
        log.write(f"$ {shlex.join(argv)}\n\n")
        log.flush()
        returncode = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    status = {
        "status": FINISHED if returncode == 0 else FAILED,
        "returncode": returncode,
        "seconds": round(time.perf_counter() - start, 3),
        "command": argv,
    }
    spec.status_file.write_text(json.dumps(status, indent=1) + "\n")


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def check_executable(program: str) -> None:
    """The command's first word must be a program the system can start (an interpreter, or an executable script):
    raises SweepError naming it and what to do, instead of an OSError from the first run."""
    if shutil.which(program):
        return
    path = Path(program)
    if path.is_dir():
        raise SweepError(f"the command starts with {program}, a directory: start it with the program to run")
    if path.is_file() and os.access(path, os.X_OK):  # executable, but a bare name is looked up on PATH only
        raise SweepError(
            f"the command starts with {program}, which is not on PATH: write it as ./{program}, or start the "
            f"command with its interpreter (-- python {program} ...)"
        )
    if path.is_file():
        raise SweepError(
            f"the command starts with {program}, a file that is not executable: start the command with its "
            f"interpreter (-- python {program} ...), or make it executable"
        )
    raise SweepError(
        f"the command starts with {program!r}, which is neither a file nor a program on PATH: the command after "
        "`--` starts with the program that runs it (-- python my_cli.py fit ...)"
    )


def interpreter(program: str) -> str:
    """What the command's first word runs: the program as found on PATH, or for a script, its ``#!`` line."""
    path = shutil.which(program) or program
    try:
        with open(path, "rb") as file:
            first = file.readline(256)
    except OSError:
        return path
    return first[2:].decode(errors="replace").strip() if first.startswith(b"#!") else path


class TrainerStarted(Exception):
    """The probed program constructed a Lightning Trainer (it printed what :data:`TRAINER_STARTED` matches)."""


def probe(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with its output captured, in a process group of its own. As soon as its output shows a Trainer
    being constructed (TrainerStarted), past ``timeout`` seconds (subprocess.TimeoutExpired), or on Ctrl-C, the whole
    group is killed, the program's own worker processes with it, and the exception raised."""
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    ) as process:
        started = threading.Event()
        streams = {name: _Reader(getattr(process, name), started) for name in ("stdout", "stderr")}
        try:
            deadline = time.monotonic() + timeout
            while process.poll() is None:
                if started.is_set():
                    raise TrainerStarted()
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(list(argv), timeout)
                started.wait(0.05)
            for reader in streams.values():
                reader.join()
        except BaseException:
            _kill_group(process)
            raise
    return subprocess.CompletedProcess(list(argv), process.returncode, streams["stdout"].text, streams["stderr"].text)


class _Reader(threading.Thread):
    """Collects one output stream of the probed program, and sets ``started`` when a Trainer shows up in it."""

    def __init__(self, stream: Any, started: threading.Event) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self._trainer_seen = started
        self._lines: list[str] = []
        self.start()

    def run(self) -> None:
        for line in self._stream:
            self._lines.append(line)
            if TRAINER_STARTED.match(line):
                self._trainer_seen.set()

    @property
    def text(self) -> str:
        return "".join(self._lines)


def _kill_group(process: subprocess.Popen[str]) -> None:
    if sys.platform == "win32":
        process.kill()
        return
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(process.pid, signal.SIGKILL)


def last_exception(output: str) -> str | None:
    """The exception line of the last Python traceback in ``output`` (``ModuleNotFoundError: No module named
    'torch'``): what the program itself raised, which says more than the exit status. None without a traceback."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    # the traceback's frames are indented; its first line that is not is the exception
    line = next((line for line in lines[starts[-1] + 1 :] if line[:1].strip()), "")
    return line if EXCEPTION_LINE.fullmatch(line) else None


def check_failure(argv: Sequence[str], process: subprocess.CompletedProcess[str]) -> str:
    """Why the ``--print_config`` check failed, the cause first: an environment that cannot import what the program
    needs, an exception the program raised, or (no traceback: the parser refused them) the sweep's arguments."""
    output = "\n".join((process.stdout + process.stderr).splitlines()[-15:])
    detail = f":\n  $ {shlex.join(argv)}\n{output}"
    exception = last_exception(process.stderr)
    if exception is None:
        return (
            "the command does not accept the sweep's arguments (it must be a LightningCLI program; the sweep "
            f"checked with --print_config appended){detail}"
        )
    name, _, message = exception.partition(": ")
    if name in ("ModuleNotFoundError", "ImportError"):
        missing = MISSING_MODULE.fullmatch(message)
        what = f"cannot import {missing['module'].split('.')[0]}" if missing else "fails at an import"
        return (
            f"the program's environment {what} ({exception}); the command runs {interpreter(argv[0])}: install "
            "what the program needs there, or start the command with a Python that has it "
            f"(-- /path/to/python my_cli.py ...){detail}"
        )
    return f"the command raised {exception} when the sweep checked it with --print_config appended{detail}"


def check_command(
    command: Sequence[str],
    steps: int,
    seed: int,
    scratch: Path,
    log_every_n_steps: int | None = None,
    timeout: float = DEFAULT_CHECK_TIMEOUT_S,
) -> None:
    """Run the command once with the sweep's arguments for ``steps`` and ``--print_config`` appended: a LightningCLI
    program parses them and prints its configuration without training, and the printed config shows whether
    XGradCallback is already there (the sweep adds it itself for s > 0 and must leave it out for s = 0). A program
    that has not answered within ``timeout`` seconds is stopped: it is training instead. Raises SweepError with what
    went wrong."""
    import yaml

    spec = RunSpec(steps, seed, scratch, log_every_n_steps)
    argv = [*run_command(command, spec), "--print_config"]
    check_executable(argv[0])
    try:
        process = probe(argv, timeout)
    except TrainerStarted:
        raise SweepError(
            "the command constructed a Lightning Trainer instead of printing its configuration for --print_config, "
            "so the sweep stopped it before any run: a LightningCLI program prints its configuration and exits, a "
            "plain script trains. Sweep a LightningCLI program (lightning.pytorch.cli.LightningCLI)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SweepError(
            f"the command did not answer --print_config within {timeout:g} s, so the sweep stopped it before any "
            "run: a LightningCLI program prints its configuration and exits, a plain script trains instead. Sweep a "
            "LightningCLI program, or if yours takes longer to start, raise --check-timeout"
        ) from None
    except OSError as error:
        raise SweepError(
            f"the command cannot be started ({error}): start it with its interpreter (-- python my_cli.py ...)"
        ) from None
    if process.returncode != 0:
        raise SweepError(check_failure(argv, process))
    try:
        config = yaml.safe_load(process.stdout)
    except yaml.YAMLError:
        config = None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        raise SweepError(
            f"the command printed no Trainer configuration with --print_config (is it a LightningCLI program?):\n"
            f"  $ {shlex.join(argv)}\n{process.stdout[-2000:]}"
        )
    callbacks = trainer.get("callbacks") or []
    xgrad = [c for c in callbacks if isinstance(c, dict) and str(c.get("class_path", "")).endswith("XGradCallback")]
    if len(xgrad) > (1 if steps > 0 else 0):
        raise SweepError(
            "XGradCallback is already in the command's configuration (trainer.callbacks, from a config file or a "
            "flag). The sweep adds it itself for s > 0 and runs s = 0 without it: remove it from the command or "
            "its config and run the sweep again."
        )
    loggers = trainer.get("logger")
    last_logger = loggers[-1] if isinstance(loggers, list) and loggers else None
    if not (
        isinstance(last_logger, dict) and last_logger.get("init_args", {}).get("save_dir") == str(scratch.resolve())
    ):
        raise SweepError(f"the sweep's CSVLogger did not reach trainer.logger: {loggers!r}")
    if steps > 0 and xgrad[-1].get("init_args", {}).get("steps") != steps:
        raise SweepError(f"the sweep's --trainer.callbacks.steps={steps} did not reach XGradCallback: {xgrad[-1]!r}")
    logged = xgrad[-1].get("init_args", {}).get("log_every_n_steps") if steps > 0 else log_every_n_steps
    if log_every_n_steps is not None and logged != log_every_n_steps:
        raise SweepError(
            f"the sweep's --trainer.callbacks.log_every_n_steps={log_every_n_steps} did not reach XGradCallback: "
            f"{xgrad[-1]!r}"
        )
