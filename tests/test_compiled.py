"""``compile=True``: the snapshot and the prediction in one compiled pass give the formula's W_hat and an exact copy.

Checked against the formulas written out per tensor here (not against the eager path), for the rules that have a
kernel, and end to end: Trainer + ``XGradCallback(compile=True)`` against the plain-PyTorch reference loop. Needs a C
compiler for inductor's CPU code; skipped without one.
"""

from __future__ import annotations

import math
import shutil
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_xgrad import OptimizerPredictor, XGradCallback
from lightning_xgrad._internal.scalars import StepCounts
from lightning_xgrad.cprop import CPropAdam, CPropSGD
from lightning_xgrad.optim import AdaM3
from lightning_xgrad.rules import rule_for
from lightning_xgrad.rules.compiled import CompiledPrediction

from .agreement import ATOL, RTOL, assert_close, assert_far
from .test_equivalence import Case, fit_reference, fit_trainer
from .toolkit import TinyModule, flat, loader, make_data, trainer

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor's CPU backend needs a C compiler"
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 3))


def _expected_adam(p: Tensor, state: dict[str, Any], group: dict[str, Any], alpha: float, eps: float) -> Tensor:
    beta1, beta2 = group["betas"]
    k = float(state["step"])
    m_hat = state["exp_avg"] / (1 - beta1**k)
    v_hat = state["exp_avg_sq"] / (1 - beta2**k)
    return p + alpha * m_hat / (v_hat.sqrt() + eps)


def _train(optimizer: torch.optim.Optimizer, params: list[Tensor], steps: int, skip_first_at: int | None) -> None:
    torch.manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 0 and step == skip_first_at) else torch.randn_like(p)
        optimizer.step()


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each compiled prediction returns from now on (True: it predicted; False: the eager path took over)."""
    results: list[bool] = []
    original = CompiledPrediction.__call__

    def counted(self: CompiledPrediction, *args: Any) -> bool:
        results.append(original(self, *args))
        return results[-1]

    monkeypatch.setattr(CompiledPrediction, "__call__", counted)
    return results


@pytest.mark.parametrize("skip", [None, 2], ids=["same-step", "mixed-steps"])
@pytest.mark.parametrize("kind", ["adam", "adamw", "adam3", "sgd", "rmsprop"])
def test_compiled_prediction_is_the_formula_and_the_snapshot_is_exact(
    kind: str, skip: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = list(_net().parameters())
    optimizer = {
        "adam": lambda: torch.optim.Adam(params, lr=0.01),
        "adamw": lambda: torch.optim.AdamW(params, lr=0.02, weight_decay=0.1),
        "adam3": lambda: AdaM3(params, lr=0.01),
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=0.01, momentum=0.5),
    }[kind]()
    _train(optimizer, params, steps=4, skip_first_at=skip)  # "mixed-steps": the first tensor is one step behind
    group = optimizer.param_groups[0]
    alpha = -2 * group["lr"]  # steps=2
    real = [p.detach().clone() for p in params]
    expected = []
    for p in params:
        state = optimizer.state[p]
        if kind in ("sgd", "rmsprop"):
            expected.append(p.detach() + alpha * state["momentum_buffer"])
        else:
            expected.append(_expected_adam(p.detach(), state, group, alpha, 0.0 if kind == "adam3" else group["eps"]))
    kernel_calls = _count_kernel_calls(monkeypatch)
    predictor = OptimizerPredictor(optimizer, steps=2, compile=True, compile_min_bytes=0)
    assert predictor.predict()
    # one bucket (one group, device and dtype), predicted by its kernel; the momentum rules stay eager
    assert kernel_calls == ([] if kind in ("sgd", "rmsprop") else [True])
    for p, want, before in zip(params, expected, real, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach(), before)
        assert torch.equal(predictor.snapshot.get(p), before)  # the snapshot is an exact copy
    predictor.restore()
    for p, before in zip(params, real, strict=True):
        assert torch.equal(p.detach(), before)


def test_rules_with_their_own_direction_have_no_kernel() -> None:
    """A subclass that changes dW (CProp's scale) must not inherit its parent's kernel, which would leave it out."""
    params = list(_net().parameters())
    for optimizer in (CPropAdam(params, lr=0.01), CPropSGD(params, lr=0.01, momentum=0.9)):
        assert rule_for(optimizer).compiled_prediction() is None
    assert rule_for(torch.optim.Adam(params)).compiled_prediction() is not None


def test_the_momentum_rules_stay_eager_under_compile() -> None:
    """Their eager prediction (a copy and one foreach add) is faster than a per-tensor compiled kernel."""
    params = list(_net().parameters())
    for optimizer in (torch.optim.SGD(params, lr=0.1, momentum=0.9), torch.optim.RMSprop(params, momentum=0.5)):
        assert rule_for(optimizer).compiled_prediction() is None


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_trainer_with_compiled_prediction_matches_reference(optimizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = Case(optimizer, steps=2)
    kernel_calls = _count_kernel_calls(monkeypatch)
    got = fit_trainer(case, XGradCallback(steps=2, compile=True, compile_min_bytes=0))
    assert (all(kernel_calls) and len(kernel_calls) > 1) if optimizer == "adamw" else kernel_calls == []
    expected = fit_reference(case, steps=2)
    assert_close(got, expected)
    assert_far(fit_reference(case, steps=None), expected, "baseline vs XGrad")


def _two_groups(first: int, second: int) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """AdamW over two param groups of one float32 tensor each, ``first`` and ``second`` elements, after 3 steps."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(first)), nn.Parameter(torch.randn(second))]
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
    _train(optimizer, params, steps=3, skip_first_at=None)
    return optimizer, params


@pytest.mark.parametrize(
    ("min_bytes", "compiled_groups"), [(0, 2), (4 * 100, 1), (4 * 100 + 1, 0)], ids=["0", "first-only", "neither"]
)
def test_buckets_under_compile_min_bytes_are_predicted_eagerly(
    min_bytes: int, compiled_groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's bucket is compiled when its parameters hold at least ``compile_min_bytes`` (100 and 10 float32
    elements here: 400 and 40 bytes), else predicted eagerly, with the same W_hat either way."""
    optimizer, params = _two_groups(100, 10)
    expected = []
    for p, group in zip(params, optimizer.param_groups, strict=True):
        expected.append(_expected_adam(p.detach(), optimizer.state[p], group, -group["lr"], group["eps"]))
    kernel_calls = _count_kernel_calls(monkeypatch)
    predictor = OptimizerPredictor(optimizer, compile=True, compile_min_bytes=min_bytes)
    assert predictor.predict()
    assert kernel_calls == [True] * compiled_groups
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    predictor.restore()


def test_compile_leaves_buckets_under_4_mib_eager_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default threshold is 4 MiB: a group of exactly 4 MiB of float32 is compiled, one element less is not."""
    elements = 4 * 2**20 // 4
    optimizer, _ = _two_groups(elements, elements - 1)
    kernel_calls = _count_kernel_calls(monkeypatch)
    predictor = OptimizerPredictor(optimizer, compile=True)
    predictor.predict()
    predictor.restore()
    assert kernel_calls == [True]
    assert XGradCallback(compile=True).compile_min_bytes == 4 * 2**20


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"^XGradCallback: `compile` must be True or False, got 'yes'$"):
        XGradCallback(compile="yes")  # type: ignore[arg-type]


