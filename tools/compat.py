"""Run the test suite on each supported torch x Lightning x Python stack, one virtual environment per stack.

    python tools/compat.py                 # the default stacks, whole suite (`make test-compat`)
    python tools/compat.py --core          # the core tests only (`make test-compat-core`)
    python tools/compat.py floor py313     # named stacks
    python tools/compat.py --list          # the stacks and what each installs
    python tools/compat.py newest -- -x    # after --: further pytest arguments

Each stack gets a virtual environment under ``--venvs`` (default ``.venv-compat/<stack>``), made with that Python:
torch first (pinned), then the package with its ``[dev]`` extra and the pinned Lightning (torch pinned again, so
nothing upgrades it). A venv is reused while its stack and pyproject.toml are unchanged. Every install and test run
is timed (wall clock); ``--out`` (default ``compat-results/``) gets each stack's pytest log, ``results.json`` and
``results.md``, the table docs/compatibility.md quotes. The exit status is 0 only when every stack installed and its
tests ran with none failed.

Runs with the standard library alone, on any Python >= 3.10.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stack:
    """One supported combination: the Python minor version and the exact torch and Lightning releases."""

    python: str
    torch: str
    lightning: str
    #: what the stack stands for, shown in the tables
    role: str
    #: further pins some other package needs on this stack (none so far)
    pins: tuple[str, ...] = field(default_factory=tuple)
    #: releases pyproject.toml does not admit: the package goes in without its dependencies, which are installed
    #: from its metadata with the stack's torch and Lightning instead of the declared ones
    below_floors: bool = False

    def requirements(self) -> list[str]:
        return [f"torch=={self.torch}", f"lightning=={self.lightning}", *self.pins]


#: The stacks, oldest first. "floor" holds the lowest releases pyproject.toml admits; "newest" the newest ones the
#: package index serves (docs/compatibility.md says which cap applies there).
STACKS: dict[str, Stack] = {
    "floor": Stack(python="3.10", torch="2.6.0", lightning="2.5.0", role="the floors pyproject.toml declares"),
    "newest": Stack(python="3.11", torch="2.14.1", lightning="2.6.6", role="the newest torch and Lightning"),
    "py313": Stack(python="3.13", torch="2.14.1", lightning="2.6.6", role="the newest releases on Python 3.13"),
    "below-floor": Stack(
        python="3.10",
        torch="2.5.1",
        lightning="2.4.0",
        role="below the floors: a probe, not supported",
        below_floors=True,
    ),
}
DEFAULT_STACKS = ["floor", "newest"]

#: The core of the suite: what meets torch's and Lightning's own machinery. The callback's lifecycle and the dW rules,
#: DDP, FSDP2 and tensor parallelism, torch.compile, precision plugins, manual optimization, Fabric, Lightning's
#: weight-averaging callbacks, the private accessors and the real-weights guarantees; the sweep, benchmark, example
#: and packaging tests are left to `make test-compat`. `make test-compat-core` (run by CI) runs these on every
#: default stack.
CORE_TESTS = [
    "tests/test_lifecycle.py",
    "tests/test_rules.py",
    "tests/test_ddp.py",
    "tests/test_compat.py",
    "tests/test_model_parallel.py",
    "tests/test_compiled.py",
    "tests/test_precision.py",
    "tests/test_real_weights.py",
    "tests/test_manual.py",
    "tests/test_fabric.py",
    "tests/test_third_party.py",
    "tests/test_equivalence.py",
]

SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def find_python(version: str) -> str:
    """An interpreter of ``version`` ("3.10"): ``pythonX.Y`` on PATH if it runs, else one under pyenv's root."""
    candidates = [shutil.which(f"python{version}") or ""]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    raise InstallError(
        f"no working Python {version} found (on PATH as python{version}, or under {pyenv_root}/versions)"
    )


def run_logged(command: list[str], log: Path, *, cwd: Path = REPO) -> tuple[int, float]:
    """Run ``command`` with its output appended to ``log``; its exit status and wall-clock seconds."""
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
    return code, time.monotonic() - start


def stack_key(stack: Stack, python: str, torch_index: str | None) -> str:
    return json.dumps({"stack": asdict(stack), "python": python, "torch_index": torch_index}, sort_keys=True)


