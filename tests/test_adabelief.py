"""The AdaBelief rule (pytorch-optimizer's ``AdaBelief``): against the update AdaBelief applies, by hand, in a Trainer.

With a constant lr the update AdaBelief applied at its last step is ``lr * dW`` plus, with decoupled decay, the decay
it applies first (``p *= 1 - lr*wd``, or ``1 - wd`` with ``fixed_decay``), so the rule can be checked against the
optimizer itself for every option combination, on both of AdaBelief's code paths (foreach and per tensor).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("pytorch_optimizer")

from pytorch_optimizer import AdaBelief

from lightning_xgrad import OptimizerPredictor, XGradCallback
from lightning_xgrad.rules import rule_for
from lightning_xgrad.rules.adabelief import AdaBeliefRule

from . import agreement
from .toolkit import TinyModule, add_rule_direction_, batches, flat, loader, make_data, make_net, rule_columns, trainer

LR = 0.01
RTOL, ATOL = 1e-10, 1e-12  # float64 hand computations (the end-to-end runs: tests/agreement.py)


def _params(seed: int = 0, dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4, 4, 2), (1,)]
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]


def _spy_paths(optimizer: AdaBelief) -> list[str]:
    """Record which of AdaBelief's code paths each group step takes."""
    paths: list[str] = []
    foreach, per_param = optimizer._step_foreach, optimizer._step_per_param

    def spy_foreach(*args: Any) -> None:
        paths.append("foreach")
        foreach(*args)

    def spy_per_param(*args: Any) -> None:
        paths.append("per_param")
        per_param(*args)

    optimizer._step_foreach = spy_foreach  # type: ignore[method-assign]
    optimizer._step_per_param = spy_per_param  # type: ignore[method-assign]
    return paths


