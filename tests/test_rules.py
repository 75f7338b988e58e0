"""dW rules, the trajectory extrapolation, the snapshot and OptimizerPredictor in plain PyTorch (no Lightning).

Each state rule is checked two ways: against the formula written out per tensor here, and against the update the
optimizer itself applied at its last step (with a constant lr, that update is exactly lr * dW).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_xgrad import OptimizerPredictor, PredictionRule, register_rule
from lightning_xgrad._internal.chunks import Chunks
from lightning_xgrad.prediction.snapshot import ParameterSnapshot
from lightning_xgrad.rules import TRAJECTORY, AdamRule, rule_for

from .toolkit import AcceleratorStepCounts, add_rule_direction_, rule_columns

LR = 0.01


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4, 4, 2), (1,)]
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def _run(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], n_steps: int, seed: int = 1) -> list:
    """n_steps with random gradients; returns the update the last step applied, per parameter."""
    g = torch.Generator().manual_seed(seed)
    before = []
    for _ in range(n_steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        before = [p.detach().clone() for p in params]
        optimizer.step()
    return [b - p.detach() for b, p in zip(before, params, strict=True)], before


def _rule_direction(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """dW as the registered rule computes it, by applying the rule with alpha=1 to zeros."""
    rule = rule_for(optimizer)
    group = optimizer.param_groups[0]
    assert rule is not None and rule.handles(group)
    out = [torch.zeros_like(p) for p in params]
    add_rule_direction_(rule, out, rule_columns(rule, [optimizer.state[p] for p in params]), group, 1.0)
    return out


def test_direction_scales_given_to_the_predictor_scale_state_rule_predictions_only() -> None:
    """``direction_scales`` (CProp's live scales) multiply dW elementwise where a parameter has one; the trajectory
    rule extrapolates the applied update as it is. By hand: W_hat = W - steps * lr * scale * buf."""
    params = _params()
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9)
    _run(optimizer, params, n_steps=3)
    scales = {params[0]: torch.linspace(0.0, 1.0, params[0].numel(), dtype=torch.float64).reshape(params[0].shape)}
    real = [p.detach().clone() for p in params]
    predictor = OptimizerPredictor(optimizer, steps=2, direction_scales=scales)
    assert predictor.predict()
    for i, (p, w) in enumerate(zip(params, real, strict=True)):
        scale = scales[params[0]] if i == 0 else 1.0
        expected = w - 2 * LR * scale * optimizer.state[p]["momentum_buffer"]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
    predictor.restore()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, real, strict=True))

    trajectory = OptimizerPredictor(optimizer, steps=2, rule="trajectory", direction_scales=scales)
    trajectory.predict()  # no update known yet: records the one this step applies
    trajectory.restore()
    update, _ = _run(optimizer, params, n_steps=1, seed=2)
    now = [p.detach().clone() for p in params]
    trajectory.predict()
    for p, w, u in zip(params, now, update, strict=True):
        torch.testing.assert_close(p.detach(), w - 2 * u, rtol=1e-12, atol=1e-15)  # no scale on the trajectory
    trajectory.restore(stepped=False)


STATE_RULE_CASES = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
    "sgd_dampening_l2": lambda p: torch.optim.SGD(p, lr=LR, momentum=0.8, dampening=0.3, weight_decay=0.1),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=LR),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=LR, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=LR, amsgrad=True),
    "adam_foreach_false": lambda p: torch.optim.Adam(p, lr=LR, foreach=False),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=LR, momentum=0.9),
    "rmsprop_centered_momentum": lambda p: torch.optim.RMSprop(p, lr=LR, momentum=0.7, centered=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=LR),
    "adamax_l2_maximize": lambda p: torch.optim.Adamax(p, lr=LR, betas=(0.8, 0.9), weight_decay=0.1, maximize=True),
    "adamax_foreach": lambda p: torch.optim.Adamax(p, lr=LR, foreach=True),
    "radam": lambda p: torch.optim.RAdam(p, lr=LR),
    "radam_foreach_l2": lambda p: torch.optim.RAdam(p, lr=LR, weight_decay=0.1, foreach=True),
    "radam_fast_b2": lambda p: torch.optim.RAdam(p, lr=LR, betas=(0.9, 0.9)),
}


@pytest.mark.parametrize("n_steps", [4, 9], ids=["4_steps", "9_steps"])
@pytest.mark.parametrize("name", list(STATE_RULE_CASES))
def test_state_rule_equals_the_update_the_optimizer_applied(name: str, n_steps: int) -> None:
    """9 steps take RAdam past its rectification threshold (rho_k > 5 from step 6 with b2 = 0.999)."""
    params = _params()
    optimizer = STATE_RULE_CASES[name](params)
    applied, _ = _run(optimizer, params, n_steps=n_steps)
    direction = _rule_direction(optimizer, params)
    for a, d in zip(applied, direction, strict=True):
        torch.testing.assert_close(a, LR * d, rtol=1e-10, atol=1e-12)


def test_radam_direction_leaves_out_decoupled_decay() -> None:
    params = _params()
    wd = 0.3
    optimizer = torch.optim.RAdam(params, lr=LR, weight_decay=wd, decoupled_weight_decay=True)
    applied, before = _run(optimizer, params, n_steps=8)
    direction = _rule_direction(optimizer, params)
    for a, d, w in zip(applied, direction, before, strict=True):
        torch.testing.assert_close(a, LR * wd * w + LR * d, rtol=1e-10, atol=1e-12)


def test_radam_rule_matches_the_formula_on_both_sides_of_the_threshold() -> None:
    """By hand from the paper's formulas: momentum alone at k=3, rectified Adam at k=12."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    for k_steps in (3, 12):
        params = _params()
        optimizer = torch.optim.RAdam(params, lr=LR, betas=(b1, b2), eps=eps)
        _run(optimizer, params, n_steps=k_steps)
        direction = _rule_direction(optimizer, params)
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * k_steps * b2**k_steps / (1 - b2**k_steps)
        for p, d in zip(params, direction, strict=True):
            m_hat = optimizer.state[p]["exp_avg"] / (1 - b1**k_steps)
            if rho <= 5:
                expected = m_hat
            else:
                r = math.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
                v_hat = optimizer.state[p]["exp_avg_sq"] / (1 - b2**k_steps)
                expected = r * m_hat / (v_hat.sqrt() + eps / math.sqrt(1 - b2**k_steps))
            torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-12)
        assert (rho <= 5) == (k_steps == 3)


