"""``xgrad/prediction_cosine`` and ``xgrad/prediction_error``: read back from a CSVLogger and checked against hand
computations (SGD momentum on a linear loss, in closed form) and against a plain-PyTorch computation of W, W_hat and
W_next (Adam); per optimizer under manual optimization; nothing for a step the GradScaler skipped; only at the
callback's logging steps, and without cost (allocations) on the others.

Notation: optimizer step t = 1, 2, ... runs in batch b = t - 1 and is logged at step b (the step Lightning labels that
batch's metrics with); d = W_hat - W is the prediction made before step t, u = W_next - W the update step t applied.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_xgrad import XGradCallback
from lightning_xgrad._internal.chunks import Chunks, budget_for

from .reference import xgrad_reference
from .toolkit import OPTIMIZERS, TinyModule, batches, flat, loader, make_data, make_net, trainer

COSINE, ERROR, SHIFT = "xgrad/prediction_cosine", "xgrad/prediction_error", "xgrad/relative_shift"


def logged(folder: Path, name: str) -> dict[int, float]:
    """step -> value of ``name`` in a CSVLogger's metrics.csv; every step at most once."""
    with open(folder / "metrics.csv") as handle:
        rows = [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle) if row.get(name)]
    steps = [step for step, _ in rows]
    assert len(set(steps)) == len(steps), f"{name} logged twice at a step: {steps}"
    return dict(rows)


def csv_logger(folder: Path) -> CSVLogger:
    return CSVLogger(folder, name="", version="")


# ---------------------------------------------------------------- SGD momentum on a linear loss, in closed form
#
# loss_t = <c_a, a> + (-1)^t <c_b, b>: the gradient does not depend on the weights (so it is the same at W_hat), it is
# g_a = c_a for `a`, and g_b = (-1)^t c_b for `b`, alternating. torch's SGD with momentum mu and dampening 0 starts
# its buffer at the first gradient and then buf_t = mu * buf_{t-1} + g_t, so after t steps
#     a: buf_t = S_t c_a,  S_t = 1 + mu + ... + mu^(t-1) = (1 - mu^t) / (1 - mu)
#     b: buf_t = A_t c_b,  A_t = (-1)^t (1 - (-mu)^t) / (1 + mu)        (A_1 = -1, A_t = mu A_{t-1} + (-1)^t)
# The update of step t is u = -lr buf_t and the momentum rule's prediction before it d = -s lr buf_{t-1}. With
# alpha = |c_a|^2 and beta = |c_b|^2, |d|^2 = s^2 lr^2 D, |u|^2 = lr^2 U, <d, u> = s lr^2 P where
#     D = alpha S_{t-1}^2 + beta A_{t-1}^2,  U = alpha S_t^2 + beta A_t^2,  P = alpha S_{t-1} S_t + beta A_{t-1} A_t
#     cosine = P / sqrt(D U)
#     error  = ||d - s u|| / ||s u|| = sqrt(alpha (S_{t-1} - S_t)^2 + beta (A_{t-1} - A_t)^2) / sqrt(U)
# (s cancels out of both). A constant gradient (beta = 0): the cosine is 1 and the error
#     (S_t - S_{t-1}) / S_t = mu^(t-1) (1 - mu) / (1 - mu^t)  ->  0 like mu^(t-1) (1 - mu).
# Both parts alternating would give cosine -1 (d points against u: XGrad extrapolates the oscillation); mixed, the
# cosine tends to 2 mu / (1 + mu^2) for alpha = beta (S -> 1/(1-mu), A_{t-1} A_t -> -1/(1+mu)^2).

LR, MU = 0.05, 0.9


def momentum_sums(t: int, mu: float) -> tuple[float, float]:
    """(S_t, A_t) above."""
    return (1 - mu**t) / (1 - mu), (-1) ** t * (1 - (-mu) ** t) / (1 + mu)


