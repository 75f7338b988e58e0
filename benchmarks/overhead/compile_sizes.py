"""Where ``compile=True`` pays off: predict() + restore() with the compiled kernel forced on every bucket
(``compile_min_bytes=0``) against eager, for AdamW over buckets of n tensors of e float32 elements.

A forward and backward of the step timing's cnn runs between predict() and restore(), as the training step runs
between the callback's hooks: the compiled call's fixed cost (guards, wrapper) is larger there than in a tight loop
of predictions, and that is the cost a user pays. The two variants alternate; medians over all timed pairs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lightning_xgrad import OptimizerPredictor
from lightning_xgrad.rules.compiled import DEFAULT_COMPILE_MIN_BYTES

from .models import cnn

#: (tensors, float32 elements per tensor) of the buckets measured: 0.05-12.5 MiB, 1-200 tensors
BUCKETS = (
    (14, 1024),
    (1, 65536),
    (14, 8192),
    (200, 1024),
    (1, 262144),
    (4, 65536),
    (1, 524288),
    (8, 65536),
    (100, 5243),
    (1, 1048576),
    (14, 65536),
    (200, 4096),
    (200, 16384),
)
#: timed predict() + restore() per variant and round, after as many untimed (compiling, first allocations)
REPEATS = 12


def _training_step() -> Callable[[], None]:
    """A forward and backward of the step timing's cnn at batch 64, on fixed data."""
    generator = torch.Generator().manual_seed(0)
    model = cnn()
    inputs = torch.randn(64, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 10, (64,), generator=generator)

    def step() -> None:
        nn.functional.cross_entropy(model(inputs), targets).backward()

    return step


def _adamw(tensors: int, elements: int) -> torch.optim.Optimizer:
    """AdamW (foreach) over ``tensors`` parameters after two steps with random gradients, so its state exists."""
    generator = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(elements, generator=generator)) for _ in range(tensors)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(elements, generator=generator)
        optimizer.step()
    return optimizer


def _time(predictor: OptimizerPredictor, step: Callable[[], None], repeats: int) -> list[float]:
    """Milliseconds of predict() + restore() around ``step``, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict()
        predicted = time.perf_counter()
        step()
        restore = time.perf_counter()
        predictor.restore(stepped=False)
        times.append((predicted - start + time.perf_counter() - restore) * 1e3)
    return times


def measure_compile_sizes(buckets: list[tuple[int, int]], rounds: int, repeats: int = REPEATS) -> dict[str, Any]:
    """Eager and compiled hooks' medians per bucket, their ratio, and the default threshold they are judged by."""
    step = _training_step()
    rows = []
    for tensors, elements in tqdm(buckets, desc="compile sizes", unit="bucket"):
        optimizer = _adamw(tensors, elements)
        predictors = {
            "eager": OptimizerPredictor(optimizer),
            "compiled": OptimizerPredictor(optimizer, compile=True, compile_min_bytes=0),
        }
        times: dict[str, list[float]] = {name: [] for name in predictors}
        for predictor in predictors.values():
            _time(predictor, step, repeats)  # untimed: compiling, first allocations
        for _ in range(rounds):
            for name, predictor in predictors.items():
                times[name] += _time(predictor, step, repeats)
        eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
        rows.append(
            {
                "tensors": tensors,
                "elements": elements,
                "bytes": tensors * elements * 4,
                "eager_ms": eager,
                "compiled_ms": compiled,
                "compiled_over_eager": compiled / eager,
            }
        )
    return {"rows": rows, "rounds": rounds, "repeats": repeats, "default_min_bytes": DEFAULT_COMPILE_MIN_BYTES}
