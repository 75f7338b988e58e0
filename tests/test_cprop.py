"""CProp: the scale, CPropSGD/CPropAdam, CPropCallback, and their composition with XGrad, against the reference.

The reference (``tests/cprop_reference.py``) is plain PyTorch written from the official formulas, one tensor at a
time, and runs in float64 on a float64 copy of the model; float32 training must stay within 1e-4 of how far it moved
the weights (``assert_tracks``). Every comparison with it also checks that the thing compared makes a difference
(CProp against no CProp, the scaled prediction against the unscaled one), so a callback that silently did nothing
could not pass.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from lightning_xgrad._internal.chunks import Chunks
from lightning_xgrad.callback import XGradCallback
from lightning_xgrad.cprop.callback import CPropCallback
from lightning_xgrad.cprop.optim import CPropAdam, CPropSGD
from lightning_xgrad.cprop.statistics import conformity_scale_, scale_from_z, update_statistics_

from .agreement import ATOL, RTOL, assert_close, assert_far, mse
from .cprop_reference import (
    Conformity,
    CPropAdamReference,
    CPropSGDReference,
    conformity_scale,
    cprop_reference,
    phi,
)
from .toolkit import EXAMPLES, TinyModule, batches, flat, load_example, loader, make_data, make_net, trainer

MOVEMENT_TOLERANCE = 1e-4  # float32 training against the float64 reference: this fraction of how far it moved
BATCH = 8
START = flat(make_net())  # the initial weights of every run


def _chunks(foreach: bool, tensors: list[Tensor]) -> Chunks | None:
    """The statistics' foreach path (chunks of at most the largest tensor) or their single-tensor one."""
    return Chunks(tensors, 0) if foreach else None


def assert_tracks(got: Tensor, expected: Tensor, what: str = "weights") -> None:
    """``got`` within MOVEMENT_TOLERANCE of the movement ``max |expected - START|`` of ``expected`` (float64)."""
    movement = (expected.double() - START.double()).abs().max().item()
    gap = (got.double() - expected.double()).abs().max().item()
    assert gap <= MOVEMENT_TOLERANCE * movement, (
        f"{what}: max |diff| {gap:.3g} > {MOVEMENT_TOLERANCE} x the movement {movement:.3g}"
    )


def assert_apart(a: Tensor, b: Tensor, what: str) -> None:
    """``a`` and ``b`` further apart than the agreement tolerance and the movement tolerance allow, in float64."""
    b = b.double()
    tolerance = max(ATOL + RTOL * b.abs().max().item(), MOVEMENT_TOLERANCE * (b - START.double()).abs().max().item())
    assert_far(a.double(), b, what, tolerance)


# ---------------------------------------------------------------------------------------------------- the scale
def bft_scale(z: float, c: float = 1.0) -> float:
    """By hand: min(1, c |2 Phi(-z) - 1|) with Phi(x) = 1 / (1 + exp(-(0.07056 x^3 + 1.5976 x)))."""
    phi = 1 / (1 + math.exp(-(0.07056 * (-z) ** 3 + 1.5976 * (-z))))
    return min(1.0, c * abs(2 * phi - 1))


@pytest.mark.parametrize("cdf", ["bft", "normal"])
def test_scale_is_zero_at_z_zero_and_one_far_out(cdf: str) -> None:
    z = torch.tensor([0.0, 8.0, -8.0, 1e4, -1e4, float("inf")])
    assert scale_from_z(z, cdf=cdf).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_bft_scale_hand_values() -> None:
    zs = [0.1, -0.5, 1.0, 1.7, -2.5]
    expected = torch.tensor([bft_scale(z) for z in zs])
    assert_close(scale_from_z(torch.tensor(zs), cdf="bft"), expected)
    # |2 Phi(-1) - 1| = P(|Z| < 1) = 0.6827: the fit is within its published 1.4e-4 of the normal CDF
    assert abs(scale_from_z(torch.tensor([1.0]), cdf="bft").item() - 0.682689) < 3e-4


def test_normal_scale_is_erf() -> None:
    zs = [0.05, -0.3, 0.9, 1.5, -2.2]
    expected = torch.tensor([math.erf(abs(z) / math.sqrt(2)) for z in zs])
    assert_close(scale_from_z(torch.tensor(zs), cdf="normal"), expected)