def closed_form(t: int, mu: float, alpha: float, beta: float) -> tuple[float, float]:
    """(cosine, error) of the prediction made before step t >= 2."""
    s_prev, a_prev = momentum_sums(t - 1, mu)
    s_now, a_now = momentum_sums(t, mu)
    dot = alpha * s_prev * s_now + beta * a_prev * a_now
    d_sq = alpha * s_prev**2 + beta * a_prev**2
    u_sq = alpha * s_now**2 + beta * a_now**2
    error = math.sqrt(alpha * (s_prev - s_now) ** 2 + beta * (a_prev - a_now) ** 2) / math.sqrt(u_sq)
    return dot / math.sqrt(d_sq * u_sq), error


class LinearLoss(pl.LightningModule):
    """Parameters `a` (constant gradient c_a) and `b` (gradient (-1)^t c_b), float64, SGD with momentum."""

    def __init__(self, c_a: list[float], c_b: list[float], mu: float = MU) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1.0, 1.0, len(c_a), dtype=torch.float64))
        self.b = nn.Parameter(torch.linspace(0.5, 1.5, len(c_b), dtype=torch.float64))
        self.register_buffer("c_a", torch.tensor(c_a, dtype=torch.float64))
        self.register_buffer("c_b", torch.tensor(c_b, dtype=torch.float64))
        self.mu = mu

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        t = self.trainer.global_step + 1  # the optimizer step this batch takes
        return (self.a * self.c_a).sum() + (-1) ** t * (self.b * self.c_b).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=self.mu)


def index_loader(batches: int) -> DataLoader:
    """``batches`` batches whose content nothing reads."""
    return DataLoader(torch.arange(batches, dtype=torch.float64), batch_size=1)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(
    ("c_a", "c_b"),
    [([0.3, -1.0, 2.0], [0.0, 0.0]), ([0.6, -0.8, 0.0], [1.0, 0.0])],
    ids=["constant gradient", "half alternating"],
)
def test_sgd_momentum_on_a_linear_loss_logs_the_closed_form(
    tmp_path: Path, steps: int, c_a: list[float], c_b: list[float]
) -> None:
    every, batches_run = 3, 91
    trainer(
        callbacks=[XGradCallback(steps=steps, log_every_n_steps=every)],
        max_epochs=1,
        logger=csv_logger(tmp_path),
        log_every_n_steps=50,
    ).fit(LinearLoss(c_a, c_b), index_loader(batches_run))
    alpha, beta = sum(c * c for c in c_a), sum(c * c for c in c_b)
    expected = {b: closed_form(b + 1, MU, alpha, beta) for b in range(1, batches_run) if b % every == 0}
    cosines, errors = logged(tmp_path, COSINE), logged(tmp_path, ERROR)
    assert list(cosines) == list(errors) == list(expected)  # exactly at the callback's logging steps
    for b, (cosine, error) in expected.items():
        assert cosines[b] == pytest.approx(cosine, rel=1e-9, abs=1e-12)
        assert errors[b] == pytest.approx(error, rel=1e-9)
    last = max(expected)
    if beta == 0:  # a constant gradient: the prediction is parallel to the update, the error mu^(t-1)(1-mu)/(1-mu^t)
        assert all(c == pytest.approx(1.0, abs=1e-12) for c in cosines.values())
        t = last + 1
        assert errors[last] == pytest.approx(MU ** (t - 1) * (1 - MU) / (1 - MU**t), rel=1e-9)
        assert errors[3] > 0.2 > 1e-3 > errors[last]  # tends to 0
    else:  # alpha = beta: the cosine tends to 2 mu / (1 + mu^2), the error to sqrt(2) (1 - mu) / sqrt(1 + mu^2)
        assert cosines[last] == pytest.approx(2 * MU / (1 + MU**2), abs=1e-3)
        assert errors[last] == pytest.approx(math.sqrt(2) * (1 - MU) / math.sqrt(1 + MU**2), abs=1e-3)


