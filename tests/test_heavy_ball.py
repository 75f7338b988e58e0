"""Adaptive heavy-ball SGD and Adam (``lightning_xgrad.heavy_ball.optim``) and their XGrad rules.

Values are checked against hand computations on quadratics and against the independent reference in
``tests/heavy_ball_reference.py`` (plain PyTorch, one tensor at a time, float64 sums): the optimizers alone, in a
Lightning Trainer, with XGradCallback (the prediction uses the latest beta_k, the secant the predicted points), after
a state_dict round trip, sharded with FSDP2 on two processes, and from LightningCLI.
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_xgrad import XGradCallback
from lightning_xgrad.heavy_ball.optim import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD
from lightning_xgrad.heavy_ball.rules import HeavyBallAdamRule, HeavyBallSGDRule
from lightning_xgrad.rules import rule_for

from .agreement import ATOL, RTOL, assert_far, mse
from .fsdp2_script import CPU_FSDP2_MISSING
from .heavy_ball_reference import HeavyBallReference, heavy_ball_xgrad_reference
from .toolkit import TinyModule, batches, flat, loader, make_data, make_net, trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 8
EPOCHS = 2  # 12 batches of 8: 24 steps

#: two param groups per optimizer (first layer, second layer) with their own lr, delta and weight decay
GROUPS: dict[str, list[dict[str, float]]] = {
    "sgd": [dict(lr=0.05, delta=0.01, weight_decay=1e-3), dict(lr=0.2, delta=0.3, weight_decay=0.0)],
    "adam": [
        dict(lr=0.01, delta=0.01, weight_decay=0.05, beta2=0.999, eps=1e-8),
        dict(lr=0.003, delta=0.05, weight_decay=0.0, beta2=0.99, eps=1e-6),
    ],
}


def make_optimizer(kind: str, params: Iterator[nn.Parameter]) -> AdaptiveHeavyBallSGD | AdaptiveHeavyBallAdam:
    """The optimizer of ``kind`` over ``make_net``'s parameters, in the two groups of ``GROUPS[kind]``."""
    ps = list(params)
    groups = [{"params": ps[:2], **GROUPS[kind][0]}, {"params": ps[2:], **GROUPS[kind][1]}]
    return AdaptiveHeavyBallSGD(groups) if kind == "sgd" else AdaptiveHeavyBallAdam(groups)


def make_reference(kind: str, net: nn.Module) -> HeavyBallReference:
    ps = list(net.parameters())
    groups = [{"params": ps[:2], **GROUPS[kind][0]}, {"params": ps[2:], **GROUPS[kind][1]}]
    return HeavyBallReference(groups, kind)


def train_batches() -> list[tuple[Tensor, Tensor]]:
    return batches(*make_data(), BATCH_SIZE)


# ------------------------------------------------------------------------------------------------ hand computations
def quadratic_steps(optimizer: torch.optim.Optimizer, x: Tensor, curvatures: Tensor, n: int) -> list[float]:
    """``n`` steps on ``f(x) = sum(curvatures * x^2) / 2``; the beta of every step."""
    betas = []
    for _ in range(n):
        optimizer.zero_grad()
        (0.5 * (curvatures * x * x).sum()).backward()
        optimizer.step()
        betas.append(float(optimizer.param_groups[0]["momentum"]))
    return betas