@pytest.mark.parametrize("c", [0.5, 2.0, 3.0])
def test_c_multiplies_and_clips_at_one(c: float) -> None:
    zs = [0.2, 0.6, 1.0, 2.0]
    got = scale_from_z(torch.tensor(zs), c=c)
    assert_close(got, torch.tensor([bft_scale(z, c) for z in zs]))
    assert (got <= 1).all() and (got == 1).any() == (c > 1)


def exact_first_scale(g: Tensor, c: float = 1.0, eps: float = 1e-8, cdf: str = "bft") -> Tensor:
    """The scale after one gradient in exact arithmetic, in float64: the variance is 0, so se = eps and the scale is
    min(1, c |2 Phi(-g / eps) - 1|) (1 for any gradient far above eps)."""
    return (c * (2 * phi(-g.double() / eps, cdf) - 1).abs()).clamp(max=1)


def first_gradient(numel: int = 96) -> Tensor:
    """Gradients near eps = 1e-8 (scales strictly between 0 and 1), a zero (scale 0) and ordinary ones (scale 1)."""
    tiny = torch.tensor([3e-9, -7e-9, 1.2e-8, -2.5e-8, 5e-9, 1e-9, -6e-10, 2e-9, 0.0, 4e2, -1e-3, 5e-5])
    return torch.cat([tiny, torch.randn(numel - len(tiny), generator=torch.Generator().manual_seed(0))])


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])
@pytest.mark.parametrize("cdf", ["bft", "normal"])
@pytest.mark.parametrize("beta", [0.999, 0.9])
def test_conformity_scale_matches_float64_reference(cdf: str, beta: float, foreach: bool) -> None:
    """The float32 statistics and scale against the float64 official formulas, over 30 gradients of three tensors
    that share a sign (scale near 1), flip sign (near 0) and mix; t = 1 included."""
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    ms, variances, scales = ([torch.zeros(s) for s in shapes] for _ in range(3))
    reference = Conformity(beta=beta, cdf=cdf)
    keys = [torch.empty(0) for _ in shapes]
    for t in range(1, 31):
        grads = [torch.randn(s, generator=g) for s in shapes]
        grads[0] = grads[0] * 0.3 + 2.0  # one sign
        grads[1] = (1 + 0.1 * grads[1]) * (-1) ** t  # alternating sign
        update_statistics_(ms, variances, grads, [t] * 3, beta, chunks=_chunks(foreach, ms))
        conformity_scale_(scales, ms, variances, [t] * 3, beta, 1.0, 1e-8, cdf, chunks=_chunks(foreach, ms))  # type: ignore[arg-type]
        for key, grad, scale in zip(keys, grads, scales, strict=True):
            assert_close(scale, reference.observe(key, grad))
    assert scales[0].min() == 1.0  # gradients that agree in sign keep the full update
    assert scales[1].max() < 0.3  # gradients that flip sign every step are scaled down


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])
@pytest.mark.parametrize("cdf", ["bft", "normal"])
@pytest.mark.parametrize("c", [1.0, 3.0])
def test_first_scale_is_the_exact_arithmetic_one(c: float, cdf: str, foreach: bool) -> None:
    """t = 1: the variance is exactly 0, so se = eps, not eps plus float rounding divided by eps."""
    grad = first_gradient()
    m, variance, scale = torch.zeros_like(grad), torch.zeros_like(grad), torch.empty_like(grad)
    update_statistics_([m], [variance], [grad], [1], 0.999, chunks=_chunks(foreach, [m]))
    assert variance.eq(0).all()
    conformity_scale_([scale], [m], [variance], [1], 0.999, c, 1e-8, cdf, chunks=_chunks(foreach, [m]))  # type: ignore[arg-type]
    expected = exact_first_scale(grad, c, cdf=cdf)
    assert_close(scale, expected)
    assert ((expected > 0.01) & (expected < 0.99)).sum() >= 4 and (scale[grad.abs() > 1e-6] == 1).all()


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])
def test_variance_state_has_no_cancellation(foreach: bool) -> None:
    """Gradients 10 +- 0.01: the kept variance, ``exp_var / (1 - beta^t)``, matches the float64 v_hat - m_hat^2 to
    5e-3 at every step, where the official difference computed in float32 is off by more than 100 %."""
    beta, gen = 0.9, torch.Generator().manual_seed(1)
    m, exp_var, m32, v32 = (torch.zeros(50) for _ in range(4))
    m64, v64 = torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)
    official_error = 0.0
    for t in range(1, 41):
        grad = 10 + 0.01 * torch.randn(50, generator=gen)
        update_statistics_([m], [exp_var], [grad], [t], beta, chunks=_chunks(foreach, [m]))
        m64, v64 = beta * m64 + (1 - beta) * grad.double(), beta * v64 + (1 - beta) * grad.double() ** 2
        m32.mul_(beta).add_(grad, alpha=1 - beta)
        v32.mul_(beta).addcmul_(grad, grad, value=1 - beta)
        bc = 1 - beta**t
        expected = v64 / bc - (m64 / bc) ** 2
        if t > 1:
            torch.testing.assert_close(exp_var.double() / bc, expected, rtol=5e-3, atol=0)
            official = (v32 / bc - (m32 / bc) ** 2).clamp(min=0).double()
            official_error = max(official_error, ((official - expected).abs() / expected).max().item())
    assert official_error > 1.0