def test_an_alternating_gradient_gives_a_negative_cosine(tmp_path: Path) -> None:
    """Momentum on a purely oscillating gradient: the prediction points against the update (cosine -1)."""
    trainer(
        callbacks=[XGradCallback(log_every_n_steps=1)], max_epochs=1, logger=csv_logger(tmp_path), log_every_n_steps=50
    ).fit(LinearLoss([0.0], [1.0, -2.0], mu=0.5), index_loader(8))
    cosines, errors = logged(tmp_path, COSINE), logged(tmp_path, ERROR)
    assert list(cosines) == list(range(1, 8))
    for b, cosine in cosines.items():
        assert cosine == pytest.approx(-1.0, abs=1e-12)
        assert errors[b] == pytest.approx(closed_form(b + 1, 0.5, 0.0, 5.0)[1], rel=1e-9)


# ---------------------------------------------------------------- Adam, against a plain-PyTorch computation


def reference_quality(name: str, steps: int, epochs: int, x: Tensor, y: Tensor) -> dict[int, tuple[float, float]]:
    """batch -> (cosine, error) from the plain-PyTorch XGrad loop, in float64 over the whole model."""
    net = make_net()
    optimizer = OPTIMIZERS[name](net.parameters())
    quality: dict[int, tuple[float, float]] = {}

    def on_update(t: int, real: dict[Tensor, Tensor], predicted: dict[Tensor, Tensor]) -> None:
        if not real:
            return
        d = torch.cat([(predicted[p] - real[p]).double().flatten() for p in real])
        u = torch.cat([(p.detach() - real[p]).double().flatten() for p in real])
        cosine = float(d @ u / (d.norm() * u.norm()))
        quality[t - 1] = (cosine, float((d - steps * u).norm() / (steps * u).norm()))

    def mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    xgrad_reference(net, optimizer, batches(x, y, 8), mse, steps, epochs=epochs, on_update=on_update)
    return quality


@pytest.mark.parametrize(("name", "steps"), [("adam", 1), ("adamw", 2)])
def test_adam_metrics_equal_the_plain_pytorch_computation(tmp_path: Path, name: str, steps: int) -> None:
    x, y = make_data(80)
    every = 2
    module = TinyModule(OPTIMIZERS[name])
    trainer(
        callbacks=[XGradCallback(steps=steps, log_every_n_steps=every)],
        max_epochs=2,
        logger=csv_logger(tmp_path),
        log_every_n_steps=50,
    ).fit(module, loader(x, y))
    expected = {b: q for b, q in reference_quality(name, steps, 2, x, y).items() if b % every == 0}
    cosines, errors = logged(tmp_path, COSINE), logged(tmp_path, ERROR)
    assert list(cosines) == list(errors) == list(expected) == list(range(2, 20, 2))
    for b, (cosine, error) in expected.items():
        # float32 weights: d = W_hat - W and u = W_next - W are differences of rounded weights
        assert cosines[b] == pytest.approx(cosine, rel=1e-4)
        assert errors[b] == pytest.approx(error, rel=1e-3)
    # AdamW's decoupled decay is in the applied update but not in the prediction: the cosine is below 1
    assert all(-1 <= c < 1 for c in cosines.values())


def test_logging_changes_no_weight(tmp_path: Path) -> None:
    """The measurement reads the weights and never writes them: bit for bit the run without logging."""
    x, y = make_data(80)
    weights = []
    for every in (None, 1):
        module = TinyModule(OPTIMIZERS["adamw"])
        logger = csv_logger(tmp_path / str(every))
        trainer(callbacks=[XGradCallback(log_every_n_steps=every)], max_epochs=2, logger=logger).fit(
            module, loader(x, y)
        )
        weights.append(flat(module))
    assert torch.equal(weights[0], weights[1])


def test_the_rule_is_logged_as_hyperparameters(tmp_path: Path) -> None:
    x, y = make_data(16)
    trainer(callbacks=[XGradCallback(steps=2)], max_epochs=1, logger=csv_logger(tmp_path)).fit(
        TinyModule(OPTIMIZERS["sgd_momentum"]), loader(x, y)
    )
    hparams = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert hparams == {"xgrad/rule": "sgd_momentum", "xgrad/steps": 2}