def _run(optimizer: AdaBelief, n_steps: int, seed: int = 1) -> tuple[list[Tensor], list[list[Tensor]]]:
    """n_steps with random gradients; returns the weights before the last step and every step's gradients."""
    g = torch.Generator().manual_seed(seed)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before: list[Tensor] = []
    grads: list[list[Tensor]] = []
    for _ in range(n_steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        grads.append([p.grad.clone() for p in params])
        before = [p.detach().clone() for p in params]
        optimizer.step()
    return before, grads


def _direction(rule: AdaBeliefRule, optimizer: AdaBelief, group: dict[str, Any]) -> list[Tensor]:
    """dW as the rule computes it for one group, by applying the rule with alpha=1 to zeros."""
    assert rule.handles(group)
    out = [torch.zeros_like(p) for p in group["params"]]
    add_rule_direction_(rule, out, rule_columns(rule, [optimizer.state[p] for p in group["params"]]), group, 1.0)
    return out


def _decay(group: dict[str, Any]) -> float:
    """The factor d of AdaBelief's decoupled decay ``p *= 1 - d`` (0 for L2 decay or none)."""
    if not group["weight_decouple"] or group["weight_decay"] == 0:
        return 0.0
    return group["weight_decay"] * (1.0 if group["fixed_decay"] else group["lr"])


def _rho(beta2: float, k: int) -> float:
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * k * beta2**k / (1 - beta2**k)


# name: (AdaBelief kwargs, steps, the code path AdaBelief takes). With b2 = 0.999, rho_k = 4.996 at k=5 and 5.994
# at k=6: the default threshold 5 is crossed at step 6.
CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "default": ({}, 4, "foreach"),  # foreach=None: foreach on CPU too for dense real gradients
    "default_foreach_true": (dict(foreach=True), 4, "foreach"),
    "default_foreach_false": (dict(foreach=False), 4, "per_param"),
    "betas_eps": (dict(betas=(0.8, 0.95), eps=1e-8), 6, "foreach"),
    "betas_eps_foreach_false": (dict(betas=(0.8, 0.95), eps=1e-8, foreach=False), 6, "per_param"),
    "decoupled": (dict(weight_decay=0.3), 4, "foreach"),
    "decoupled_foreach_false": (dict(weight_decay=0.3, foreach=False), 4, "per_param"),
    "fixed_decay": (dict(weight_decay=0.02, fixed_decay=True), 4, "foreach"),
    "fixed_decay_foreach_false": (dict(weight_decay=0.02, fixed_decay=True, foreach=False), 4, "per_param"),
    "l2": (dict(weight_decouple=False, weight_decay=0.1), 4, "foreach"),
    "l2_foreach_false": (dict(weight_decouple=False, weight_decay=0.1, foreach=False), 4, "per_param"),
    "maximize": (dict(maximize=True), 4, "foreach"),
    "maximize_foreach_false": (dict(maximize=True, foreach=False), 4, "per_param"),
    # a short second-moment memory, so that max_exp_avg_var really differs from exp_avg_var
    "ams_bound": (dict(ams_bound=True, betas=(0.9, 0.5)), 8, "per_param"),
    "ams_bound_l2_maximize": (
        dict(ams_bound=True, betas=(0.9, 0.5), weight_decouple=False, weight_decay=0.1, maximize=True),
        8,
        "per_param",
    ),
    "adam_debias": (dict(adam_debias=True), 4, "foreach"),
    "adanorm": (dict(adanorm=True), 5, "per_param"),
    "rectify_before_sgd": (dict(rectify=True), 3, "per_param"),
    "rectify_before_no_sgd": (dict(rectify=True, degenerated_to_sgd=False), 3, "per_param"),
    "rectify_before_no_sgd_decoupled": (
        dict(rectify=True, degenerated_to_sgd=False, weight_decay=0.3),
        5,
        "per_param",
    ),
    "rectify_after": (dict(rectify=True), 6, "per_param"),
    "rectify_after_no_sgd": (dict(rectify=True, degenerated_to_sgd=False), 9, "per_param"),
    "rectify_threshold8_before": (dict(rectify=True, n_sma_threshold=8), 7, "per_param"),
    "rectify_threshold8_after": (dict(rectify=True, n_sma_threshold=8), 9, "per_param"),
    "rectify_after_ams_bound_decoupled": (dict(rectify=True, ams_bound=True, weight_decay=0.3), 9, "per_param"),
    "rectify_after_adam_debias_eps": (
        dict(rectify=True, adam_debias=True, eps=1e-8, betas=(0.8, 0.99)),
        9,
        "per_param",
    ),
    "rectify_after_maximize_l2": (
        dict(rectify=True, maximize=True, weight_decouple=False, weight_decay=0.1),
        9,
        "per_param",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_equals_the_update_adabelief_applied(name: str) -> None:
    kwargs, n_steps, path = CASES[name]
    params = _params()
    optimizer = AdaBelief(params, lr=LR, **kwargs)
    paths = _spy_paths(optimizer)
    before, _ = _run(optimizer, n_steps)
    assert set(paths) == {path}

    group = optimizer.param_groups[0]
    registered = rule_for(optimizer)
    assert isinstance(registered, AdaBeliefRule)
    # rectify: the unbound rule cannot know n_sma_threshold / degenerated_to_sgd, so it declines the group; the
    # rule bound to the optimizer (what the predictor uses) handles every group
    assert registered.handles(group) == (not group["rectify"])
    rule = registered.bind(optimizer)
    assert rule.handles(group)

    direction = _direction(rule, optimizer, group)
    d = _decay(group)
    for w0, w1, dw in zip(before, params, direction, strict=True):
        # AdaBelief: W <- W * (1 - d) - lr * dW, the decoupled decay first
        torch.testing.assert_close(w0 * (1 - d) - w1.detach(), LR * dw, rtol=RTOL, atol=ATOL)

    # the case really exercises what its name says
    applied_norm = sum(float((w0 - w1.detach()).norm()) for w0, w1 in zip(before, params, strict=True))
    dw_norm = sum(float(dw.norm()) for dw in direction)
    if group["rectify"]:
        rectified = _rho(group["betas"][1], n_steps) >= optimizer.n_sma_threshold
        assert rectified == ("after" in name)
        if not rectified and not optimizer.degenerated_to_sgd:
            assert dw_norm == 0.0  # AdaBelief skipped the update
            assert (applied_norm > 0) == (d > 0)  # ... but not the decay
    if not (group["rectify"] and not optimizer.degenerated_to_sgd and "before" in name):
        assert dw_norm > 1e-2
    if d > 0:
        assert sum(float((d * w0).norm()) for w0 in before) > 1e-3
    if group["ams_bound"]:
        state = optimizer.state[params[0]]
        assert not torch.equal(state["max_exp_avg_var"], state["exp_avg_var"])


@pytest.mark.parametrize("foreach", [None, False])
def test_two_groups_with_their_own_betas_eps_and_decay(foreach: bool | None) -> None:
    params = _params()
    groups = [
        dict(params=params[:2], betas=(0.8, 0.95), eps=1e-8),
        dict(params=params[2:], betas=(0.95, 0.9), eps=1e-4, weight_decay=0.2, lr=0.03),
    ]
    optimizer = AdaBelief(groups, lr=LR, foreach=foreach)
    paths = _spy_paths(optimizer)
    before, _ = _run(optimizer, n_steps=5)
    assert set(paths) == {"foreach" if foreach is None else "per_param"}
    rule = rule_for(optimizer)
    assert isinstance(rule, AdaBeliefRule)
    start = 0
    for group in optimizer.param_groups:
        direction = _direction(rule, optimizer, group)
        d = _decay(group)
        for w0, w1, dw in zip(before[start:], group["params"], direction, strict=False):
            torch.testing.assert_close(w0 * (1 - d) - w1.detach(), group["lr"] * dw, rtol=RTOL, atol=ATOL)
        start += len(group["params"])


def test_complex_parameters_are_predicted_on_their_real_views() -> None:
    """The predictor hands rules real views of complex tensors: the prediction moves W by the last applied update."""
    g = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.complex128))]
    optimizer = AdaBelief(params, lr=LR, betas=(0.8, 0.9))
    before, _ = _run(optimizer, n_steps=4)
    real = params[0].detach().clone()
    OptimizerPredictor(optimizer).predict()
    torch.testing.assert_close(real - params[0].detach(), before[0] - real, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("betas_eps", [((0.9, 0.999), 1e-16), ((0.8, 0.95), 1e-6)], ids=["defaults", "custom"])
def test_default_form_by_hand(betas_eps: tuple[tuple[float, float], float]) -> None:
    """m_hat / (sqrt(s_hat) + eps) with AdaBelief's recursions written out per tensor."""
    (b1, b2), eps = betas_eps
    params = _params()
    optimizer = AdaBelief(params, lr=LR, betas=(b1, b2), eps=eps)
    k = 7
    _, grads = _run(optimizer, n_steps=k)
    direction = _direction(AdaBeliefRule(), optimizer, optimizer.param_groups[0])
    for i, dw in enumerate(direction):
        m = torch.zeros_like(dw)
        s = torch.zeros_like(dw)
        for step_grads in grads:
            g = step_grads[i]
            m = b1 * m + (1 - b1) * g
            s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        m_hat = m / (1 - b1**k)
        s_hat = s / (1 - b2**k)
        torch.testing.assert_close(dw, m_hat / (s_hat.sqrt() + eps), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [3, 12])
def test_rectified_form_by_hand(k: int) -> None:
    """RAdam's rectification on AdaBelief's s: momentum SGD at k=3, the rectified step at k=12 (threshold 5)."""
    b1, b2, eps = 0.9, 0.999, 1e-10
    params = _params()
    optimizer = AdaBelief(params, lr=LR, betas=(b1, b2), eps=eps, rectify=True)
    _run(optimizer, n_steps=k)
    direction = _direction(
        AdaBeliefRule(n_sma_threshold=5, degenerated_to_sgd=True), optimizer, optimizer.param_groups[0]
    )
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * k * b2**k / (1 - b2**k)
    assert (rho >= 5) == (k == 12)
    for p, dw in zip(params, direction, strict=True):
        m_hat = optimizer.state[p]["exp_avg"] / (1 - b1**k)
        if rho < 5:
            expected = m_hat
        else:
            r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
            s_hat = optimizer.state[p]["exp_avg_var"] / (1 - b2**k)
            expected = r * m_hat / (s_hat.sqrt() + eps / math.sqrt(1 - b2**k))
        torch.testing.assert_close(dw, expected, rtol=RTOL, atol=ATOL)


def test_registry_and_handles() -> None:
    params = _params()
    optimizer = AdaBelief(params, lr=LR)
    rule = rule_for(optimizer)
    assert isinstance(rule, AdaBeliefRule)
    assert rule.name == "adabelief"
    assert rule.handles(optimizer.param_groups[0])
    assert not rule.handles({**optimizer.param_groups[0], "rectify": True})
    assert rule.bind(optimizer).handles({**optimizer.param_groups[0], "rectify": True})
    assert OptimizerPredictor(AdaBelief(_params(), lr=LR, rectify=True)).describe() == "adabelief"
    assert rule.state_tensors({}) is None  # no state before the first step


# ---------------------------------------------------------------------------------------------------- end to end
BATCH_SIZE = 8
EPOCHS = 2  # 96 samples = 12 batches, 24 optimizer steps

E2E_CASES = {
    "decoupled": dict(lr=0.01, weight_decay=0.1),
    "l2_ams_bound": dict(lr=0.01, betas=(0.9, 0.9), weight_decouple=False, weight_decay=0.01, ams_bound=True),
    # rule registered with the rectification settings: momentum SGD for 5 steps, then rectified
    "rectify": dict(lr=0.05, rectify=True, eps=1e-8),
}


def _reference_direction(optimizer: AdaBelief, group: dict[str, Any], p: Tensor) -> Tensor:
    """dW of one parameter from AdaBelief's state, written from the formulas."""
    state = optimizer.state[p]
    (b1, b2), eps, k = group["betas"], group["eps"], group["step"]
    s = state["max_exp_avg_var"] if group["ams_bound"] else state["exp_avg_var"]
    m_hat = state["exp_avg"] / (1 - b1**k)
    if not group["rectify"]:
        return m_hat / ((s / (1 - b2**k)).sqrt() + eps)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * k * b2**k / (1 - b2**k)
    if rho < optimizer.n_sma_threshold:
        return m_hat if optimizer.degenerated_to_sgd else torch.zeros_like(p)
    r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return r * m_hat * math.sqrt(1 - b2**k) / (s.sqrt() + eps)


def _reference(kwargs: dict[str, Any], steps: int | None) -> Tensor:
    """Plain-PyTorch XGrad with AdaBelief (``steps=None``: no prediction); returns the final weights."""
    net = make_net()
    optimizer = AdaBelief(net.parameters(), **kwargs)
    data = batches(*make_data(), BATCH_SIZE)
    for _ in range(EPOCHS):
        for x, y in data:
            real: dict[Tensor, Tensor] = {}
            if steps is not None:
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            if optimizer.state[p]:
                                real[p] = p.detach().clone()
                                p.sub_(steps * group["lr"] * _reference_direction(optimizer, group, p))
            nn.functional.mse_loss(net(x).float(), y.float()).backward()
            with torch.no_grad():
                for p, value in real.items():
                    p.copy_(value)
            optimizer.step()
            optimizer.zero_grad()
    return flat(net)


def _fit(kwargs: dict[str, Any], callback: XGradCallback | None) -> Tensor:
    module = TinyModule(optimizer=lambda p: AdaBelief(p, **kwargs))
    fit = trainer(max_epochs=EPOCHS, callbacks=[callback] if callback is not None else [])
    fit.fit(module, loader(*make_data(), BATCH_SIZE))
    assert fit.global_step == EPOCHS * 12
    return flat(module)


@pytest.mark.parametrize("name", list(E2E_CASES))
def test_trainer_with_callback_equals_the_reference_loop(name: str) -> None:
    kwargs = E2E_CASES[name]
    assert isinstance(rule_for(AdaBelief(make_net().parameters(), **kwargs)), AdaBeliefRule)

    with_xgrad = _fit(kwargs, XGradCallback(steps=1))
    expected = _reference(kwargs, steps=1)
    torch.testing.assert_close(with_xgrad, expected, rtol=agreement.RTOL, atol=agreement.ATOL)

    baseline = _fit(kwargs, None)
    torch.testing.assert_close(baseline, _reference(kwargs, steps=None), rtol=agreement.RTOL, atol=agreement.ATOL)
    tolerance = agreement.ATOL + agreement.RTOL * expected.abs().max()
    assert (baseline - with_xgrad).abs().max() > agreement.SEPARATION * tolerance