def prepare_venv(name: str, stack: Stack, venv: Path, log: Path, torch_index: str | None) -> dict[str, object]:
    """Create or reuse the stack's venv; the seconds each install took (0 when reused)."""
    python = find_python(stack.python)
    key = stack_key(stack, python, torch_index)
    stamp, installed = venv / ".compat-stack", venv / ".compat-installed"
    timings: dict[str, object] = {"torch_install_s": 0.0, "package_install_s": 0.0}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if not stamp.is_file() or stamp.read_text() != key:
        shutil.rmtree(venv, ignore_errors=True)
        start = time.monotonic()
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        index = ["--index-url", torch_index] if torch_index else []
        code, _ = run_logged([*pip, f"torch=={stack.torch}", *index], log)
        if code:
            raise InstallError(f"installing torch {stack.torch} failed (exit {code}, see {log})")
        timings["torch_install_s"] = round(time.monotonic() - start, 1)
        stamp.write_text(key)
    package_key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + key.encode()).hexdigest()
    if not installed.is_file() or installed.read_text() != package_key:
        start = time.monotonic()
        if stack.below_floors:
            code, _ = run_logged([*pip, "--no-deps", "-e", "."], log)
            requirements = [*dev_requirements(venv), *stack.requirements()] if code == 0 else []
            code = code or run_logged([*pip, *requirements], log)[0]
        else:
            code, _ = run_logged([*pip, "-e", ".[dev]", *stack.requirements()], log)
        if code:
            raise InstallError(f"installing the package with {stack.requirements()} failed (exit {code}, see {log})")
        timings["package_install_s"] = round(time.monotonic() - start, 1)
        installed.write_text(package_key)
    return timings


def dev_requirements(venv: Path) -> list[str]:
    """The requirements of the package's ``[dev]`` extra (its own extras expanded) from its installed metadata, less
    torch and Lightning: what a stack below the declared floors installs beside its own torch and Lightning."""
    script = "import importlib.metadata as m, json; print(json.dumps(m.requires('lightning-xgrad') or []))"
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True)
    by_extra: dict[str, list[str]] = {}
    for line in json.loads(result.stdout):
        requirement, _, marker = line.partition(";")
        extra = re.search(r"extra\s*==\s*[\"']([\w-]+)[\"']", marker)
        by_extra.setdefault(extra.group(1) if extra else "", []).append(requirement.strip())
    wanted, extras = [], ["", "dev"]
    while extras:
        for requirement in by_extra.get(extras.pop(), []):
            itself = re.fullmatch(r"lightning-xgrad\[([\w,-]+)\]", requirement.replace(" ", ""))
            if itself:
                extras.extend(itself.group(1).split(","))
            elif re.split(r"[\s<>=!~\[;]", requirement)[0].lower() not in ("torch", "lightning"):
                wanted.append(requirement)
    return sorted(set(wanted))


class InstallError(RuntimeError):
    """A stack's venv could not be made: the stack counts as failed."""


