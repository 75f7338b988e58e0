"""What the package needs from the installed torch and Lightning, checked on whichever stack runs the suite.

Every private API behind ``lightning_xgrad._internal.compat`` is exercised against what the package assumes of it, so a
release that changes one fails here by name rather than somewhere inside a fit. A torch without
``torch.distributed.tensor`` is simulated in subprocesses: the package must import, fit on one device and under DDP,
and refuse only ModelParallelStrategy, naming the torch release it needs. ``tools/compat.py`` (``make test-compat``)
runs this on every supported stack; the declared floors must be the ones it installs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_xgrad import CPropCallback, XGradCallback
from lightning_xgrad._internal import compat as _compat
from lightning_xgrad._internal.sharding import MODEL_PARALLEL_TORCH, model_parallel_unsupported
from lightning_xgrad.callback_checks import check_setup

from .agreement import ATOL, RTOL
from .ddp_script import EPOCHS, PER_RANK_BATCH, WORLD_SIZE, N
from .toolkit import TinyModule, flat, loader, make_data, trainer

REPO = Path(__file__).resolve().parent.parent


def compat_tool() -> ModuleType:
    """tools/compat.py, the script that installs and runs each stack (loaded once)."""
    if "compat_tool" in sys.modules:
        return sys.modules["compat_tool"]
    spec = importlib.util.spec_from_file_location("compat_tool", REPO / "tools" / "compat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- declared and tested
def test_tested_ranges_are_the_floor_and_newest_stacks() -> None:
    stacks = compat_tool().STACKS
    floor, newest = stacks["floor"], stacks["newest"]
    assert (floor.torch.rsplit(".", 1)[0], newest.torch.rsplit(".", 1)[0]) == _compat.TESTED_TORCH
    assert (floor.lightning.rsplit(".", 1)[0], newest.lightning.rsplit(".", 1)[0]) == _compat.TESTED_LIGHTNING
    assert _compat.TESTED_TORCH[0] == MODEL_PARALLEL_TORCH


# ------------------------------------------------------------------------------------------- torch's private APIs
def test_foreach_by_default_is_false_on_the_cpu() -> None:
    """torch's optimizers take their single-tensor path on the CPU; so do this package's."""
    assert _compat.foreach_by_default([torch.zeros(3), torch.zeros(2, 2)]) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_new_step_count_is_a_cpu_scalar_of_the_default_dtype(dtype: torch.dtype) -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        count = _compat.new_step_count()
    finally:
        torch.set_default_dtype(default)
    assert count.dim() == 0 and count.device.type == "cpu" and count.dtype == dtype and float(count) == 0.0


def test_view_as_real_replaces_complex_tensors_by_views_in_every_list() -> None:
    params = [torch.tensor([1 + 2j, 3 - 4j]), torch.tensor([5.0])]
    states = [torch.zeros(2, dtype=torch.complex64), torch.zeros(1)]
    complex_param = params[0]
    _compat.view_as_real_(params, states)
    assert params[0].shape == (2, 2) and params[0].dtype == torch.float32
    assert states[0].shape == (2, 2) and states[1].shape == (1,)
    params[0].mul_(2)  # a view: the write lands in the original complex tensor
    assert torch.equal(complex_param, torch.tensor([2 + 4j, 6 - 8j]))


def test_group_by_device_and_dtype_keeps_indices_and_none_entries() -> None:
    params = [torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.ones(4)]
    buffers: list[torch.Tensor | None] = [None, torch.zeros(3, dtype=torch.float64), torch.ones(4)]
    groups = _compat.group_by_device_and_dtype([params, buffers])
    by_dtype = {tensors[0][0].dtype: (tensors, indices) for tensors, indices in groups}
    assert set(by_dtype) == {torch.float32, torch.float64}
    tensors, indices = by_dtype[torch.float32]
    assert indices == [0, 2]
    assert tensors[0][0] is params[0] and tensors[0][1] is params[2]
    assert tensors[1][0] is None and tensors[1][1] is buffers[2]
    assert by_dtype[torch.float64][1] == [1]


# --------------------------------------------------------------------------------------- Lightning's private state
class _TrainerStateRecorder(Callback):
    """What the Lightning accessors read at every batch start and end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, bool, int, bool]] = []
        self.callbacks: list[Any] = []

    def _record(self, hook: str, trainer: Any, batch_idx: int) -> None:
        row = (
            hook,
            batch_idx,
            _compat.should_accumulate(trainer),
            _compat.batches_that_stepped(trainer),
            _compat.backward_is_skipped(trainer),
        )
        self.rows.append(row)
        self.callbacks = _compat.trainer_callbacks(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._record("start", trainer, batch_idx)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._record("end", trainer, batch_idx)


def test_lightning_accessors_read_accumulation_steps_and_callbacks() -> None:
    """Five batches with accumulate_grad_batches=2: windows [0, 1], [2, 3], and [4] (Lightning forces a step on the
    epoch's last batch); the step counter Lightning logs with moves after each stepping batch's end hooks."""
    x, y = make_data(40)
    recorder = _TrainerStateRecorder()
    xgrad = XGradCallback()
    trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[xgrad, recorder]).fit(TinyModule(), loader(x, y, 8))
    accumulate = [True, True, False, False, True, True, False, False, False, False]
    stepped = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    hooks = ["start", "end"] * 5
    rows = zip(hooks, accumulate, stepped, strict=True)
    assert recorder.rows == [(hook, i // 2, acc, steps, False) for i, (hook, acc, steps) in enumerate(rows)]
    assert xgrad in recorder.callbacks and recorder in recorder.callbacks
    assert _compat.trainer_callbacks(object()) == []


def test_backward_is_skipped_in_stochastic_weight_averagings_last_epoch() -> None:
    """StochasticWeightAveraging's extra epoch only recomputes BatchNorm statistics: the fit loop skips backward."""
    x, y = make_data(32)
    module = TinyModule()
    module.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))  # SWA needs one
    recorder = _TrainerStateRecorder()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    trainer(max_epochs=2, callbacks=[XGradCallback(), swa, recorder]).fit(module, loader(x, y, 8))
    skipped = [row[4] for row in recorder.rows if row[0] == "start"]
    assert skipped == [False] * 8 + [True] * 4


