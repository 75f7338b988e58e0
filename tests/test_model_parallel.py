"""XGrad under ModelParallelStrategy (FSDP2, 2 CPU processes, gloo) equals XGrad in one unsharded process.

``tests/fsdp2_script.py`` runs the sharded fits in a subprocess (Lightning relaunches the script it runs); this module
replays the same global batches in one process, unsharded, exactly as ``tests/test_ddp.py`` does for DDP: rank r's
batch i holds samples ``2*b*i + r, 2*b*i + r + 2, ...``, both ranks together ``[2*b*i, 2*b*(i+1))``, which is batch i
of a non-shuffling loader with batch size 2*b; FSDP2's reduce-scatter averages the ranks' gradients, so the MSE over
the 2*b samples is what the sharded run minimises. Parameters and optimizer state are DTensors sharded on dim 0,
unevenly (15 rows: 8 + 7), and one parameter has an empty shard on rank 1.

The baseline (no callback) must match first: that proves the harness before XGrad is involved.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.agreement import ATOL, RTOL
from tests.ddp_script import EPOCHS, PER_RANK_BATCH, WORLD_SIZE, N
from tests.fsdp2_script import CPU_FSDP2_MISSING, UnevenModule, xgrad_callback
from tests.toolkit import OPTIMIZERS, TinyModule, XGradMetricsRecorder, flat, loader, make_data, trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the Adam rule (DTensor exp_avg, exp_avg_sq), the momentum-buffer rule (SGD), the trajectory rule (RMSprop)
OPTIMIZER_NAMES = ["adam", "sgd_momentum", "rmsprop"]
#: baselines first, so the harness is checked even when an XGrad fit fails; one fit also logs the relative shift
RUNS = [f"{name}:baseline" for name in OPTIMIZER_NAMES] + [f"{name}:xgrad" for name in OPTIMIZER_NAMES]
RUNS.append("adam:xgrad_logged")
# gloo's reduce-scatter sums the two ranks' gradients where one process sums 2*b per-sample terms in another order;
# measured: at most 1.7e-7 (baselines) and 2.4e-7 (XGrad) absolute after 20 steps, within the agreement tolerance
STEPS = EPOCHS * N // (WORLD_SIZE * PER_RANK_BATCH)
#: dim-0 sharding of (15, 6), (15,), (2, 15), (2,), (1, 2) over two ranks: uneven, and empty for `scale` on rank 1
LOCAL_NUMELS = [[48, 8, 15, 1, 2], [42, 7, 15, 1, 0]]

#: the prediction metrics compare differences of weights (W_hat - W, W_next - W) that agree to the tolerance above
QUALITY_RTOL = 1e-3

Results = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Results, str]:
    """Every sharded fit, in one script invocation (start-up dominates); with the script's output for failures."""
    if CPU_FSDP2_MISSING is not None:
        pytest.skip(CPU_FSDP2_MISSING)
    out = tmp_path_factory.mktemp("fsdp2")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "tests/fsdp2_script.py", "--out", str(out), "--runs", *RUNS]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = f"fsdp2_script.py exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results: Results = {}
    for run in RUNS:
        name, mode = run.split(":")
        files = [out / f"{name}_{mode}_rank{rank}.pt" for rank in range(WORLD_SIZE)]
        if all(f.exists() for f in files):
            results[f"{name}_{mode}"] = [torch.load(f, weights_only=True) for f in files]
    return results, log


def ranks_of(sharded: tuple[Results, str], name: str, mode: str) -> list[dict[str, Any]]:
    """Both ranks' results of one fit; a failed fit fails the test with the script's output."""
    results, log = sharded
    if f"{name}_{mode}" not in results:
        pytest.fail(f"the sharded {mode} fit with {name} left no results\n{log}")
    return results[f"{name}_{mode}"]


