"""The command line: one subcommand per measurement, ``all`` for every one (the published run), ``replot``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __doc__ as PACKAGE_DOC
from .calls import CALL_SIZES, UNUSED_TENSORS, measure_calls, rule_families
from .compile_sizes import BUCKETS, measure_compile_sizes
from .models import MODELS, OPTIMIZER_CHOICES, OPTIMIZERS
from .report import calls_report, compile_report, plots, steps_report, write
from .steps import VARIANTS, raw, run_steps, summarize

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "benchmarks" / "runs"
PROGRAM = "python -m benchmarks.overhead"


def _steps_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("step timing")
    group.add_argument(
        "--cases",
        nargs="+",
        choices=[f"{m}-{o}" for m in MODELS for o in OPTIMIZER_CHOICES],
        default=[f"{m}-{o}" for m in MODELS for o in OPTIMIZERS],
        help="model-optimizer pairs (default: %(default)s)",
    )
    group.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="(default: all)")
    group.add_argument("--precision", default="32-true", help="the Trainer's precision (default: %(default)s)")
    group.add_argument("--runs", type=int, default=8, help="interleaved runs per variant (default: %(default)s)")
    group.add_argument("--steps", type=int, default=50, help="measured steps per run (default: %(default)s)")
    group.add_argument("--warmup", type=int, default=6, help="unmeasured steps per run (default: %(default)s)")
    return parser


def _calls_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("calls")
    group.add_argument(
        "--calls-sizes",
        type=int,
        nargs="+",
        default=list(CALL_SIZES),
        help="tensor counts of the models, multiples of 4 (default: %(default)s)",
    )
    group.add_argument("--calls-rules", nargs="+", metavar="RULE", help="rule families (default: all)")
    group.add_argument(
        "--calls-repeats", type=int, default=10, help="timed predict() + restore() per case (default: %(default)s)"
    )
    group.add_argument(
        "--calls-unused-tensors",
        type=int,
        default=UNUSED_TENSORS,
        help="used tensors next to the unused module, a multiple of 4 (default: %(default)s)",
    )
    group.add_argument(
        "--chunk-bytes", type=int, help="the predictor's chunk_bytes (default: the package's default budget)"
    )
    return parser


def _bucket(text: str) -> tuple[int, int]:
    """``NxE``: n tensors of e elements."""
    tensors, _, elements = text.partition("x")
    try:
        bucket = int(tensors), int(elements)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TENSORSxELEMENTS, e.g. 14x8192") from None
    if min(bucket) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: tensors and elements must be >= 1")
    return bucket


def _compile_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("compile sizes")
    group.add_argument(
        "--compile-buckets",
        type=_bucket,
        nargs="+",
        default=list(BUCKETS),
        metavar="NxE",
        help="buckets of N float32 tensors of E elements (default: 13 from 0.05 to 12.5 MiB)",
    )
    group.add_argument(
        "--compile-rounds", type=int, default=3, help="alternating rounds of eager and compiled (default: %(default)s)"
    )
    return parser


def _device_option() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="(default: cuda where torch sees a CUDA device, else cpu)",
    )
    return parser


def _output_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("output")
    group.add_argument("--out", type=Path, help="output folder (default: a new folder under benchmarks/runs/)")
    group.add_argument(
        "--publish", action="store_true", help="also write the results to benchmarks/results/ (the published ones)"
    )
    group.add_argument("--name", default="overhead", help="file name stem of the outputs (default: %(default)s)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=PACKAGE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    steps, calls, device, output = _steps_options(), _calls_options(), _device_option(), _output_options()
    sizes = _compile_options()
    for name, parents, text in [
        ("steps", [steps, device, output], "the step timing inside a Trainer"),
        ("calls", [calls, device, output], "ATen calls, host reads and memory per predict() + restore()"),
        ("compile", [sizes, output], "where compile=True pays off: eager and compiled hooks by bucket size (CPU)"),
        ("all", [steps, calls, sizes, device, output], "every measurement (the published run: all --publish)"),
    ]:
        command = commands.add_parser(name, parents=parents, help=text, description=text)
        if device not in parents:
            command.set_defaults(device="cpu")
    text = "only redraw the plot from a results JSON"
    replot = commands.add_parser("replot", parents=[output], help=text, description=text)
    replot.add_argument("json", type=Path, metavar="JSON", help="a results JSON with a step timing or compile sizes")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what a run would fail on, or regret, before it starts."""
    if args.publish and args.command != "all" and args.name == "overhead":
        parser.error(
            f"--publish with `{args.command}` alone would replace the published overhead.md, which holds both "
            "measurements: publish `all`, or give the files another --name (e.g. --name calls)"
        )
    if args.command in ("compile", "all") and args.compile_rounds < 1:
        parser.error("--compile-rounds must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device")
    if args.command in ("steps", "all") and (args.runs < 1 or args.steps < 2 or args.warmup < 4):
        parser.error(
            "--runs must be >= 1, --steps >= 2 (steps alternate) and --warmup >= 4 (the first prediction, at step 2, "
            "allocates the snapshot: memory is measured after it)"
        )
    if args.command in ("calls", "all"):
        families = list(rule_families(torch.device(args.device)))
        unknown = sorted(set(args.calls_rules or families) - set(families))
        if unknown:
            parser.error(f"--calls-rules: unknown {unknown}; on {args.device} the families are {families}")
        if any(size < 4 or size % 4 for size in [*args.calls_sizes, args.calls_unused_tensors]):
            parser.error("--calls-sizes and --calls-unused-tensors must be positive multiples of 4 (4 tensors a block)")
        if args.calls_repeats < 1:
            parser.error("--calls-repeats must be >= 1")
        if args.chunk_bytes is not None and args.chunk_bytes < 0:
            parser.error(f"--chunk-bytes must be >= 0, got {args.chunk_bytes}")