def test_conformity_scale_first_steps_by_hand() -> None:
    """Two gradients 1 and 3, beta = 0.5, by hand: m_hat = 7/3, v_hat = 19/3, variance 19/3 - 49/9 = 8/9, n = 1.5."""
    beta, eps = 0.5, 1e-8
    m, variance, scale = torch.zeros(1), torch.zeros(1), torch.empty(1)
    for t, g in ((1, 1.0), (2, 3.0)):
        update_statistics_([m], [variance], [torch.tensor([g])], [t], beta, chunks=Chunks([m], 0))
    bc = 1 - beta**2  # 0.75
    assert_close(m, torch.tensor([1.75]))
    assert_close(variance / bc, torch.tensor([8 / 9]))
    conformity_scale_([scale], [m], [variance], [2], beta, 1.0, eps, "normal", chunks=Chunks([m], 0))
    m_hat, v_hat, n = 1.75 / bc, 4.75 / bc, bc / (1 - beta)
    se = math.sqrt((v_hat - m_hat**2) / (n - 1 + eps)) + eps
    assert_close(scale, torch.tensor([math.erf(m_hat / se / math.sqrt(2))]))
    assert_close(conformity_scale(torch.tensor([1.75]), torch.tensor([4.75]), 2, beta, 1.0, eps, "normal"), scale)