def test_adamw_direction_leaves_out_decoupled_decay() -> None:
    params = _params()
    wd = 0.3
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=wd)
    applied, before = _run(optimizer, params, n_steps=3)
    direction = _rule_direction(optimizer, params)
    for a, d, w in zip(applied, direction, before, strict=True):
        # AdamW: W <- W * (1 - lr * wd) - lr * dW, so the applied update is lr * wd * W + lr * dW
        torch.testing.assert_close(a, LR * wd * w + LR * d, rtol=1e-10, atol=1e-12)
        assert (a - LR * d).abs().max() > 1e-5  # the decay is really there, and really left out


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_rule_matches_the_formula(amsgrad: bool) -> None:
    params = _params()
    b1, b2, eps = 0.85, 0.97, 1e-6
    optimizer = torch.optim.Adam(params, lr=LR, betas=(b1, b2), eps=eps, amsgrad=amsgrad)
    _run(optimizer, params, n_steps=5)
    direction = _rule_direction(optimizer, params)
    for p, d in zip(params, direction, strict=True):
        state = optimizer.state[p]
        k = int(state["step"])
        v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
        expected = (state["exp_avg"] / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14)


def test_adam_rule_with_steps_on_the_device_path_matches_the_float_path() -> None:
    """Fused and capturable Adam keep ``step`` on the accelerator; that path must give the same numbers."""
    params = _params()
    optimizer = torch.optim.Adam(params, lr=LR, betas=(0.8, 0.9))
    _run(optimizer, params, n_steps=3)
    # give one parameter a different step count, as a parameter that joined later would have
    optimizer.state[params[1]]["step"] = torch.tensor(2.0, dtype=torch.float64)
    rule = AdamRule()
    states = [optimizer.state[p] for p in params]
    via_floats = [torch.zeros_like(p) for p in params]
    add_rule_direction_(rule, via_floats, rule_columns(rule, states), optimizer.param_groups[0], -0.5)
    via_tensors = [torch.zeros_like(p) for p in params]
    device = rule_columns(rule, states, AcceleratorStepCounts)
    add_rule_direction_(rule, via_tensors, device, optimizer.param_groups[0], -0.5)
    for a, b, p, step in zip(via_floats, via_tensors, params, device[2].tensors, strict=True):
        # torch keeps ``step`` in float32, so tensor bias corrections carry float32 rounding, as torch's own
        # capturable Adam does; the float path computes them in double precision
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
        k = float(step)
        s = optimizer.state[p]
        expected = -0.5 * (s["exp_avg"] / (1 - 0.8**k)) / ((s["exp_avg_sq"] / (1 - 0.9**k)).sqrt() + 1e-8)
        torch.testing.assert_close(a, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n_steps", [3, 8])  # betas (0.8, 0.9): RAdam's rho_k <= 5 up to k = 5, rectified after
@pytest.mark.parametrize("optimizer_class", [torch.optim.Adamax, torch.optim.RAdam])
def test_rules_with_steps_on_the_device_path_match_the_float_path(optimizer_class: type, n_steps: int) -> None:
    """Capturable Adamax and RAdam keep ``step`` on the accelerator; their rules then compute the bias corrections
    (and RAdam's choice between its two forms) as tensors. Taken here for CPU counters, that path must give the
    numbers of the float path, also with a parameter at another step (RAdam: the other form in the same call)."""
    params = _params()
    optimizer = optimizer_class(params, lr=LR, betas=(0.8, 0.9))
    _run(optimizer, params, n_steps=n_steps)
    optimizer.state[params[1]]["step"] = torch.tensor(2.0)  # as a parameter that joined later would have
    rule = rule_for(optimizer)
    states = [optimizer.state[p] for p in params]
    via_floats = [torch.zeros_like(p) for p in params]
    add_rule_direction_(rule, via_floats, rule_columns(rule, states), optimizer.param_groups[0], -0.5)
    via_tensors = [torch.zeros_like(p) for p in params]
    device = rule_columns(rule, states, AcceleratorStepCounts)
    add_rule_direction_(rule, via_tensors, device, optimizer.param_groups[0], -0.5)
    for a, b in zip(via_floats, via_tensors, strict=True):
        # float32 step counts: the tensor bias corrections carry float32 rounding, as torch's capturable step does
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
        assert a.abs().max() > 0


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: torch.optim.SGD(p, lr=LR),
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True),
        lambda p: torch.optim.RMSprop(p, lr=LR),
        lambda p: torch.optim.Adagrad(p, lr=LR),
        lambda p: torch.optim.NAdam(p, lr=LR),
    ],
    ids=["sgd_plain", "sgd_nesterov", "rmsprop_plain", "adagrad_fresh_gradient", "nadam_fresh_gradient"],
)
def test_groups_whose_state_lacks_the_direction_use_the_trajectory_rule(factory) -> None:
    optimizer = factory(_params())
    assert OptimizerPredictor(optimizer).group_rule(optimizer.param_groups[0]) is TRAJECTORY
    assert OptimizerPredictor(optimizer).describe() == "trajectory"


