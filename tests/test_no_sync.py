"""No host-device sync in a training step: the predictor's hooks, the optimizers of ``lightning_xgrad.optim`` and the
callbacks never read a tensor's value on the host.

On a GPU each such read (``.item()``, ``float(t)``, ``bool(t)`` in a Python branch, a 0-dim tensor passed where torch
takes a Python number) waits for every queued kernel. On the CPU the same reads are visible as calls of
``aten::_local_scalar_dense`` (what ``.item()`` runs) or of ops whose result the host must see (``aten::equal``,
``aten::nonzero``, ...): :class:`HostReads` records them with a ``TorchDispatchMode``, which sees the tensor read, over
whole steps (prediction, forward, backward, restore, update, and the callbacks' hooks around them).

One kind of read is excluded, by the identity of the tensor read: the optimizers' per-parameter ``step`` counters
kept on the CPU (and NAdam's ``mu_product``, kept there alike). torch keeps them there on purpose (reading a CPU
tensor never waits for a GPU), its own Adam reads them with ``.item()`` every step, and so do this package's
optimizers. Step counters that live on an accelerator
(capturable or fused Adam) must never be read: :func:`test_step_counters_kept_on_an_accelerator_are_never_read`
treats the CPU counters as device ones and allows no read at all. The logged ``xgrad/relative_shift`` is read on the
host on its logging steps only (a value to log has to be); it is off here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_xgrad import CPropCallback, OptimizerPredictor, XGradCallback
from lightning_xgrad.cprop import CPropAdam, CPropSGD
from lightning_xgrad.heavy_ball import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD
from lightning_xgrad.optim import AdaM3

from .toolkit import TinyModule, flat, loader, make_data, make_net, simulate_accelerator_step_counts, trainer

aten = torch.ops.aten
#: ops whose result the host reads: each waits for the device on a GPU
HOST_READS = {
    aten._local_scalar_dense.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.allclose.default,
}


#: the per-parameter scalars torch's optimizers keep on the CPU unless capturable or fused: the step count, and
#: NAdam's product of momenta
CPU_SCALARS = ("step", "mu_product")


def cpu_step_counters(optimizers: Iterable[torch.optim.Optimizer]) -> set[int]:
    """The storage addresses of every per-parameter step counter (``CPU_SCALARS``) the optimizers keep on the CPU."""
    return {
        state[name].data_ptr()
        for optimizer in optimizers
        for state in optimizer.state.values()
        for name in CPU_SCALARS
        if isinstance(state.get(name), Tensor) and state[name].device.type == "cpu"
    }


class HostReads(TorchDispatchMode):
    """Records every host read of a tensor (``HOST_READS``) except of the tensors ``allowed()`` names by address."""

    def __init__(self, allowed: Callable[[], set[int]] = set) -> None:
        super().__init__()
        self.allowed = allowed
        self.reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in HOST_READS:
            tensor = args[0]
            if tensor.data_ptr() not in self.allowed():
                self.reads.append(f"{func} of a {tuple(tensor.shape)} {tensor.dtype} tensor")
        return func(*args, **(kwargs or {}))


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),  # trajectory rule
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=0.005, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05, fused=True),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),  # trajectory rule
    "adam3": lambda p: AdaM3(p, lr=0.01),
    "adam3_foreach": lambda p: AdaM3(p, lr=0.01, foreach=True),
    "cprop_sgd": lambda p: CPropSGD(p, lr=0.05, momentum=0.9),
    "cprop_sgd_foreach": lambda p: CPropSGD(p, lr=0.05, momentum=0.9, foreach=True),
    "cprop_adam": lambda p: CPropAdam(p, lr=0.01),
    "cprop_adam_foreach": lambda p: CPropAdam(p, lr=0.01, foreach=True),
    "heavy_ball_sgd": lambda p: AdaptiveHeavyBallSGD(p, lr=0.05, weight_decay=1e-3),
    "heavy_ball_adam": lambda p: AdaptiveHeavyBallAdam(p, lr=0.01, weight_decay=1e-3),
}


def _train_step(net: nn.Module, predictor: OptimizerPredictor, x: Tensor, y: Tensor) -> bool:
    predicted = predictor.predict()
    predictor.optimizer.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    predictor.restore()
    predictor.optimizer.step()
    return predicted


def _trained(name: str) -> tuple[nn.Module, OptimizerPredictor, Tensor, Tensor]:
    """The test net with optimizer ``name`` under a predictor, after three predicted steps (its state exists)."""
    net = make_net()
    x, y = make_data(8)
    predictor = OptimizerPredictor(OPTIMIZERS[name](net.parameters()))
    for _ in range(3):
        _train_step(net, predictor, x, y)
    return net, predictor, x, y


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_predicted_step_reads_nothing_on_the_host(name: str) -> None:
    """Prediction, forward, backward, restore and the update of every optimizer family, in a plain loop."""
    net, predictor, x, y = _trained(name)
    recorder = HostReads(lambda: cpu_step_counters([predictor.optimizer]))
    with recorder:
        for _ in range(2):
            assert _train_step(net, predictor, x, y)  # really predicted: not a trivially empty step
    assert recorder.reads == []


def test_step_counters_kept_on_an_accelerator_are_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused and capturable optimizers keep ``step`` on the device: the rules then compute their bias corrections
    with tensor ops. Here the CPU counters are taken for device ones, and no read of any tensor is allowed."""
    simulate_accelerator_step_counts(monkeypatch)
    for name in ("adam", "adam_amsgrad", "adamax", "radam"):
        predictor = _trained(name)[1]
        recorder = HostReads()
        with recorder:
            assert predictor.predict()
            predictor.restore()
        assert recorder.reads == [], name


def test_the_callbacks_read_nothing_on_the_host() -> None:
    """A Trainer with XGradCallback and CPropCallback: from each batch start to its end (both callbacks' hooks, the
    optimizers' step hooks, the update), nothing is read on the host but CPU step counters."""
    recorders: list[HostReads] = []
    real: list[Tensor] = []
    predicted: list[Tensor] = []

    class Start(Callback):  # first in the list
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            real.append(flat(pl_module))
            if trainer.global_step >= 2:
                recorder = HostReads(lambda: cpu_step_counters(trainer.optimizers))
                recorders.append(recorder)
                recorder.__enter__()

    class Predicted(Callback):  # after XGradCallback: the step really predicts
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            predicted.append(flat(pl_module))  # compared after fit: torch.equal is a host read

    class End(Callback):  # last in the list
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if recorders and recorders[-1] is torch.utils._python_dispatch._get_current_dispatch_mode():
                recorders[-1].__exit__(None, None, None)

    xgrad = XGradCallback(steps=1)
    module = TinyModule(OPTIMIZERS["adamw_foreach"])
    callbacks = [Start(), CPropCallback(), xgrad, Predicted(), End()]
    trainer(callbacks=callbacks, max_steps=6).fit(module, loader(*make_data(48)))
    assert len(recorders) == 4
    assert all(not torch.equal(w_hat, w) for w_hat, w in zip(predicted[2:], real[2:], strict=True))
    assert [read for recorder in recorders for read in recorder.reads] == []