# ---------------------------------------------------------------- two optimizers, manual optimization


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: `a` (constant gradient) with SGD(momentum=0.9), then `b` (alternating) with
    SGD(momentum=0.5), each stepped once per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([2.0, 0.0], dtype=torch.float64))
        self.c_a = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
        self.c_b = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        t = batch_idx + 1  # each optimizer's own step count
        for opt, loss in ((opt_a, (self.a * self.c_a).sum()), (opt_b, (-1) ** t * (self.b * self.c_b).sum())):
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD([self.a], lr=LR, momentum=0.9), torch.optim.SGD([self.b], lr=LR, momentum=0.5)]


def test_two_optimizers_log_per_optimizer_names(tmp_path: Path) -> None:
    batches_run = 12
    # manual optimization: global_step counts both optimizers' steps (2 per batch), so every 4 is every other batch
    trainer(
        callbacks=[XGradCallback(log_every_n_steps=4)], max_epochs=1, logger=csv_logger(tmp_path), log_every_n_steps=50
    ).fit(TwoOptimizers(), index_loader(batches_run))
    logged_batches = [b for b in range(1, batches_run) if (2 * b) % 4 == 0]
    for index, (mu, alpha, beta) in enumerate([(0.9, 1 + 0.09 + 4.0, 0.0), (0.5, 0.0, 5.0)]):
        cosines = logged(tmp_path, f"{COSINE}/optimizer_{index}")
        errors = logged(tmp_path, f"{ERROR}/optimizer_{index}")
        assert list(cosines) == list(errors) == list(logged(tmp_path, f"{SHIFT}/optimizer_{index}")) == logged_batches
        for b in logged_batches:
            cosine, error = closed_form(b + 1, mu, alpha, beta)
            assert cosines[b] == pytest.approx(cosine, abs=1e-12)
            assert errors[b] == pytest.approx(error, rel=1e-9)
    with open(tmp_path / "metrics.csv") as handle:
        columns = set(csv.DictReader(handle).fieldnames or [])
    assert not columns & {COSINE, ERROR, SHIFT}  # no unsuffixed name with several optimizers
    hparams = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert hparams == {
        "xgrad/rule/optimizer_0": "sgd_momentum",
        "xgrad/rule/optimizer_1": "sgd_momentum",
        "xgrad/steps": 1,
    }


# ---------------------------------------------------------------- a step the GradScaler skips


class PoisonedAt(TinyModule):
    """TinyModule whose loss is infinite at one global step: the GradScaler skips that step's update."""

    def __init__(self, poison_step: int) -> None:
        super().__init__(OPTIMIZERS["adam"])
        self.poison_step = poison_step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.poison_step else loss