def test_subclasses_are_not_trusted_with_the_parent_rule() -> None:
    class MyAdam(torch.optim.Adam):
        pass

    assert rule_for(torch.optim.Adam(_params(), lr=LR)) is not None
    assert rule_for(MyAdam(_params(), lr=LR)) is None


@pytest.mark.parametrize(
    "factory",
    [lambda p: torch.optim.Adam(p, lr=LR), lambda p: torch.optim.RMSprop(p, lr=LR)],
    ids=["adam_state_rule", "rmsprop_trajectory"],
)
def test_complex_parameters_are_predicted_on_real_views(factory) -> None:
    """torch's optimizers treat real and imaginary parts as separate coordinates; so must the prediction."""
    g = torch.Generator().manual_seed(5)
    z = nn.Parameter(torch.randn(4, 3, dtype=torch.complex128, generator=g))
    optimizer = factory([z])
    predictor = OptimizerPredictor(optimizer)
    for _ in range(3):
        predictor.predict()
        z.grad = torch.randn(4, 3, dtype=torch.complex128, generator=g)
        predictor.restore()
        before = z.detach().clone()
        optimizer.step()
    real = z.detach().clone()
    assert predictor.predict()
    torch.testing.assert_close(real - z.detach(), before - real, rtol=1e-10, atol=1e-12)  # W_hat = W - last update
    predictor.restore()
    assert torch.equal(z.detach(), real)