def test_sgd_hand_computed_on_an_anisotropic_quadratic() -> None:
    """Three steps on f = (x1^2 + 4 x2^2) / 2 from (1, 1), lr 0.1, worked out by hand."""
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = AdaptiveHeavyBallSGD([x], lr=0.1)
    betas = quadratic_steps(optimizer, x, torch.tensor([1.0, 4.0], dtype=torch.float64), 1)
    # step 0: g0 = (1, 4), beta0 = 0, buf = g0, x1 = (1, 1) - 0.1 (1, 4)
    assert betas == [0.0]
    torch.testing.assert_close(x.detach(), torch.tensor([0.9, 0.6], dtype=torch.float64))
    # step 1: g1 = (0.9, 2.4); ||g1 - g0||^2 = 0.1^2 + 1.6^2 = 2.57; ||x1 - x0||^2 = 0.1^2 + 0.4^2 = 0.17
    beta1 = (1 - math.sqrt(0.1 * math.sqrt(2.57 / 0.17))) ** 2  # = 0.14172...
    buf1 = [beta1 * 1 + 0.9, beta1 * 4 + 2.4]
    x2 = [0.9 - 0.1 * buf1[0], 0.6 - 0.1 * buf1[1]]
    betas += quadratic_steps(optimizer, x, torch.tensor([1.0, 4.0], dtype=torch.float64), 1)
    assert betas[1] == pytest.approx(beta1, rel=1e-6) and 0.14 < beta1 < 0.15
    torch.testing.assert_close(x.detach(), torch.tensor(x2, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    # step 2: the heavy-ball form x3 = x2 - lr g2 + beta2 (x2 - x1), with beta2 from (g2, g1) and (x2, x1)
    g1, g2 = [0.9, 2.4], [x2[0], 4 * x2[1]]
    dist = (x2[0] - 0.9) ** 2 + (x2[1] - 0.6) ** 2
    diff = (g2[0] - g1[0]) ** 2 + (g2[1] - g1[1]) ** 2
    beta2 = (1 - math.sqrt(0.1 * math.sqrt(diff / dist))) ** 2
    x3 = [x2[i] - 0.1 * g2[i] + beta2 * (x2[i] - [0.9, 0.6][i]) for i in range(2)]
    betas += quadratic_steps(optimizer, x, torch.tensor([1.0, 4.0], dtype=torch.float64), 1)
    assert betas[2] == pytest.approx(beta2, rel=1e-6)
    torch.testing.assert_close(x.detach(), torch.tensor(x3, dtype=torch.float64), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("lr", "delta", "expected"),
    [
        (0.01, 0.01, (1 - math.sqrt(0.04)) ** 2),  # lr L = 0.04: 0.64
        (0.0025, 0.25, 0.75),  # lr L = 0.01: (1 - 0.1)^2 = 0.81, clipped at 1 - delta
        (0.25, 0.01, 0.0),  # lr L = 1: the optimal momentum is 0
        (0.5625, 0.01, 0.25),  # lr L = 2.25: (1 - 1.5)^2, the square grows again past lr L = 1
        (2.0, 0.01, 0.99),  # lr L = 8: (1 - sqrt(8))^2 = 3.34, clipped at 1 - delta
    ],
)
def test_secant_recovers_the_curvature_of_an_isotropic_quadratic(lr: float, delta: float, expected: float) -> None:
    """On f = 2 ||x||^2 (L = 4 in every direction) the secant is exactly 4, so beta_1 = clip((1 - sqrt(4 lr))^2)."""
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    optimizer = AdaptiveHeavyBallSGD([x], lr=lr, delta=delta)
    betas = quadratic_steps(optimizer, x, torch.full((3,), 4.0, dtype=torch.float64), 2)
    assert betas[0] == 0.0
    assert betas[1] == pytest.approx(expected, abs=1e-6)


def test_zero_distance_keeps_the_previous_beta() -> None:
    """A step with lr 0 leaves x where it was: the next secant has no distance, so beta stays, finite."""
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = AdaptiveHeavyBallSGD([x], lr=0.1)
    curvatures = torch.tensor([1.0, 4.0], dtype=torch.float64)
    betas = quadratic_steps(optimizer, x, curvatures, 2)
    optimizer.param_groups[0]["lr"] = 0.0
    betas += quadratic_steps(optimizer, x, curvatures, 1)  # lr 0 in the formula: (1 - 0)^2, clipped at 0.99
    assert betas[2] == pytest.approx(0.99)
    before = x.detach().clone()
    optimizer.param_groups[0]["lr"] = 0.1
    betas += quadratic_steps(optimizer, x, curvatures, 1)  # x did not move at the last step: distance 0
    assert betas[3] == betas[2]
    assert torch.isfinite(x).all() and not torch.equal(x.detach(), before)


def test_adam_hand_computed_first_two_steps() -> None:
    """Step 0: m = g, so p -= lr g / (|g| + eps); step 1: b1 = beta_1 from the secant, correction 1 - 0 * beta_1."""
    x = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    optimizer = AdaptiveHeavyBallAdam([x], lr=0.1, beta2=0.9, eps=1e-3)
    curvatures = torch.tensor([1.0, 4.0], dtype=torch.float64)
    quadratic_steps(optimizer, x, curvatures, 1)
    g0 = [1.0, 4.0]
    x1 = [1 - 0.1 * g0[0] / (1 + 1e-3), 1 - 0.1 * g0[1] / (4 + 1e-3)]
    torch.testing.assert_close(x.detach(), torch.tensor(x1, dtype=torch.float64))
    betas = quadratic_steps(optimizer, x, curvatures, 1)
    g1 = [x1[0], 4 * x1[1]]
    dist = sum((a - 1.0) ** 2 for a in x1)
    diff = sum((a - b) ** 2 for a, b in zip(g1, g0, strict=True))
    beta1 = (1 - math.sqrt(0.1 * math.sqrt(diff / dist))) ** 2
    assert betas[0] == pytest.approx(beta1, rel=1e-6)
    expected = []
    for i in range(2):
        m = beta1 * g0[i] + (1 - beta1) * g1[i]  # m_0 = g0, the product of betas 0 * beta1 = 0: no correction
        v = 0.9 * 0.1 * g0[i] ** 2 + 0.1 * g1[i] ** 2
        expected.append(x1[i] - 0.1 * m / (math.sqrt(v / (1 - 0.9**2)) + 1e-3))
    torch.testing.assert_close(x.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert float(optimizer.state[x]["beta1_product"]) == 0.0


# ------------------------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_matches_reference_with_param_groups(kind: str) -> None:
    """20 steps on the toolkit's MLP, two groups with different lr, delta and weight decay: weights and betas."""
    data = train_batches()
    net, ref_net = make_net(), make_net()
    optimizer = make_optimizer(kind, net.parameters())
    reference = make_reference(kind, ref_net)
    betas, ref_betas = [], []
    for step in range(20):
        batch = data[step % len(data)]
        mse(net, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        mse(ref_net, batch).backward()
        reference.step()
        ref_net.zero_grad()
        betas.append([float(g["momentum"]) for g in optimizer.param_groups])
        ref_betas.append(list(reference.beta))
    torch.testing.assert_close(torch.tensor(betas), torch.tensor(ref_betas), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(flat(net), flat(ref_net), rtol=RTOL, atol=ATOL)
    # the betas vary from step to step and between the groups, many of them well inside (0, 1 - delta): the secant
    # really acted (mini-batch noise keeps many of them small, see the optimizer's docstring)
    later = torch.tensor(betas[1:])
    assert int(((later > 0.05) & (later < 0.65)).sum()) >= 8, later
    assert float(later.std(dim=0).min()) > 0.05 and not torch.allclose(later[:, 0], later[:, 1])
    # and a constant momentum would have ended elsewhere
    const_net = make_net()
    if kind == "sgd":
        constant = torch.optim.SGD(const_net.parameters(), lr=0.05, momentum=0.9)
    else:
        constant = torch.optim.AdamW(const_net.parameters(), lr=0.01)
    for step in range(20):
        mse(const_net, data[step % len(data)]).backward()
        constant.step()
        constant.zero_grad()
    assert_far(flat(net), flat(const_net), "adaptive vs constant momentum")


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_state_dict_round_trip_continues_exactly(kind: str) -> None:
    """10 steps, save (through torch.save), load into a fresh optimizer, 10 more: as 20 uninterrupted steps."""
    data = train_batches()

    def run(net: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            mse(net, data[step % len(data)]).backward()
            optimizer.step()
            optimizer.zero_grad()

    net = make_net()
    optimizer = make_optimizer(kind, net.parameters())
    run(net, optimizer, range(20))

    first = make_net()
    first_optimizer = make_optimizer(kind, first.parameters())
    run(first, first_optimizer, range(10))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = make_net(seed=1)  # other initial weights: everything must come from the checkpoint
    second.load_state_dict(saved["model"])
    second_optimizer = make_optimizer(kind, second.parameters())
    second_optimizer.load_state_dict(saved["optimizer"])
    state = second_optimizer.state[next(second.parameters())]
    assert {"prev_point", "prev_grad"} <= set(state)
    run(second, second_optimizer, range(10, 20))
    torch.testing.assert_close(flat(second), flat(net), rtol=0, atol=0)
    assert [float(g["momentum"]) for g in second_optimizer.param_groups] == [
        float(g["momentum"]) for g in optimizer.param_groups
    ]

    # without the secant state the continuation differs: the round trip above is not trivially equal
    third = make_net()
    third.load_state_dict(saved["model"])
    third_optimizer = make_optimizer(kind, third.parameters())
    run(third, third_optimizer, range(10, 20))
    assert_far(flat(third), flat(net), "fresh optimizer vs restored one")


@pytest.mark.parametrize(
    ("factory", "kwargs", "name", "error"),
    [
        (AdaptiveHeavyBallSGD, dict(lr=-0.1), "lr", ValueError),
        (AdaptiveHeavyBallSGD, dict(lr="0.1"), "lr", TypeError),
        (AdaptiveHeavyBallSGD, dict(delta=0.0), "delta", ValueError),
        (AdaptiveHeavyBallSGD, dict(delta=1.5), "delta", ValueError),
        (AdaptiveHeavyBallSGD, dict(delta=float("nan")), "delta", ValueError),
        (AdaptiveHeavyBallSGD, dict(weight_decay=-1.0), "weight_decay", ValueError),
        (AdaptiveHeavyBallAdam, dict(lr=-1e-3), "lr", ValueError),
        (AdaptiveHeavyBallAdam, dict(beta2=1.0), "beta2", ValueError),
        (AdaptiveHeavyBallAdam, dict(beta2=True), "beta2", TypeError),
        (AdaptiveHeavyBallAdam, dict(eps=-1e-8), "eps", ValueError),
        (AdaptiveHeavyBallAdam, dict(delta=-0.1), "delta", ValueError),
        (AdaptiveHeavyBallAdam, dict(weight_decay=-0.01), "weight_decay", ValueError),
    ],
)
def test_bad_arguments_raise_naming_them(
    factory: type, kwargs: dict[str, Any], name: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=rf"^{factory.__name__}: `{name}` must be .*, got {re.escape(repr(kwargs[name]))}$"):
        factory([nn.Parameter(torch.zeros(2))], **kwargs)


def test_rules_are_registered_for_both_optimizers() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    assert isinstance(rule_for(AdaptiveHeavyBallSGD(params)), HeavyBallSGDRule)
    assert isinstance(rule_for(AdaptiveHeavyBallAdam(params)), HeavyBallAdamRule)


# ------------------------------------------------------------------------------------------------------- Lightning
def fit_trainer(kind: str, steps: int | None) -> tuple[Tensor, TinyModule]:
    module = TinyModule(lambda p: make_optimizer(kind, p))
    callbacks = [] if steps is None else [XGradCallback(steps=steps)]
    trainer(max_epochs=EPOCHS, callbacks=callbacks).fit(module, loader(*make_data(), BATCH_SIZE))
    return flat(module.net), module


def fit_reference(kind: str, steps: int | None, secant_at: str = "gradient_point") -> Tensor:
    net = make_net()
    reference = make_reference(kind, net)
    heavy_ball_xgrad_reference(net, reference, train_batches(), mse, steps, epochs=EPOCHS, secant_at=secant_at)
    return flat(net)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_trainer_without_xgrad_matches_reference(kind: str) -> None:
    got, _ = fit_trainer(kind, None)
    torch.testing.assert_close(got, fit_reference(kind, None), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_trainer_with_xgrad_matches_reference(kind: str, steps: int) -> None:
    """XGrad predicts W - s lr dW with the latest beta_k in dW, and the secant pairs each gradient with W_hat."""
    got, module = fit_trainer(kind, steps)
    torch.testing.assert_close(got, fit_reference(kind, steps), rtol=RTOL, atol=ATOL)
    assert_far(got, fit_reference(kind, None), "XGrad vs no prediction")
    # a secant through the real weights instead of the points where the gradients were taken ends elsewhere
    assert_far(got, fit_reference(kind, steps, secant_at="real"), "secant at W_hat vs at W")
    assert all(0 < float(g["momentum"]) < 1 for g in module.trainer.optimizers[0].param_groups)


# ----------------------------------------------------------------------------------------------------------- FSDP2
@pytest.mark.skipif(CPU_FSDP2_MISSING is not None, reason=str(CPU_FSDP2_MISSING))
def test_fsdp2_two_processes_equal_one_process(tmp_path: Path) -> None:
    """FSDP2 on 2 gloo processes: norms over all shards (uneven, one empty), so weights and betas are one process's."""
    from tests.heavy_ball_fsdp2_script import EPOCHS as FSDP_EPOCHS
    from tests.heavy_ball_fsdp2_script import KINDS, GlobalBatchModule

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "tests/heavy_ball_fsdp2_script.py", str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for kind in KINDS:
        ranks = [torch.load(tmp_path / f"{kind}_rank{r}.pt", weights_only=True) for r in range(2)]
        assert ranks[0]["local_numels"] != ranks[1]["local_numels"]  # really sharded, unevenly
        single = GlobalBatchModule(kind)
        fit = trainer(max_epochs=FSDP_EPOCHS, callbacks=[XGradCallback()])
        fit.fit(single)
        betas = torch.tensor(single.betas)
        for rank in ranks:
            torch.testing.assert_close(rank["params"], flat(single.net), rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(rank["betas"], betas, rtol=RTOL, atol=ATOL)
        assert ranks[0]["sharded_state"] and ranks[1]["sharded_state"]
        # a secant at every step after the first, not a constant: local-shard norms would give other betas
        assert betas[0].tolist() == [0.0, 0.0] and (betas[1:] > 0).all() and float(betas[1:].max()) > 0.05, betas


# ------------------------------------------------------------------------------------------------------ LightningCLI
def test_cli_config_trains_digits_with_the_adaptive_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``examples/configs/digits_ahb.yaml``: LightningCLI's own ``optimizer`` key replaces the example's choice."""
    from .toolkit import load_example

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["digits.py"])
    digits = load_example("digits")
    config = REPO_ROOT / "examples" / "configs" / "digits_ahb.yaml"
    flags = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.warns(UserWarning, match="configure_optimizers` will be overridden"):
            baseline = digits.cli_main(["fit", "--config", str(config), *flags])
        with pytest.warns(UserWarning, match="configure_optimizers` will be overridden"):
            xgrad = digits.cli_main(
                ["fit", "--config", str(config), *flags, "--trainer.callbacks+=lightning_xgrad.XGradCallback"]
            )
    finally:
        torch.set_num_threads(threads)
    for cli in (baseline, xgrad):
        (optimizer,) = cli.trainer.optimizers
        assert type(optimizer) is AdaptiveHeavyBallSGD
        assert optimizer.param_groups[0]["lr"] == 0.05 and optimizer.param_groups[0]["delta"] == 0.01
        assert 0 < float(optimizer.param_groups[0]["momentum"]) <= 0.99
        assert cli.trainer.current_epoch == 1 and math.isfinite(float(cli.trainer.callback_metrics["val_loss"]))
    assert any(isinstance(c, XGradCallback) for c in xgrad.trainer.callbacks)
    assert not torch.equal(flat(baseline.model), flat(xgrad.model))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_sparse_gradients_are_refused_with_the_optimizers_message(kind: str) -> None:
    w = nn.Parameter(torch.ones(4))
    optimizer = AdaptiveHeavyBallSGD([w]) if kind == "sgd" else AdaptiveHeavyBallAdam([w])
    w.grad = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))
    name = type(optimizer).__name__
    with pytest.raises(RuntimeError, match=rf"^{name} does not support sparse gradients"):
        optimizer.step()