def test_a_step_the_grad_scaler_skips_logs_no_prediction_quality(tmp_path: Path) -> None:
    """The prediction was made (its relative shift is logged) but no update was applied: nothing to compare it with,
    so neither metric is logged at that step; the steps around it are measured as usual."""
    x, y = make_data(80)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    module = PoisonedAt(poison_step=5)
    run = trainer(
        callbacks=[XGradCallback(log_every_n_steps=1)],
        max_epochs=1,
        logger=csv_logger(tmp_path),
        log_every_n_steps=50,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    run.fit(module, loader(x, y))
    assert scaler.get_scale() < 2.0**8  # the scaler did skip (and back off)
    shifts, cosines, errors = logged(tmp_path, SHIFT), logged(tmp_path, COSINE), logged(tmp_path, ERROR)
    assert list(shifts) == list(range(1, 10))  # predicted at every step but the first
    assert list(cosines) == list(errors) == [1, 2, 3, 4, 6, 7, 8, 9]  # not at the skipped step 5
    assert all(0 < c <= 1 and math.isfinite(e) for c, e in zip(cosines.values(), errors.values(), strict=True))


def test_steps_at_lr_zero_log_no_prediction_quality(tmp_path: Path) -> None:
    """At lr 0 the prediction is W_hat = W and the update is 0: the cosine is undefined, so nothing is logged."""
    x, y = make_data(80)
    module = TinyModule(OPTIMIZERS["adam"], schedule=lambda step: 0.0 if step in (4, 5) else 1.0)
    trainer(
        callbacks=[XGradCallback(log_every_n_steps=1)], max_epochs=1, logger=csv_logger(tmp_path), log_every_n_steps=50
    ).fit(module, loader(x, y))
    shifts, cosines = logged(tmp_path, SHIFT), logged(tmp_path, COSINE)
    assert shifts[4] == shifts[5] == 0.0
    assert list(cosines) == list(logged(tmp_path, ERROR)) == [1, 2, 3, 6, 7, 8, 9]


# ---------------------------------------------------------------- no cost on other steps


MARK = "xgrad-test: restore"


class AllocationProbe(Callback):
    """Per batch, the CPU allocations the profiler records (every allocation and free, in time order): the bytes
    allocated in the whole batch, and the peak of what was allocated from the restore on and still live. List it
    before XGradCallback and ``probe.end()`` after it, so both of XGradCallback's batch hooks, and its restore, fall
    inside."""

    def __init__(self) -> None:
        self.allocated: list[int] = []
        self.peak_from_restore: list[int] = []
        self._profiler: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        with torch.profiler.record_function(MARK):
            pass

    def end(self) -> Callback:
        probe = self

        class End(Callback):
            def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
                probe._finish()

        return End()

    def _finish(self) -> None:
        self._profiler.__exit__(None, None, None)
        # the raw allocation records (bytes > 0) and frees (< 0), in time order: FunctionEvents would attribute the
        # frees inside an enclosing op (the optimizer's step) to that op's start
        records = list(self._profiler.profiler.kineto_results.events())
        memory = sorted((r.start_ns(), r.nbytes()) for r in records if r.name() == "[memory]")
        (mark,) = [r.start_ns() for r in records if r.name() == MARK]
        self.allocated.append(sum(n for _, n in memory if n > 0))
        live = peak = 0
        for start, n in memory:
            if start >= mark:
                live += n
                peak = max(peak, live)
        self.peak_from_restore.append(peak)


class Wide(TinyModule):
    """A model whose parameters outweigh everything else the update touches: 64 -> 256 -> 256 -> 2, SGD momentum
    without weight decay (its update allocates nothing)."""

    def __init__(self) -> None:
        super().__init__(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 2))