# ------------------------------------------------------------------------------------------------- the optimizers
def train_optimizer(build: Any, steps: int = 20, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Any, nn.Module]:
    """``steps`` optimizer steps of ``make_net`` on fixed batches, in ``dtype``; returns the weights, the optimizer
    and the net."""
    net = make_net().to(dtype)
    optimizer = build(list(net.parameters()))
    x, y = make_data(steps * BATCH)
    data = batches(x.to(dtype), y.to(dtype), BATCH)
    for batch in data:
        mse(net, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return flat(net), optimizer, net


CPROP_OPTIMIZERS = {
    "cprop_sgd": (lambda p: CPropSGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
                  lambda p: CPropSGDReference(p, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "cprop_adam": (lambda p: CPropAdam(p, lr=0.01, weight_decay=1e-3),
                   lambda p: CPropAdamReference(p, lr=0.01, weight_decay=1e-3)),
}  # fmt: skip


SGD_CASES = {
    "momentum_l2": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "plain": dict(lr=0.05),
    "nesterov_normal": dict(lr=0.05, momentum=0.9, nesterov=True, cprop_cdf="normal"),
    "dampening_c2_beta0.9": dict(lr=0.05, momentum=0.8, dampening=0.3, cprop_c=2.0, cprop_beta=0.9),
}
ADAM_CASES = {
    "l2": dict(lr=0.01, weight_decay=1e-2),  # v shared with the statistics (beta2 = cprop_beta)
    "decoupled_amsgrad_betas": dict(lr=0.01, betas=(0.9, 0.9), amsgrad=True, weight_decay=0.1, decoupled=True),
    "beta1_shared_normal": dict(lr=0.01, betas=(0.99, 0.999), cprop_beta=0.99, cprop_cdf="normal"),
}


def _split(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer kwargs -> (real optimizer's kwargs, reference's kwargs)."""
    real = {k.replace("decoupled", "decoupled_weight_decay"): v for k, v in kwargs.items()}
    ref = {k: v for k, v in real.items() if not k.startswith("cprop_")}
    ref.update({k.removeprefix("cprop_"): v for k, v in real.items() if k.startswith("cprop_")})
    return real, ref


def _reference_scales(optimizer: Any, net: nn.Module, reference: Any, ref_net: nn.Module) -> None:
    """The last step's scales of every parameter against the reference's (float64)."""
    for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(optimizer.state[p]["cprop_scale"], reference.scales[q].float(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])
@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_cprop_sgd_matches_float64_reference(case: str, foreach: bool) -> None:
    real, ref = _split(SGD_CASES[case])
    got, optimizer, net = train_optimizer(lambda p: CPropSGD(p, **real, foreach=foreach))
    expected, reference, ref_net = train_optimizer(lambda p: CPropSGDReference(p, **ref), dtype=torch.float64)
    assert_tracks(got, expected)
    _reference_scales(optimizer, net, reference, ref_net)
    plain = {k: v for k, v in real.items() if not k.startswith("cprop_")}
    assert_apart(got, train_optimizer(lambda p: torch.optim.SGD(p, **plain), dtype=torch.float64)[0], "CPropSGD vs SGD")


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])
@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_cprop_adam_matches_float64_reference(case: str, foreach: bool) -> None:
    real, ref = _split(ADAM_CASES[case])
    got, optimizer, net = train_optimizer(lambda p: CPropAdam(p, **real, foreach=foreach))
    expected, reference, ref_net = train_optimizer(lambda p: CPropAdamReference(p, **ref), dtype=torch.float64)
    assert_tracks(got, expected)
    _reference_scales(optimizer, net, reference, ref_net)
    plain = {k: v for k, v in real.items() if not k.startswith("cprop_")}
    torch_adam = torch.optim.AdamW if plain.pop("decoupled_weight_decay", False) else torch.optim.Adam
    assert_apart(got, train_optimizer(lambda p: torch_adam(p, **plain), dtype=torch.float64)[0], "CPropAdam vs Adam")


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single_tensor"])
@pytest.mark.parametrize("cdf", ["bft", "normal"])
@pytest.mark.parametrize("c", [1.0, 3.0])
@pytest.mark.parametrize("cls", [CPropSGD, CPropAdam])
def test_optimizer_first_scale_is_the_exact_arithmetic_one(cls: type, c: float, cdf: str, foreach: bool) -> None:
    """After one step, cprop_scale = min(1, c |2 Phi(-g / eps) - 1|) (se = eps): the variance of one gradient is 0."""
    param = torch.zeros(96, requires_grad=True)
    param.grad = first_gradient()
    optimizer = cls([param], lr=0.1, cprop_c=c, cprop_cdf=cdf, foreach=foreach)
    optimizer.step()
    assert_close(optimizer.state[param]["cprop_scale"], exact_first_scale(param.grad, c, cdf=cdf))


@pytest.mark.parametrize("name", ["cprop_sgd", "cprop_adam"])
def test_optimizer_state_dict_resumes_exactly(name: str) -> None:
    """10 steps, state_dict into a fresh optimizer (bfloat16 copy of the model in between), 10 more: the same as 20
    straight; the step counts stay float32 CPU tensors through load_state_dict."""
    factory = CPROP_OPTIMIZERS[name][0]
    data = batches(*make_data(20 * BATCH), BATCH)

    def run(net: nn.Module, optimizer: Any, part: list[Any]) -> None:
        for batch in part:
            mse(net, batch).backward()
            optimizer.step()
            optimizer.zero_grad()

    straight = make_net()
    run(straight, factory(list(straight.parameters())), data)
    net = make_net()
    first = factory(list(net.parameters()))
    run(net, first, data[:10])
    saved = first.state_dict()
    half = factory(list(make_net().to(torch.bfloat16).parameters()))
    half.load_state_dict(saved)
    assert all(s["step"].dtype == torch.float32 for s in half.state.values())
    second = factory(list(net.parameters()))
    second.load_state_dict(saved)
    run(net, second, data[10:])
    torch.testing.assert_close(flat(net), flat(straight), rtol=0, atol=0)


def test_optimizer_refuses_a_state_without_cprop_statistics() -> None:
    """torch's Adam state_dict, or a CPropAdam one without its statistics, fails loudly at load, instead of CProp
    starting again from zero statistics (or a KeyError at the next step)."""
    net = make_net()
    adam = torch.optim.Adam(net.parameters(), lr=0.01)
    mse(net, batches(*make_data(8), 8)[0]).backward()
    adam.step()
    with pytest.raises(ValueError, match=r"CPropAdam: .*param group 0 .*'cprop_beta'"):
        CPropAdam(net.parameters(), lr=0.01).load_state_dict(adam.state_dict())
    cprop = CPropAdam(net.parameters(), lr=0.01)
    cprop.step()
    saved = copy.deepcopy(cprop.state_dict())
    del saved["state"][0]["cprop_exp_var"], saved["state"][0]["cprop_exp_avg"]
    with pytest.raises(ValueError, match=r"CPropAdam: .*parameter 0 has no CProp statistics"):
        CPropAdam(net.parameters(), lr=0.01).load_state_dict(saved)


def test_cprop_optimizers_leave_grad_alone() -> None:
    for build in (lambda p: CPropSGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
                  lambda p: CPropAdam(p, lr=0.1, weight_decay=0.1)):  # fmt: skip
        net = make_net()
        mse(net, batches(*make_data(8), 8)[0]).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        build(list(net.parameters())).step()
        assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))


# --------------------------------------------------------------------------------------------------- Lightning
def fit(
    factory: Any,
    callbacks: list[Callback],
    epochs: int = 2,
    accumulate: int = 1,
    samples: int = 96,
    ckpt_path: str | None = None,
    **kw: Any,
) -> TinyModule:
    x, y = make_data(samples)
    module = TinyModule(factory)
    trainer(max_epochs=epochs, accumulate_grad_batches=accumulate, callbacks=callbacks, **kw).fit(
        module, loader(x, y, BATCH), ckpt_path=ckpt_path
    )
    return module


def reference_fit(build: Any, epochs: int = 2, accumulate: int = 1, samples: int = 96, **kw: Any) -> Tensor:
    """The reference loop on a float64 copy of the model and data; the float64 weights."""
    net = make_net().double()
    x, y = make_data(samples)
    cprop_reference(
        net, build(list(net.parameters())), batches(x.double(), y.double(), BATCH), mse, epochs=epochs,
        accumulate=accumulate, **kw,
    )  # fmt: skip
    return flat(net)


TORCH_OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
}


CALLBACK_OPTIMIZERS = {**TORCH_OPTIMIZERS, "adam_l2": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3)}


@pytest.mark.parametrize("name", sorted(CALLBACK_OPTIMIZERS))
@pytest.mark.parametrize("cdf", ["bft", "normal"])
@pytest.mark.parametrize("c", [1.0, 3.0])
def test_callback_matches_float64_reference(name: str, cdf: str, c: float) -> None:
    """24 steps (2 epochs of 12) within 1e-4 of the movement of the float64 official formulas."""
    factory = CALLBACK_OPTIMIZERS[name]
    got = flat(fit(factory, [CPropCallback(c=c, cdf=cdf)]).net)  # type: ignore[arg-type]
    assert_tracks(got, reference_fit(factory, conformity=Conformity(c=c, cdf=cdf)))
    assert_apart(got, reference_fit(factory), "CPropCallback vs no CProp")


class GradSpy(Callback):
    """Records each parameter's gradient in on_before_optimizer_step (under 16-mixed: after unscale_)."""

    def __init__(self) -> None:
        self.grads: list[list[Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])


@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("cdf", ["bft", "normal"])
@pytest.mark.parametrize("c", [1.0, 3.0])
def test_callback_first_scale_is_the_exact_arithmetic_one(name: str, cdf: str, c: float) -> None:
    """After one step the scale is min(1, c |2 Phi(-g / eps) - 1|) (se = eps): 1 for every ordinary gradient."""
    spy, cprop = GradSpy(), CPropCallback(c=c, cdf=cdf)  # type: ignore[arg-type]
    fit(TORCH_OPTIMIZERS[name], [spy, cprop], epochs=1, samples=BATCH)
    (state,) = cprop.checkpoint_state()["optimizers"]
    for index, entry in state.items():
        assert entry["step"] == 1
        assert_close(entry["scale"], exact_first_scale(spy.grads[0][index], c, cdf=cdf))


def test_callback_with_accumulation_matches_reference() -> None:
    # 13 batches: windows of 2 and a last one of 1, 14 steps in 2 epochs
    factory = TORCH_OPTIMIZERS["adamw"]
    got = flat(fit(factory, [CPropCallback(c=2.0)], accumulate=2, samples=104).net)
    assert_tracks(got, reference_fit(factory, accumulate=2, samples=104, conformity=Conformity(c=2.0)))


@pytest.mark.parametrize("name", sorted(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("cprop_first", [True, False], ids=["cprop_first", "xgrad_first"])
def test_callback_with_xgrad_matches_reference(name: str, cprop_first: bool) -> None:
    factory = TORCH_OPTIMIZERS[name]
    callbacks: list[Callback] = [CPropCallback(), XGradCallback(steps=2)]
    got = flat(fit(factory, callbacks if cprop_first else callbacks[::-1]).net)
    expected = reference_fit(factory, conformity=Conformity(), xgrad_steps=2)
    assert_tracks(got, expected)
    assert_apart(got, reference_fit(factory, conformity=Conformity()), "CProp + XGrad vs CProp alone")
    unscaled = reference_fit(factory, conformity=Conformity(), xgrad_steps=2, predict_with_scale=False)
    assert_apart(got, unscaled, "prediction with the scale vs without")


@pytest.mark.parametrize(
    ("factory", "rule"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), "auto"),  # no state rule: trajectory
        (TORCH_OPTIMIZERS["adamw"], "trajectory"),
    ],
    ids=["sgd_nesterov", "adamw_forced_trajectory"],
)
def test_callback_with_xgrad_trajectory_rule_matches_reference(factory: Any, rule: str) -> None:
    """The trajectory rule extrapolates the update as applied, CProp's scale already in it (not applied twice)."""
    got = flat(fit(factory, [CPropCallback(), XGradCallback(steps=2, rule=rule)]).net)  # type: ignore[arg-type]
    expected = reference_fit(factory, conformity=Conformity(), xgrad_steps=2, trajectory=True)
    assert_tracks(got, expected)
    assert_apart(got, reference_fit(factory, conformity=Conformity()), "CProp + XGrad vs CProp alone")


@pytest.mark.parametrize("name", sorted(CPROP_OPTIMIZERS))
def test_cprop_optimizers_with_xgrad_match_reference(name: str) -> None:
    factory, reference = CPROP_OPTIMIZERS[name]
    got = flat(fit(factory, [XGradCallback(steps=2)]).net)
    assert_tracks(got, reference_fit(reference, xgrad_steps=2))
    assert_apart(got, reference_fit(reference, xgrad_steps=2, predict_with_scale=False), "rule without the scale")


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """2 epochs straight vs 1 epoch, a checkpoint, then the 2nd epoch resumed (with XGrad, which predicts with the
    restored scales): bit-identical; dropping the callback's state from the checkpoint changes the result."""
    factory = TORCH_OPTIMIZERS["adamw"]
    straight = flat(fit(factory, [CPropCallback(), XGradCallback()], epochs=2, samples=80))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    fit(factory, [CPropCallback(), XGradCallback(), checkpoint], epochs=1, samples=80, enable_checkpointing=True)
    (path,) = tmp_path.glob("*.ckpt")
    resumed = flat(fit(factory, [CPropCallback(), XGradCallback()], epochs=2, samples=80, ckpt_path=str(path)))
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)

    saved = torch.load(path, weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("CPropCallback")]
    assert len(saved["callbacks"][key]["optimizers"][0]) == len(list(make_net().parameters()))
    del saved["callbacks"][key]
    torch.save(saved, tmp_path / "dropped.ckpt")
    dropped = flat(fit(factory, [CPropCallback(), XGradCallback()], epochs=2, samples=80,
                       ckpt_path=str(tmp_path / "dropped.ckpt")))  # fmt: skip
    assert not torch.equal(dropped, straight)


def test_resuming_with_other_settings_warns_once_naming_both(tmp_path: Path) -> None:
    """The checkpoint records beta, c, eps and cdf; a resume with other ones says so (they apply from the resumed
    step on, to the statistics carried over); the same settings resume silently."""
    factory = TORCH_OPTIMIZERS["adamw"]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    fit(factory, [CPropCallback(beta=0.99, cdf="normal"), checkpoint], epochs=1, samples=80, enable_checkpointing=True)
    (path,) = tmp_path.glob("*.ckpt")
    with pytest.warns(UserWarning) as record:
        fit(factory, [CPropCallback(beta=0.999, c=2.0)], epochs=2, samples=80, ckpt_path=str(path))
    ours = [str(w.message) for w in record if "CPropCallback" in str(w.message)]
    assert len(ours) == 1
    assert "saved with beta=0.99, c=1.0, cdf='normal'" in ours[0]
    assert "this run uses beta=0.999, c=2.0, cdf='bft'" in ours[0]
    with warnings.catch_warnings(record=True) as same:
        warnings.simplefilter("always")
        fit(factory, [CPropCallback(beta=0.99, cdf="normal")], epochs=2, samples=80, ckpt_path=str(path))
    assert not [w for w in same if "CPropCallback" in str(w.message)]


class ManualModule(TinyModule):
    """Manual optimization: ``self.optimizers().step()`` (through Lightning) or the raw optimizer's ``step()``."""

    def __init__(self, factory: Any, raw: bool) -> None:
        super().__init__(factory)
        self.automatic_optimization = False
        self.raw = raw

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        (optimizer.optimizer if self.raw else optimizer).step()
        optimizer.zero_grad()
        return loss


@pytest.mark.parametrize("raw", [False, True], ids=["lightning_optimizer", "raw_optimizer"])
def test_manual_optimization_matches_reference(raw: bool) -> None:
    factory = TORCH_OPTIMIZERS["sgd_momentum"]
    x, y = make_data(96)
    module = ManualModule(factory, raw)
    trainer(max_epochs=2, callbacks=[CPropCallback()]).fit(module, loader(x, y, BATCH))
    assert_tracks(flat(module.net), reference_fit(factory, conformity=Conformity()))


# --------------------------------------------------------------------------------------------------- precision
class PoisonedModule(TinyModule):
    """Infinite loss at global step 2: the GradScaler skips that step."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == 2 else loss


def test_16_mixed_statistics_see_unscaled_gradients_and_skipped_steps_change_nothing() -> None:
    beta = 0.9
    spy, cprop = GradSpy(), CPropCallback(beta=beta)
    x, y = make_data(32)  # 4 steps
    module = PoisonedModule(TORCH_OPTIMIZERS["adamw"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(max_epochs=1, callbacks=[spy, cprop], plugins=[plugin]).fit(module, loader(x, y, BATCH))
    (state,) = cprop.checkpoint_state()["optimizers"]
    assert len(spy.grads) == 4 and all(entry["step"] == 3 for entry in state.values())  # one step skipped
    # m = EMA of the unscaled gradients of the three steps that happened (a scaled one would be 1024 times larger)
    for index, entry in state.items():
        g = [spy.grads[step][index] for step in (0, 1, 3)]
        expected = ((1 - beta) * g[0] * beta + (1 - beta) * g[1]) * beta + (1 - beta) * g[2]
        assert_close(entry["exp_avg"], expected)
        # and the variance, exp_var / (1 - beta^3), is their weighted variance about m_hat (computed in float64)
        weights, bc = [(1 - beta) * beta**2, (1 - beta) * beta, 1 - beta], 1 - beta**3
        mean = sum(w * x.double() for w, x in zip(weights, g, strict=True)) / bc
        variance = sum(w * (x.double() - mean) ** 2 for w, x in zip(weights, g, strict=True)) / bc
        torch.testing.assert_close(entry["exp_var"].double() / bc, variance, rtol=1e-4, atol=1e-12)


def test_bf16_mixed_runs() -> None:
    factory = TORCH_OPTIMIZERS["adamw"]
    cprop = CPropCallback()
    module = fit(factory, [cprop, XGradCallback()], epochs=1, precision="bf16-mixed")
    (state,) = cprop.checkpoint_state()["optimizers"]
    assert all(entry["step"] == 12 for entry in state.values())
    assert torch.isfinite(flat(module)).all()
    assert any((entry["scale"] < 1).any() for entry in state.values())


# ------------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("kwargs", "name", "error"),
    [
        (dict(beta=1.0), "beta", ValueError),
        (dict(beta=-0.1), "beta", ValueError),
        (dict(beta="0.9"), "beta", TypeError),
        (dict(c=-1.0), "c", ValueError),
        (dict(c=float("nan")), "c", ValueError),
        (dict(eps=-1e-8), "eps", ValueError),
        (dict(eps=0.0), "eps", ValueError),  # se = 0 and z = 0 / 0 wherever a gradient is 0
        (dict(cdf="logistic"), "cdf", ValueError),
    ],
)
def test_callback_bad_arguments(kwargs: dict[str, Any], name: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=rf"^CPropCallback: `{name}` must be .*, got {re.escape(repr(kwargs[name]))}$"):
        CPropCallback(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "name", "error"),
    [
        (CPropSGD, dict(lr=-1.0), "lr", ValueError),
        (CPropSGD, dict(momentum=-0.1), "momentum", ValueError),
        (CPropSGD, dict(nesterov=True), "nesterov", ValueError),
        (CPropSGD, dict(cprop_beta=1.5), "cprop_beta", ValueError),
        (CPropSGD, dict(cprop_cdf="probit"), "cprop_cdf", ValueError),
        (CPropSGD, dict(cprop_eps=0), "cprop_eps", ValueError),
        (CPropAdam, dict(betas=(0.9, 1.0)), r"betas\[1\]", ValueError),
        (CPropAdam, dict(eps=-1.0), "eps", ValueError),
        (CPropAdam, dict(amsgrad="yes"), "amsgrad", TypeError),
        (CPropAdam, dict(cprop_c=-2.0), "cprop_c", ValueError),
        (CPropSGD, dict(foreach="yes"), "foreach", TypeError),
        (CPropAdam, dict(foreach=1), "foreach", TypeError),
    ],
)
def test_optimizer_bad_arguments(cls: type, kwargs: dict[str, Any], name: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=rf"^{cls.__name__}: `{name}` must be .*, got "):
        cls(make_net().parameters(), **kwargs)


# -------------------------------------------------------------------------------------------------- LightningCLI
def test_cli_config_with_and_without_xgrad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["digits.py"])
    example = load_example("digits")
    config = EXAMPLES / "configs" / "digits_cprop.yaml"
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    for extra in ([], ["--trainer.callbacks+=lightning_xgrad.XGradCallback"]):
        cli = example.cli_main(["fit", "--config", str(config), *short, *extra])
        (cprop,) = [c for c in cli.trainer.callbacks if isinstance(c, CPropCallback)]
        assert (cprop.beta, cprop.c, cprop.eps, cprop.cdf) == (0.999, 1.0, 1e-8, "bft")
        (state,) = cprop.checkpoint_state()["optimizers"]
        assert all(entry["step"] == 4 for entry in state.values())
        assert math.isfinite(float(cli.trainer.callback_metrics["val_loss"]))
        xgrads = [c for c in cli.trainer.callbacks if isinstance(c, XGradCallback)]
        assert len(xgrads) == len(extra)
        assert Path(cli.trainer.log_dir).resolve().parent == tmp_path.resolve() / "lightning_logs" / "digits_cprop"