def _replot(parser: argparse.ArgumentParser, source: Path, folders: list[Path], name: str) -> None:
    data = json.loads(source.read_text())
    if "summary" not in data and "compile_sizes" not in data:
        parser.error(f"{source} holds no step timing or compile sizes to plot (a calls run)")
    drawn = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        drawn += plots(data, folder, name)
    print("wrote " + ", ".join(str(path) for path in drawn))


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else RUNS / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folders = [out, RESULTS] if args.publish else [out]
    if args.command == "replot":
        _replot(parser, args.json, folders, args.name)
        return
    _check(parser, args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*max_steps.*")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the CPU memory measurement uses the profiler: keep it quiet
    command = f"{PROGRAM} {shlex.join(argv if argv is not None else sys.argv[1:])}"
    device = _device_name(args.device)
    data: dict[str, Any] = {"command": command, "device": device, "torch": torch.__version__}
    sections: list[str] = []
    if args.command in ("steps", "all"):
        results, wall = run_steps(args)
        data |= {"summary": summarize(results), "raw": raw(results), "precision": args.precision}
        sections.append(steps_report(data["summary"], command, device, wall, args))
    if args.command in ("calls", "all"):
        rules = args.calls_rules or list(rule_families(torch.device(args.device)))
        sizes, repeats, unused = args.calls_sizes, args.calls_repeats, args.calls_unused_tensors
        data["calls"] = measure_calls(rules, sizes, repeats, torch.device(args.device), unused, args.chunk_bytes)
        sections.append(calls_report(data["calls"], command, device))
    if args.command in ("compile", "all"):
        data["compile_sizes"] = measure_compile_sizes(args.compile_buckets, args.compile_rounds)
        sections.append(compile_report(data["compile_sizes"], command, _device_name("cpu")))
    markdown = "\n\n".join(sections)
    written = write(folders, args.name, data, markdown)
    print(markdown)
    print("\nwrote " + ", ".join(written))