def test_no_allocation_on_steps_that_do_not_log_and_one_copy_or_the_budget_on_steps_that_do(tmp_path: Path) -> None:
    """Within the budget (the default 32 MiB): a logging step holds one copy of the parameters and chunk temporaries.
    With ``metrics_max_bytes`` an eighth of the parameters: at most the budget for the sample and as much again for
    the sampled update. Other steps allocate exactly what the run without logging does."""
    x, y = make_data(80)
    every = 3
    params = list(Wide().parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    budget = param_bytes // 8
    probes = {}
    for name, log_every, max_bytes in (("quiet", None, None), ("exact", every, 32 * 2**20), ("sampled", every, budget)):
        probe = AllocationProbe()
        trainer(
            callbacks=[probe, XGradCallback(log_every_n_steps=log_every, metrics_max_bytes=max_bytes), probe.end()],
            max_epochs=1,
            logger=csv_logger(tmp_path / name),
        ).fit(Wide(), loader(x, y))
        probes[name] = probe
    quiet = probes["quiet"]
    chunk_bytes = max(sum(p.numel() * 4 for p in params[part]) for part in Chunks(params, budget_for(None, params)))
    for b in range(10):
        for name, logging in probes.items():
            if b % every or b == 0:  # no logging step (step 0 predicts nothing): what the run without logging did
                assert logging.allocated[b] == quiet.allocated[b], f"{name}, batch {b}"
                assert logging.peak_from_restore[b] == quiet.peak_from_restore[b], f"{name}, batch {b}"
            elif name == "exact":  # one copy of the parameters (W_hat), and chunk temporaries
                extra = logging.peak_from_restore[b] - quiet.peak_from_restore[b]
                assert param_bytes <= extra <= param_bytes + chunk_bytes + 1024, f"batch {b}: {extra} bytes"
            elif name == "sampled":  # the sample of W_hat, the sampled update, a few scalars
                extra = logging.peak_from_restore[b] - quiet.peak_from_restore[b]
                assert budget // 2 <= extra <= 2 * budget + 1024, f"batch {b}: {extra} bytes"
    # without logging, from the second step on (the first allocates SGD's momentum buffers): a few scalars at most
    assert max(quiet.peak_from_restore[1:]) <= 64


# ---------------------------------------------------------------- W, W_hat and W_next as other callbacks see them


class Trajectory(Callback):
    """By optimizer step: W (the real weights at the window's start), W_hat (what its forward pass sees) and W_next
    (the weights after its update, at the window's last batch end). ``first()`` goes before XGradCallback in the
    list, the recorder itself last."""

    def __init__(self) -> None:
        self.real: dict[int, Tensor] = {}
        self.predicted: dict[int, Tensor] = {}
        self.updated: dict[int, Tensor] = {}

    def first(self) -> Callback:
        recorder = self

        class First(Callback):
            def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
                recorder.real.setdefault(trainer.global_step, flat(pl_module))

        return First()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, i: int) -> None:
        self.predicted.setdefault(trainer.global_step, flat(pl_module))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if trainer.global_step - 1 in self.real and trainer.global_step - 1 not in self.updated:
            self.updated[trainer.global_step - 1] = flat(pl_module)

    def quality(self, step: int, steps: int) -> tuple[float, float]:
        """(cosine, error) of optimizer step ``step`` (0-based), in float64."""
        w, w_hat, w_next = (t[step].double() for t in (self.real, self.predicted, self.updated))
        d, u = w_hat - w, w_next - w
        return float(d @ u / (d.norm() * u.norm())), float((d - steps * u).norm() / (steps * u).norm())


def check_logged(folder: Path, trajectory: Trajectory, logged_steps: list[int], steps: int, rel: float) -> None:
    cosines, errors = logged(folder, COSINE), logged(folder, ERROR)
    assert list(cosines) == list(errors) == logged_steps
    for step in logged_steps:
        cosine, error = trajectory.quality(step, steps)
        assert cosines[step] == pytest.approx(cosine, rel=rel), f"step {step}"
        assert errors[step] == pytest.approx(error, rel=rel), f"step {step}"


def test_accumulation_and_a_validation_mid_window(tmp_path: Path) -> None:
    """Two micro-batches per step and a validation after batch 2 (inside the second window, the prediction set
    aside and brought back): the metrics compare the window's W_hat with its one update, logged at the window's
    step."""
    trajectory = Trajectory()
    x, y = make_data(96)
    trainer(
        callbacks=[trajectory.first(), XGradCallback(log_every_n_steps=2), trajectory],
        max_epochs=1,
        logger=csv_logger(tmp_path),
        log_every_n_steps=50,
        accumulate_grad_batches=2,
        val_check_interval=3,
        limit_val_batches=1,
    ).fit(TinyModule(OPTIMIZERS["adam"]), loader(x, y), loader(*make_data(16, seed=1), batch_size=16))
    check_logged(tmp_path, trajectory, [2, 4], steps=1, rel=1e-4)  # 6 steps; step 0 predicts nothing


