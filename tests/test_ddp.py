"""XGrad under DDP (2 CPU processes, gloo) equals XGrad in one process on the same global batches.

``tests/ddp_script.py`` runs the DDP fits in a subprocess (Lightning relaunches the script it runs); this module
replays the same global batches in one process: with ``DistributedSampler(shuffle=False)`` rank r's batch i holds
samples ``2*b*i + r, 2*b*i + r + 2, ...``, so both ranks together hold ``[2*b*i, 2*b*(i+1))``, which is batch i of a
non-shuffling loader with batch size 2*b. The MSE over the 2*b samples is the mean of the ranks' means, which is what
DDP's gradient averaging computes. Each rank predicts locally from its own (identical) optimizer state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_xgrad import XGradCallback
from tests.agreement import ATOL, RTOL
from tests.ddp_script import EPOCHS, LOG_EVERY, PER_RANK_BATCH, WORLD_SIZE, N
from tests.toolkit import OPTIMIZERS, TinyModule, XGradMetricsRecorder, flat, loader, make_data, trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
#: a state rule (Adam) and an optimizer that gets the trajectory rule (RMSprop without momentum)
DDP_OPTIMIZERS = ["adam", "rmsprop"]
# DDP sums the two ranks' gradients (gloo all-reduce) where one process sums 2*b per-sample terms in another order:
# within the agreement tolerance (tests/agreement.py)
STEPS = EPOCHS * N // (WORLD_SIZE * PER_RANK_BATCH)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Both optimizers' DDP fits, in one script invocation (each launch costs several seconds of start-up)."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "tests/ddp_script.py", "--out", str(out), "--optimizers", *DDP_OPTIMIZERS]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"DDP script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {
        name: [torch.load(out / f"{name}_rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
        for name in DDP_OPTIMIZERS
    }


def single_process(name: str, xgrad: bool, metrics: XGradMetricsRecorder | None = None) -> torch.Tensor:
    """One process, the same global batches: batch size WORLD_SIZE * PER_RANK_BATCH, no shuffling; ``metrics``
    records what the callback logs."""
    x, y = make_data(N)
    module = TinyModule(OPTIMIZERS[name])
    callbacks = [XGradCallback(log_every_n_steps=LOG_EVERY)] if xgrad else []
    run = trainer(max_epochs=EPOCHS, callbacks=[*callbacks, *([metrics] if metrics else [])])
    run.fit(module, loader(x, y, WORLD_SIZE * PER_RANK_BATCH))
    assert run.global_step == STEPS
    return flat(module)


@pytest.mark.parametrize("name", DDP_OPTIMIZERS)
def test_ddp_matches_single_process(ddp_results: dict[str, list[dict[str, Any]]], name: str) -> None:
    ranks = ddp_results[name]
    x, _ = make_data(N)

    # the premise: rank r trained on samples r, r+2, ... in order, every epoch, PER_RANK_BATCH at a time
    for rank, result in enumerate(ranks):
        assert result["global_step"] == STEPS
        assert result["inputs"].shape == (STEPS, PER_RANK_BATCH, x.shape[1])
        assert torch.equal(result["inputs"].reshape(-1, x.shape[1]), x[rank::WORLD_SIZE].repeat(EPOCHS, 1))

    # DDP keeps the replicas identical: same averaged gradient, same state, same local prediction
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])

    ddp = ranks[0]["params"]
    xgrad = single_process(name, xgrad=True)
    baseline = single_process(name, xgrad=False)
    torch.testing.assert_close(ddp, xgrad, rtol=RTOL, atol=ATOL)

    # and the prediction really acted: far from the run without it, compared with the DDP/single-process gap
    gap = float((ddp - xgrad).abs().max())
    effect = float((ddp - baseline).abs().max())
    assert effect > 1e-3, f"XGrad changed the weights by only {effect:.3g}"
    assert effect > 100 * gap, f"XGrad's effect {effect:.3g} is not well above the DDP gap {gap:.3g}"


@pytest.mark.parametrize("name", DDP_OPTIMIZERS)
def test_ddp_ranks_compute_the_same_metrics_as_one_process(
    ddp_results: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """The replicas are identical, so every rank computes the same relative shift and prediction metrics, with no
    communication (Lightning's loggers write rank 0's), and they are those of the single process."""
    ranks = ddp_results[name]
    metrics = XGradMetricsRecorder()
    single_process(name, xgrad=True, metrics=metrics)
    expected = metrics.tensors()
    logged_steps = [step for step in range(STEPS) if step % LOG_EVERY == 0 and step > 0]  # step 0 predicts nothing
    for key, values in expected.items():
        assert torch.nonzero(~values.isnan()).flatten().tolist() == logged_steps, key
        assert torch.equal(ranks[0][key].nan_to_num(), ranks[1][key].nan_to_num()), key  # bit for bit
        torch.testing.assert_close(ranks[0][key], values, rtol=1e-3, atol=0, equal_nan=True)
