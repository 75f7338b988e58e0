"""XGrad under every CPU precision: the prediction is written, equals W - lr*dW, and the restore is bit-exact.

Each test is a real ``Trainer.fit`` on CPU. Two spy callbacks sandwich ``XGradCallback`` in the callbacks list
(callbacks run in list order): the one before it records the real weights and the optimizer's state at the start of
each step, the one after it records the predicted weights (``on_train_batch_start``) and the restored weights
(``on_before_optimizer_step``, which under 16-mixed runs after ``scaler.unscale_`` and before ``scaler.step``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from lightning_xgrad import XGradCallback
from tests.toolkit import OPTIMIZERS, TinyModule, flat, loader, make_data, trainer

PRECISIONS = ["32-true", "bf16-mixed", "bf16-true", "16-true", "16-mixed"]
PARAM_DTYPE = {"bf16-true": torch.bfloat16, "16-true": torch.float16}
#: a modest initial loss scale, so that only the step a test poisons overflows (65536 can overflow fp16 activations)
INIT_SCALE = 2.0**10
EPOCHS, N, BATCH = 3, 32, 8  # 4 batches per epoch, 12 optimizer steps


def optimizer_for(name: str, precision: str) -> Any:
    """The toolkit's optimizer, except Adam in pure float16, which needs an eps that float16 can represent.

    With eps=1e-8 (0 in float16) and second moments that underflow to 0, Adam's own update is m/0 = inf there, and
    so is the prediction: nothing XGrad could fix.
    """
    if precision == "16-true" and name == "adam":
        return lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-4, weight_decay=1e-3)
    return OPTIMIZERS[name]


def precision_kwargs(precision: str) -> dict[str, Any]:
    """Trainer arguments for a precision; 16-mixed on CPU needs an explicit GradScaler to have one at all."""
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


def params_of(module: torch.nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@torch.no_grad()
def expected_prediction(optimizer: torch.optim.Optimizer) -> list[Tensor] | None:
    """W - lr*dW from the optimizer's state, computed in float64 and rounded to each parameter's dtype.

    ``None`` while the optimizer has no state (the first step: no prediction).
    """
    out = []
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                return None
            if isinstance(optimizer, torch.optim.SGD):
                direction = state["momentum_buffer"].double()
            elif isinstance(optimizer, torch.optim.Adam):
                beta1, beta2 = group["betas"]
                k = float(state["step"])
                m_hat = state["exp_avg"].double() / (1 - beta1**k)
                v_hat = state["exp_avg_sq"].double() / (1 - beta2**k)
                direction = m_hat / (v_hat.sqrt() + group["eps"])
            else:
                raise NotImplementedError(type(optimizer).__name__)
            out.append((p.double() - lr * direction).to(p.dtype))
    return out


class RealSpy(Callback):
    """Placed before XGradCallback: the real weights, the expected prediction and the loss scale at each step."""

    def __init__(self, with_expected: bool = True) -> None:
        self.with_expected = with_expected
        self.real: list[list[Tensor]] = []
        self.expected: list[list[Tensor] | None] = []
        self.scales: list[float | None] = []
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.real.append(params_of(pl_module))
        self.expected.append(expected_prediction(trainer.optimizers[0]) if self.with_expected else None)
        self.dtypes |= {p.dtype for p in pl_module.parameters()}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(None if scaler is None else scaler.get_scale())


class PredictedSpy(Callback):
    """Placed after XGradCallback: the weights the forward pass sees, and the weights the optimizer will update."""

    def __init__(self) -> None:
        self.predicted: list[list[Tensor]] = []
        self.restored: list[list[Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.predicted.append(params_of(pl_module))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.restored.append(params_of(pl_module))


def tolerances(dtype: torch.dtype, expected: list[Tensor], real: list[Tensor]) -> dict[str, float]:
    """Two ulps of the result plus a few ulps of the shift |W_hat - W|.

    The callback computes the shift in the parameter's dtype (its own roundings, a few ulps of the shift), then
    rounds W + shift to the dtype (half an ulp of the result); the reference rounds the exact value once.
    """
    eps = torch.finfo(dtype).eps
    shift = max(float((e.double() - r.double()).abs().max()) for e, r in zip(expected, real, strict=True))
    return {"rtol": 2 * eps, "atol": 8 * eps * shift + torch.finfo(dtype).tiny}


def fit(
    precision: str, optimizer: str, module: TinyModule | None = None, **callback_kwargs: Any
) -> tuple[TinyModule, RealSpy, PredictedSpy, Any]:
    module = module if module is not None else TinyModule(optimizer_for(optimizer, precision))
    real_spy, predicted_spy = RealSpy(with_expected=optimizer in ("sgd_momentum", "adam")), PredictedSpy()
    x, y = make_data(N)
    run = trainer(
        max_epochs=EPOCHS,
        callbacks=[real_spy, XGradCallback(**callback_kwargs), predicted_spy],
        **precision_kwargs(precision),
    )
    run.fit(module, loader(x, y, BATCH))
    return module, real_spy, predicted_spy, run


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_prediction_and_exact_restore(precision: str, optimizer: str) -> None:
    module, real_spy, predicted_spy, run = fit(precision, optimizer)
    steps = EPOCHS * (N // BATCH)
    assert run.global_step == steps
    assert len(real_spy.real) == len(predicted_spy.predicted) == len(predicted_spy.restored) == steps

    dtype = PARAM_DTYPE.get(precision, torch.float32)
    assert real_spy.dtypes == {dtype}, f"{precision}: parameters are {real_spy.dtypes}, expected {dtype}"
    if precision == "16-mixed":
        assert all(scale == INIT_SCALE for scale in real_spy.scales), f"unexpected skipped steps: {real_spy.scales}"

    for step in range(steps):
        real, predicted, restored = real_spy.real[step], predicted_spy.predicted[step], predicted_spy.restored[step]
        for r, s in zip(real, restored, strict=True):
            assert torch.equal(r, s), f"step {step}: restored weights differ from the real ones"
        expected = real_spy.expected[step]
        if step == 0:
            assert expected is None  # no optimizer state yet
            assert all(torch.equal(r, p) for r, p in zip(real, predicted, strict=True)), "predicted at step 0"
            continue
        assert expected is not None
        assert not all(torch.equal(r, p) for r, p in zip(real, predicted, strict=True)), f"step {step}: no prediction"
        tol = tolerances(dtype, expected, real)
        for p, e in zip(predicted, expected, strict=True):
            torch.testing.assert_close(p, e, **tol, msg=lambda m, step=step: f"step {step}: {m}")
        # the next step starts from weights the optimizer changed
        if step + 1 < steps:
            assert not all(torch.equal(a, b) for a, b in zip(real, real_spy.real[step + 1], strict=True))

    assert torch.isfinite(flat(module)).all()


class PoisonedModule(TinyModule):
    """TinyModule whose loss is infinite at one global step: the GradScaler must skip that step."""

    def __init__(self, poison_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poison_step = poison_step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.poison_step else loss


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])  # a state rule and the trajectory rule
def test_16_mixed_skipped_step(optimizer: str) -> None:
    poison = 5
    module = PoisonedModule(poison, optimizer=OPTIMIZERS[optimizer])
    module, real_spy, predicted_spy, run = fit("16-mixed", optimizer, module=module)
    steps = EPOCHS * (N // BATCH)
    assert run.global_step == steps  # Lightning counts the skipped step too
    real, predicted, restored, scales = real_spy.real, predicted_spy.predicted, predicted_spy.restored, real_spy.scales
    assert len(real) == len(restored) == steps

    # the restore is bit-exact at every step, the poisoned one included
    for step in range(steps):
        assert all(torch.equal(r, s) for r, s in zip(real[step], restored[step], strict=True)), f"step {step}"

    # the poisoned step was really skipped: the scale was halved there, and only there, and W did not move
    assert scales[: poison + 1] == [INIT_SCALE] * (poison + 1)
    assert scales[poison + 1 :] == [INIT_SCALE / 2] * (steps - poison - 1)
    assert all(torch.equal(a, b) for a, b in zip(real[poison], real[poison + 1], strict=True))
    # the prediction at the poisoned step was a real one (the skip is not explained by a missing prediction)
    assert not all(torch.equal(r, p) for r, p in zip(real[poison], predicted[poison], strict=True))

    # every other step updated the weights, and training goes on predicting after the skip
    for step in range(steps - 1):
        if step != poison:
            assert not all(torch.equal(a, b) for a, b in zip(real[step], real[step + 1], strict=True)), f"step {step}"
    # (the trajectory rule sees a zero update right after the skipped step, so look from two steps after it)
    for step in range(poison + 2, steps):
        assert not all(torch.equal(r, p) for r, p in zip(real[step], predicted[step], strict=True)), f"step {step}"

    final = flat(module)
    assert torch.isfinite(final).all()
    assert not torch.equal(final, torch.cat([t.reshape(-1) for t in real[poison + 1]]))