@pytest.mark.parametrize("cprop_first", [False, True])
def test_the_update_measured_is_the_one_cprop_applied_whatever_the_callback_order(
    tmp_path: Path, cprop_first: bool
) -> None:
    """CPropCallback rescales each update in the optimizer's step post-hook: the measurement runs after it, so it
    sees the update really applied, also when XGradCallback comes first in the list (and registered its own hooks
    first)."""
    from lightning_xgrad import CPropCallback

    trajectory = Trajectory()
    pair = [XGradCallback(log_every_n_steps=2), CPropCallback(beta=0.9)]
    callbacks = [trajectory.first(), *(reversed(pair) if cprop_first else pair), trajectory]
    x, y = make_data(80)
    trainer(callbacks=callbacks, max_epochs=1, logger=csv_logger(tmp_path), log_every_n_steps=50).fit(
        TinyModule(OPTIMIZERS["sgd_momentum"]), loader(x, y)
    )
    check_logged(tmp_path, trajectory, [2, 4, 6, 8], steps=1, rel=1e-4)


# ---------------------------------------------------------------- bounded memory: a sample within metrics_max_bytes


def test_a_budget_below_the_copy_holds_a_sample_within_it_that_estimates_the_exact_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``metrics_max_bytes`` an eighth of the predicted parameters: every logging step holds at most that much, and
    the logged cosine and error stay close to W, W_hat and W_next's in float64 (a sampler that compared other
    positions of W_hat than of W and W_next, or dropped a tensor, lands far off: the cosine is 0.3 to 0.8 here)."""
    import lightning_xgrad.prediction.predictor as predictor_module
    from lightning_xgrad.prediction.quality import HeldPrediction

    held: list[HeldPrediction] = []

    class Recorded(HeldPrediction):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            held.append(self)
            self.held_bytes = self.nbytes  # compare() frees the copy

    monkeypatch.setattr(predictor_module, "HeldPrediction", Recorded)
    param_bytes = sum(p.numel() * p.element_size() for p in Wide().parameters())
    budget = param_bytes // 8
    trajectory = Trajectory()
    x, y = make_data(80)
    trainer(
        callbacks=[trajectory.first(), XGradCallback(log_every_n_steps=1, metrics_max_bytes=budget), trajectory],
        max_epochs=1,
        logger=csv_logger(tmp_path),
        log_every_n_steps=50,
    ).fit(Wide(), loader(x, y))
    assert len(held) == 9 and all(h.sampled and h.held_bytes <= budget for h in held)
    cosines, errors = logged(tmp_path, COSINE), logged(tmp_path, ERROR)
    assert list(cosines) == list(errors) == list(range(1, 10))
    deviations = []
    for step in cosines:
        cosine, error = trajectory.quality(step, 1)
        assert cosines[step] == pytest.approx(cosine, abs=0.02), f"step {step}"
        assert errors[step] == pytest.approx(error, rel=0.02), f"step {step}"
        deviations.append(abs(cosines[step] - cosine))
    assert max(deviations) > 1e-6  # an estimate from a sample, not the exact value


def real_step(dtype: torch.dtype, budgets: list[int | None]) -> tuple[list[Any], tuple[float, float], int]:
    """One predicted SGD-momentum step of a 6-256-256-2 MLP in ``dtype`` (after two steps that build momentum), with a
    HeldPrediction per budget: (each one's held bytes, sample flag and quality; the float64 (cosine, error) of W,
    W_hat and W_next; the parameters' bytes)."""
    from lightning_xgrad import OptimizerPredictor
    from lightning_xgrad.prediction.quality import HeldPrediction

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 2)).to(dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    predictor = OptimizerPredictor(optimizer)
    x, y = torch.randn(24, 6, dtype=dtype), torch.randn(24, 2, dtype=dtype)
    for t in range(3):
        predictor.predict()
        if t == 2:
            predicted = predictor.predicted_params()
            helds = [HeldPrediction(predicted, budget) for budget in budgets]
            w = torch.cat([real.double().flatten() for _, _, real in predicted])
            w_hat = torch.cat([local.detach().double().flatten() for _, local, _ in predicted])
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[8 * t : 8 * t + 8]), y[8 * t : 8 * t + 8]).backward()
        predictor.restore()
        optimizer.step()
    w_next = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    d, u = w_hat - w, w_next - w
    exact = (float(d @ u / (d.norm() * u.norm())), float((d - u).norm() / u.norm()))
    results = [(h.nbytes, h.sampled, h.compare(1)) for h in helds]
    return results, exact, sum(p.numel() * p.element_size() for p in net.parameters())