def test_kernel_scalars_fold_the_bias_corrections() -> None:
    """The per-tensor scalars the Adam kernel gets reproduce m_hat / (sqrt(v_hat) + eps) by hand."""
    beta1, beta2, eps, alpha, k = 0.9, 0.99, 1e-3, -0.5, 3.0
    m, v = 0.2, 0.04
    expected = alpha * (m / (1 - beta1**k)) / (math.sqrt(v / (1 - beta2**k)) + eps)
    rule = rule_for(torch.optim.Adam([torch.zeros(1, requires_grad=True)]))
    scalars = rule.kernel_scalars(([], [], StepCounts([torch.tensor(k)])), {"betas": (beta1, beta2), "eps": eps}, alpha)
    (eps_k,), (step_k,) = scalars
    assert step_k * m / (math.sqrt(v) + eps_k) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_compiled_prediction_includes_the_cprop_scale(name: str) -> None:
    """CPropCallback's scale is applied on top of the compiled kernel's prediction, as on top of the eager one."""
    from lightning_xgrad import CPropCallback

    from .cprop_reference import Conformity
    from .test_cprop import TORCH_OPTIMIZERS, assert_tracks, fit, reference_fit

    factory = TORCH_OPTIMIZERS[name]
    got = flat(fit(factory, [CPropCallback(), XGradCallback(steps=2, compile=True, compile_min_bytes=0)]).net)
    assert_tracks(got, reference_fit(factory, conformity=Conformity(), xgrad_steps=2))


def test_compiled_prediction_keeps_the_heavy_ball_secant_at_the_predicted_point() -> None:
    from .test_heavy_ball import BATCH_SIZE, EPOCHS, make_optimizer
    from .test_heavy_ball import fit_reference as heavy_ball_reference

    module = TinyModule(lambda p: make_optimizer("sgd", p))
    trainer(max_epochs=EPOCHS, callbacks=[XGradCallback(steps=1, compile=True, compile_min_bytes=0)]).fit(
        module, loader(*make_data(), BATCH_SIZE)
    )
    torch.testing.assert_close(flat(module.net), heavy_ball_reference("sgd", 1), rtol=RTOL, atol=ATOL)