def test_extrapolate_by_hand() -> None:
    w_prev = [torch.tensor([1.0, 2.0, -3.0]), torch.tensor([[0.5]])]
    w_now = [torch.tensor([0.9, 2.2, -3.0]), torch.tensor([[0.25]])]
    params = [w.clone() for w in w_now]
    previous = [w.clone() for w in w_prev]
    TRAJECTORY.extrapolate_(params, previous, 2.0, Chunks(params, 0))
    torch.testing.assert_close(params[0], torch.tensor([0.7, 2.6, -3.0]))
    torch.testing.assert_close(params[1], torch.tensor([[-0.25]]))
    for p, w in zip(previous, w_now, strict=True):
        assert torch.equal(p, w)


def test_chunks_cover_every_tensor_once_within_the_budget() -> None:
    tensors = [torch.empty(n) for n in [5, 1, 7, 3, 3, 2, 7, 1]]
    slices = list(Chunks(tensors, 0))  # budget 0: chunks of at most the largest tensor (tests/test_scaling.py)
    covered = [i for s in slices for i in range(len(tensors))[s]]
    assert covered == list(range(len(tensors)))
    for s in slices:
        assert sum(t.numel() for t in tensors[s]) <= 7
    assert len(slices) < len(tensors)  # really grouped, not one per tensor
    assert list(Chunks([], 0)) == []


def test_snapshot_save_restore_and_swap_are_exact() -> None:
    params = [p.detach() for p in _params()]
    cache = ParameterSnapshot()
    buffers = cache.buffers_for(params, params)
    assert cache.buffers_for(params, params)[0] is buffers[0]  # allocated once, reused
    originals = [p.clone() for p in params]
    cache.save(params, buffers)
    for p in params:
        p.mul_(1.1).add_(0.3)
    moved = [p.clone() for p in params]
    cache.swap(params, buffers, Chunks(params, 0))
    assert all(torch.equal(p, o) for p, o in zip(params, originals, strict=True))
    assert all(torch.equal(b, m) for b, m in zip(buffers, moved, strict=True))
    cache.swap(params, buffers, Chunks(params, 0))
    cache.restore(params, buffers)
    assert all(torch.equal(p, o) for p, o in zip(params, originals, strict=True))
    assert cache.nbytes == sum(p.numel() * p.element_size() for p in params)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _backward(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    nn.functional.mse_loss(net(x), y).backward()


def test_predictor_uses_each_groups_own_lr_and_restores_exactly() -> None:
    net = _net()
    first, second = list(net[0].parameters()), list(net[2].parameters())
    optimizer = torch.optim.SGD([{"params": first, "lr": 0.1}, {"params": second, "lr": 0.02}], momentum=0.9)
    predictor = OptimizerPredictor(optimizer, steps=3)
    assert predictor.predict() is False  # no momentum buffer yet: nothing to predict
    _backward(net, 0)
    predictor.restore()
    optimizer.step()
    optimizer.zero_grad()
    real = [p.detach().clone() for p in net.parameters()]
    assert predictor.predict() is True
    for group in optimizer.param_groups:
        for p in group["params"]:
            index = [q is p for q in net.parameters()].index(True)
            expected = real[index] - 3 * group["lr"] * optimizer.state[p]["momentum_buffer"]
            torch.testing.assert_close(p.detach(), expected)
    predictor.restore()
    assert all(torch.equal(p, r) for p, r in zip(net.parameters(), real, strict=True))


def test_predictor_skips_frozen_parameters_even_with_state() -> None:
    net = _net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    predictor = OptimizerPredictor(optimizer)
    for seed in range(3):
        predictor.predict()
        _backward(net, seed)
        predictor.restore()
        optimizer.step()
        optimizer.zero_grad()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    trainable = net[2].weight.detach().clone()
    predictor.predict()
    assert torch.equal(net[0].weight, frozen)
    assert not torch.equal(net[2].weight, trainable)
    predictor.restore()
    assert torch.equal(net[2].weight, trainable)


def test_trajectory_predictor_follows_the_applied_update_and_rescales_by_lr() -> None:
    net = _net()
    optimizer = torch.optim.RMSprop(net.parameters(), lr=0.01)
    predictor = OptimizerPredictor(optimizer, steps=2)
    history = []
    for seed in range(3):
        history.append([p.detach().clone() for p in net.parameters()])
        predictor.predict()
        _backward(net, seed)
        predictor.restore()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.param_groups[0]["lr"] = 0.005  # a scheduler halved the lr
    now = [p.detach().clone() for p in net.parameters()]
    assert predictor.predict() is True
    for p, w, w_prev in zip(net.parameters(), now, history[-1], strict=True):
        torch.testing.assert_close(p.detach(), w + 2 * (0.005 / 0.01) * (w - w_prev))
    predictor.restore()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), now, strict=True))