def test_a_budget_the_parameters_fit_in_is_bit_identical_to_no_budget() -> None:
    """m = 1: a budget of exactly the parameters' bytes holds all of W_hat, and its values are those of
    ``metrics_max_bytes=None`` bit for bit; one byte less, and a sample is held."""
    param_bytes = 4 * (6 * 256 + 256 + 256 * 256 + 256 + 256 * 2 + 2)
    (exact, fits, below), reference, total = real_step(torch.float32, [None, param_bytes, param_bytes - 1])
    assert total == param_bytes
    assert exact[:2] == fits[:2] == (param_bytes, False)
    assert fits[2] == exact[2]  # the same floats
    assert exact[2].cosine == pytest.approx(reference[0], abs=1e-6)
    assert below[1] and below[0] <= param_bytes - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_sample_within_the_budget_estimates_a_real_step(dtype: torch.dtype) -> None:
    """Budgets of an eighth and a sixty-fourth of the parameters (about 8000 and 800 elements), in float32 and
    bfloat16 (sums in float32): within the budget, and close to the float64 values (measured: within 0.008 and 0.044
    of the cosine)."""
    bytes_per = torch.finfo(dtype).bits // 8
    total = bytes_per * (6 * 256 + 256 + 256 * 256 + 256 + 256 * 2 + 2)
    budgets = [total // 8, total // 64]
    results, (cosine, error), _ = real_step(dtype, budgets)
    for budget, tolerance, (nbytes, sampled, quality) in zip(budgets, [0.02, 0.1], results, strict=True):
        assert sampled and nbytes <= budget
        assert quality.cosine == pytest.approx(cosine, abs=tolerance)
        assert quality.error == pytest.approx(error, rel=tolerance)
        assert quality.cosine != pytest.approx(cosine, abs=1e-7)  # an estimate, not the exact value


def test_the_sample_does_not_repeat_one_column_of_a_matrix() -> None:
    """A 512 x 64 matrix whose even columns move along the prediction and odd columns against it: cosine 0, error
    sqrt(2). A stride of 64 (the row length) would see one column only (cosine +-1); the prime stride (67) walks
    through the columns."""
    from lightning_xgrad.prediction.quality import HeldPrediction

    w = torch.zeros(512, 64)
    param = w.clone()
    param[:, :] = 1.0  # W_hat
    held = HeldPrediction([(param, param, w)], max_bytes=param.numel() * 4 // 64)
    assert held.strides == [67] and held.nbytes <= param.numel() * 4 // 64
    param[:, 1::2] = -1.0  # W_next: odd columns against the prediction
    quality = held.compare(1)
    assert quality is not None
    assert quality.cosine == pytest.approx(0.0, abs=0.01)
    assert quality.error == pytest.approx(math.sqrt(2), rel=0.01)


def test_a_budget_below_one_element_per_tensor_is_refused_with_the_argument_named() -> None:
    from lightning_xgrad.prediction.quality import HeldPrediction

    tensors = [torch.zeros(100), torch.zeros(3, dtype=torch.float64), torch.zeros(0)]
    with pytest.raises(ValueError) as info:
        HeldPrediction([(t, t, t.clone()) for t in tensors], 15, None, "XGradCallback", "metrics_max_bytes")
    assert str(info.value) == (
        "XGradCallback: `metrics_max_bytes` must be None or at least 16 bytes for these parameters (one element of "
        "each of 2 tensors), got 15"
    )
    held = HeldPrediction([(t, t, t.clone()) for t in tensors], 16)
    assert held.nbytes == 16 and [h.numel() for h in held.predicted] == [2, 1, 0]  # 8 bytes each