def installed_versions(venv: Path) -> dict[str, str]:
    """The versions the stack's tests ran with, read from the venv itself."""
    script = (
        "import importlib.metadata as m, json, platform\n"
        "names = ['torch', 'lightning', 'numpy', 'transformers', 'pytorch_optimizer', 'jsonargparse', 'torchmetrics']\n"
        "out = {'python': platform.python_version()}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout))


def parse_counts(output: str) -> dict[str, int]:
    """pytest's closing counts ("12 passed, 1 skipped in 3.2s"), from the last line that has them."""
    for line in reversed(output.splitlines()):
        if " in " in line and SUMMARY.search(line):
            counts = {("error" if kind.startswith("error") else kind): int(n) for n, kind in SUMMARY.findall(line)}
            return {k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error", "xfailed", "xpassed")}
    return {}


def run_stack(name: str, stack: Stack, args: argparse.Namespace) -> dict[str, object]:
    venv = args.venvs / name
    log = args.out / f"{name}{'-core' if args.core else ''}.log"
    log.write_text("")
    tests = CORE_TESTS if args.core else []
    command = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *args.pytest_args]
    result: dict[str, object] = {
        "stack": name,
        "role": stack.role,
        "requested": stack.requirements(),
        "python_requested": stack.python,
        "selection": "core" if args.core else "all",
        "command": " ".join(["python -m pytest -q -p no:cacheprovider", *tests, *args.pytest_args]),
        "date": datetime.date.today().isoformat(),
        "log": str(log.relative_to(REPO) if log.is_relative_to(REPO) else log),
    }
    try:
        result.update(prepare_venv(name, stack, venv, log, args.torch_index))
    except InstallError as error:
        result.update(status="install failed", reason=str(error))
        return result
    result["versions"] = installed_versions(venv)
    command[0] = str(venv / "bin" / "python")
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    result["test_s"] = round(time.monotonic() - start, 1)
    counts = parse_counts(log.read_text())
    result["counts"] = counts
    result["exit_code"] = code
    result["status"] = "passed" if code == 0 and counts.get("passed", 0) > 0 else "failed"
    return result


def install_seconds(result: dict[str, object]) -> float:
    """The wall-clock seconds a stack's installs took in this run (0 for a reused venv)."""
    return sum(float(str(result.get(key) or 0)) for key in ("torch_install_s", "package_install_s"))


def markdown(results: dict[str, dict[str, object]]) -> str:
    """The results as the table docs/compatibility.md shows."""
    lines = [
        "| stack | Python | torch | Lightning | tests | passed | failed | skipped | install (s) | tests (s) | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        versions = r.get("versions") or {}
        assert isinstance(versions, dict)
        counts = r.get("counts") or {}
        assert isinstance(counts, dict)
        install = install_seconds(r)
        failed = counts.get("failed", 0) + counts.get("error", 0)
        lines.append(
            f"| {name} | {versions.get('python', r['python_requested'])} | {versions.get('torch', '?')} | "
            f"{versions.get('lightning', '?')} | {r['selection']} | {counts.get('passed', '-')} | "
            f"{failed if counts else r.get('status')} | {counts.get('skipped', '-')} | {install:.0f} | "
            f"{r.get('test_s', '-')} | {r['date']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stacks", nargs="*", default=DEFAULT_STACKS, help=f"stacks to run (default: {DEFAULT_STACKS})")
    parser.add_argument("--core", action="store_true", help="run the core tests only: " + " ".join(CORE_TESTS))
    parser.add_argument("--venvs", type=Path, default=REPO / ".venv-compat", help="where the venvs live")
    parser.add_argument("--out", type=Path, default=REPO / "compat-results", help="where logs and results go")
    parser.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX") or None, help="pip index for torch")
    parser.add_argument("--list", action="store_true", help="print the stacks and exit")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # after --: further pytest arguments
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.pytest_args = extra
    if args.list:
        for name, stack in STACKS.items():
            default = " (default)" if name in DEFAULT_STACKS else ""
            print(f"{name}{default}: Python {stack.python}, {' '.join(stack.requirements())}: {stack.role}")
        return 0
    unknown = [s for s in args.stacks if s not in STACKS]
    if unknown:
        parser.error(f"unknown stacks {unknown}; known: {list(STACKS)}")
    args.venvs, args.out = args.venvs.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    results: dict[str, dict[str, object]] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    failed = []
    start = time.monotonic()
    for name in args.stacks:
        stack = STACKS[name]
        print(f"[compat] {name}: Python {stack.python}, {' '.join(stack.requirements())} ...", flush=True)
        result = run_stack(name, stack, args)
        key = f"{name}{' (core)' if args.core else ''}"
        results[key] = result
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "results.md").write_text(markdown(results))
        versions = result.get("versions") or {}
        assert isinstance(versions, dict)
        ran = ", ".join(f"{k} {versions[k]}" for k in ("python", "torch", "lightning") if k in versions)
        print(
            f"[compat] {name} ({ran or result.get('reason')}): {result['status']}; install "
            f"{install_seconds(result):.0f} s, tests {result.get('test_s', '-')} s; log {result['log']}",
            flush=True,
        )
        counts = result.get("counts") or {}
        assert isinstance(counts, dict)
        if counts:  # pytest's closing counts, in the plain form CI reads
            failures = counts["failed"] + counts["error"]
            print(f"{name}: {counts['passed']} passed, {failures} failed, {counts['skipped']} skipped", flush=True)
        if result["status"] != "passed":
            failed.append(name)
            tail = (args.out / Path(str(result["log"])).name).read_text().splitlines()[-40:]
            print("\n".join(f"    {line}" for line in tail), flush=True)
    print(f"[compat] {len(args.stacks)} stacks in {time.monotonic() - start:.0f} s; results: {results_file}")
    if failed:
        print(f"[compat] failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