@functools.cache
def single_process(name: str, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One unsharded process, the same global batches: final parameters and the logged metrics per batch
    (``logged_shift``, ``logged_cosine``, ``logged_error``)."""
    x, y = make_data(N)
    module = UnevenModule(OPTIMIZERS[name])
    metrics = XGradMetricsRecorder()
    run = trainer(max_epochs=EPOCHS, callbacks=[*([] if mode == "baseline" else [xgrad_callback(mode)]), metrics])
    run.fit(module, loader(x, y, WORLD_SIZE * PER_RANK_BATCH))
    assert run.global_step == STEPS
    return flat(module), metrics.tensors()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_sharded_baseline_matches_single_process(sharded: tuple[Results, str], name: str) -> None:
    """The harness: without XGrad, the FSDP2 fit equals the unsharded one on the same global batches."""
    ranks = ranks_of(sharded, name, "baseline")
    x, _ = make_data(N)
    for rank, result in enumerate(ranks):
        assert result["global_step"] == STEPS
        # rank r trained on samples r, r+2, ... in order, every epoch, PER_RANK_BATCH at a time
        assert torch.equal(result["inputs"].reshape(-1, x.shape[1]), x[rank::WORLD_SIZE].repeat(EPOCHS, 1))
        # really sharded, unevenly, with an empty shard
        assert result["local_numels"].tolist() == LOCAL_NUMELS[rank]
        # the probe itself: without a prediction, state_dict() and the parameters are the recorded weights
        assert result["probe"].shape == (STEPS, 4)
        assert torch.all(result["probe"][:, :3] == 0)
        assert torch.all(result["probe"][:, 3] == 1), "state_dict() values are not DTensors sharded like the params"
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    baseline, _ = single_process(name, "baseline")
    torch.testing.assert_close(ranks[0]["params"], baseline, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_sharded_xgrad_matches_single_process(sharded: tuple[Results, str], name: str) -> None:
    ranks = ranks_of(sharded, name, "xgrad")
    for rank, result in enumerate(ranks):
        assert result["global_step"] == STEPS
        assert result["local_numels"].tolist() == LOCAL_NUMELS[rank]
    # every rank's full_tensor() gathers the same shards, so this checks the gather; the shards are compared below
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])

    fsdp2 = ranks[0]["params"]
    xgrad, _ = single_process(name, "xgrad")
    baseline, _ = single_process(name, "baseline")
    torch.testing.assert_close(fsdp2, xgrad, rtol=RTOL, atol=ATOL)

    # the prediction really acted: far from the run without it, compared with the sharded/single-process gap
    gap = float((fsdp2 - xgrad).abs().max())
    effect = float((fsdp2 - baseline).abs().max())
    assert effect > 1e-3, f"XGrad changed the weights by only {effect:.3g}"
    assert effect > 100 * gap, f"XGrad's effect {effect:.3g} is not well above the sharded gap {gap:.3g}"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_mid_window_reports_real_weights(sharded: tuple[Results, str], name: str) -> None:
    """``state_dict()`` while W_hat is in the parameters: the real W, as DTensors sharded like the parameters."""
    probes = [result["probe"] for result in ranks_of(sharded, name, "xgrad")]
    for rank, probe in enumerate(probes):
        sd_gap, dcp_gap, shift, sd_dtensor = probe.unbind(1)
        # the prediction is in place at every batch but the first (no optimizer state, no applied update yet)
        assert shift[0] == 0, f"rank {rank}: predicted before the first step"
        assert torch.all(shift[1:] > 0), f"rank {rank}: no prediction at batches {torch.nonzero(shift[1:] == 0)}"
        assert torch.all(sd_dtensor == 1), f"rank {rank}: state_dict() values are not DTensors sharded like the params"
        assert torch.all(sd_gap == 0), f"rank {rank}: state_dict() differs from the real weights by {sd_gap.max()}"
        assert torch.all(dcp_gap == 0), f"rank {rank}: a full get_model_state_dict differs by {dcp_gap.max()}"
    assert torch.equal(probes[0], probes[1])


def test_logged_relative_shift_is_global(sharded: tuple[Results, str]) -> None:
    """``xgrad/relative_shift`` is ``||W_hat - W|| / ||W||`` over the whole model on every rank, not one shard's."""
    ranks = ranks_of(sharded, "adam", "xgrad_logged")
    expected = single_process("adam", "xgrad_logged")[1]["logged_shift"]
    assert math.isnan(expected[0]) and not torch.isnan(expected[1:]).any()
    # every rank logs the same value (sums of squares all-reduced), and that is the unsharded model's
    torch.testing.assert_close(ranks[1]["logged_shift"], ranks[0]["logged_shift"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ranks[0]["logged_shift"], expected, rtol=RTOL, atol=0, equal_nan=True)


def test_logged_prediction_quality_is_global(sharded: tuple[Results, str]) -> None:
    """``xgrad/prediction_cosine`` and ``xgrad/prediction_error`` are the whole model's on every rank, not one
    shard's: the same on both ranks (partial sums all-reduced, the empty shard included) and the unsharded run's."""
    ranks = ranks_of(sharded, "adam", "xgrad_logged")
    expected = single_process("adam", "xgrad_logged")[1]
    for key in ("logged_cosine", "logged_error"):
        assert math.isnan(expected[key][0]) and not torch.isnan(expected[key][1:]).any()  # step 0 predicts nothing
        torch.testing.assert_close(ranks[1][key], ranks[0][key], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(ranks[0][key], expected[key], rtol=QUALITY_RTOL, atol=0, equal_nan=True)


def test_tensor_parallel_equals_one_process_and_logs_the_same_shift(tmp_path) -> None:
    """Column- and row-wise sharded weights and a replicated bias (counted once in the logged shift and the
    prediction metrics)."""
    from tests.tp_script import BATCH, EPOCHS, N

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "tests/tp_script.py", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"tp_rank{r}.pt", weights_only=True) for r in range(2)]

    metrics = XGradMetricsRecorder()
    single = TinyModule(OPTIMIZERS["adam"])
    trainer(max_epochs=EPOCHS, callbacks=[xgrad_callback("xgrad_logged"), metrics]).fit(
        single, loader(*make_data(N), batch_size=BATCH)
    )
    baseline = TinyModule(OPTIMIZERS["adam"])
    trainer(max_epochs=EPOCHS).fit(baseline, loader(*make_data(N), batch_size=BATCH))

    for rank in ranks:
        torch.testing.assert_close(rank["params"], flat(single), rtol=RTOL, atol=ATOL)
        expected = metrics.tensors()
        # step 0 predicts nothing
        torch.testing.assert_close(rank["logged_shift"][1:], expected["logged_shift"][1:], rtol=1e-5, atol=0)
        for key in ("logged_cosine", "logged_error"):
            torch.testing.assert_close(rank[key][1:], expected[key][1:], rtol=QUALITY_RTOL, atol=0)
    assert (flat(single) - flat(baseline)).abs().max() > 100 * ATOL