def test_register_rule_teaches_a_new_optimizer() -> None:
    class SignSGD(torch.optim.Optimizer):
        """p <- p - lr * sign(g), keeping the sign as state."""

        def __init__(self, params, lr: float) -> None:
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["sign"] = p.grad.sign()
                        p.sub_(self.state[p]["sign"], alpha=group["lr"])

    class SignRule(PredictionRule):
        name = "sign"

        def state_tensors(self, state):
            return (state["sign"],) if "sign" in state else None

        def add_direction_(self, params, columns, group, alpha, chunks):
            torch._foreach_add_(params, columns[0], alpha=alpha)

    net = _net()
    optimizer = SignSGD(net.parameters(), lr=0.1)
    assert OptimizerPredictor(optimizer).describe() == "trajectory"
    register_rule(SignSGD, SignRule())
    predictor = OptimizerPredictor(optimizer)
    assert predictor.describe() == "sign"
    _backward(net, 0)
    optimizer.step()
    real = [p.detach().clone() for p in net.parameters()]
    predictor.predict()
    for p, w in zip(net.parameters(), real, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.1 * optimizer.state[p]["sign"])
    predictor.restore()
    with pytest.raises(TypeError, match="optimizer_class"):
        register_rule("Adam", SignRule())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="PredictionRule"):
        register_rule(SignSGD, object())  # type: ignore[arg-type]


def test_bias_correction_uses_the_current_step_count() -> None:
    """At step k=1 Adam's dW is g / (|g| + eps) elementwise: a hand value."""
    p = nn.Parameter(torch.tensor([2.0, -0.5], dtype=torch.float64))
    optimizer = torch.optim.Adam([p], lr=LR, eps=1e-8)
    p.grad = torch.tensor([0.3, -4.0], dtype=torch.float64)
    optimizer.step()
    (d,) = _rule_direction(optimizer, [p])
    expected = torch.tensor([0.3 / (0.3 + 1e-8), -4.0 / (4.0 + 1e-8)], dtype=torch.float64)
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=0)
    assert math.isclose(float(p[0]), 2.0 - LR * float(expected[0]), rel_tol=1e-12)


def test_direction_scales_are_given_at_construction_not_assigned() -> None:
    predictor = OptimizerPredictor(torch.optim.SGD(_params(), lr=LR, momentum=0.9))
    assert predictor.direction_scales == {}
    with pytest.raises(AttributeError, match=r"`direction_scales` is set at construction"):
        predictor.direction_scales = {}