# ------------------------------------------------------------------------------------------------ DTensor or not
def test_model_parallel_is_supported_where_torch_has_dtensor() -> None:
    pytest.importorskip("torch.distributed.tensor")
    assert model_parallel_unsupported() is None
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), callbacks=[XGradCallback()])
    check_setup(trainer, XGradCallback)  # does not raise


#: Runs a script as if torch lacked ``torch.distributed.tensor``. torch's and Lightning's own modules import it, so
#: they are imported first; from then on every ``from torch.distributed.tensor import ...`` fails, as on such a torch,
#: and lightning_xgrad is imported only after that. Lightning's DDP launcher reruns this file (sys.argv[0]) on the
#: other rank, which reads the script to run from the environment.
NO_DTENSOR_LAUNCHER = """
import os, runpy, sys
import torch
import lightning.pytorch
assert "lightning_xgrad" not in sys.modules
sys.modules["torch.distributed.tensor"] = None
runpy.run_path(os.environ["NO_DTENSOR_SCRIPT"], run_name="__main__")
"""

#: Without DTensor: every module of the package imports, a one-device fit trains, ModelParallelStrategy is refused.
NO_DTENSOR_CHECKS = """
import importlib, json, pkgutil, sys
from pathlib import Path
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import ModelParallelStrategy
import lightning_xgrad
from lightning_xgrad import CPropCallback, XGradCallback
from lightning_xgrad._internal.sharding import DTENSOR_MISSING, model_parallel_unsupported
from tests.toolkit import TinyModule, flat, loader, make_data, trainer

modules = sorted(m.name for m in pkgutil.walk_packages(lightning_xgrad.__path__, "lightning_xgrad."))
modules = [name for name in modules if not name.endswith(".__main__")]  # that one runs the sweep
for name in modules:
    importlib.import_module(name)
x, y = make_data(40)
module = TinyModule()
trainer(max_epochs=2, callbacks=[XGradCallback(), CPropCallback()]).fit(module, loader(x, y))
torch.save(flat(module), Path(sys.argv[1]) / "single.pt")
refused = None
try:
    run = trainer(strategy=ModelParallelStrategy(), callbacks=[XGradCallback()], max_epochs=1)
    run.fit(TinyModule(), loader(x, y))
except MisconfigurationException as error:
    refused = str(error)
report = {"missing": DTENSOR_MISSING, "reason": model_parallel_unsupported(), "modules": modules, "refused": refused}
(Path(sys.argv[1]) / "report.json").write_text(json.dumps(report))
"""


def _run_without_dtensor(tmp_path: Path, script: Path, *args: str) -> None:
    launcher = tmp_path / "no_dtensor_launcher.py"
    launcher.write_text(NO_DTENSOR_LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["NO_DTENSOR_SCRIPT"] = str(script)
    command = [sys.executable, str(launcher), *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{script.name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


def test_without_dtensor_the_package_imports_trains_and_refuses_only_model_parallel(tmp_path: Path) -> None:
    script = tmp_path / "no_dtensor_checks.py"
    script.write_text(NO_DTENSOR_CHECKS)
    _run_without_dtensor(tmp_path, script, str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())

    assert report["missing"].startswith(f"torch {torch.__version__} has no torch.distributed.tensor.DTensor")
    assert "lightning_xgrad.callback" in report["modules"] and "lightning_xgrad.heavy_ball.optim" in report["modules"]
    message = report["refused"]
    assert message is not None, "ModelParallelStrategy was not refused"
    assert message.startswith("XGradCallback does not support ModelParallelStrategy")
    assert f"torch>={MODEL_PARALLEL_TORCH}" in message and report["reason"] in message

    # the one-device fit is the fit a torch with DTensor makes
    x, y = make_data(40)
    module = TinyModule()
    trainer(max_epochs=2, callbacks=[XGradCallback(), CPropCallback()]).fit(module, loader(x, y))
    torch.testing.assert_close(torch.load(tmp_path / "single.pt", weights_only=True), flat(module), rtol=0, atol=0)


def test_without_dtensor_ddp_matches_one_process(tmp_path: Path) -> None:
    """tests/ddp_script.py's DDP fit (2 CPU processes), without DTensor on both ranks, equals XGrad in one process."""
    from .test_ddp import single_process

    _run_without_dtensor(tmp_path, REPO / "tests" / "ddp_script.py", "--out", str(tmp_path), "--optimizers", "adam")
    ranks = [torch.load(tmp_path / f"adam_rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    assert all(r["global_step"] == EPOCHS * N // (WORLD_SIZE * PER_RANK_BATCH) for r in ranks)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    torch.testing.assert_close(ranks[0]["params"], single_process("adam", xgrad=True), rtol=RTOL, atol=ATOL)
