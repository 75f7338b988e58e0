"""Trainer + XGradCallback against the plain-PyTorch reference loop in ``tests/reference.py``.

Same initial weights, same batches (a non-shuffling loader), 20+ optimizer steps: the final weights must agree to
float rounding, while the baseline without prediction must end measurably elsewhere, so a callback that silently
stopped predicting cannot pass. A first group of tests checks the reference's own mechanics (windows, loss
normalisation, scheduler) against a Trainer without the callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from lightning_xgrad import XGradCallback

from .agreement import assert_close, assert_far, mse
from .reference import xgrad_reference
from .toolkit import OPTIMIZERS, TinyModule, batches, flat, loader, make_data, make_net, trainer

# Agreement (tests/agreement.py): observed, the largest difference over all cases is below 1e-6 (float32 rounding of
# the prediction formula compounded over ~25 steps; worst 7.8e-7, RMSprop with momentum); 11 of the 36 cases are
# bit-identical. The baseline must end SEPARATION times the tolerance away from the XGrad weights.
BATCH_SIZE = 8

# toolkit's optimizers plus two that make a detail visible within ~25 steps:
# - AdamW with a decoupled decay strong enough that the trajectory rule (which includes the decay) and Adam's state
#   rule (which leaves it out) end measurably apart;
# - AMSGrad with a short second-moment memory: with beta2=0.999 the raw exp_avg_sq only grows in the first hundreds
#   of steps, so max_exp_avg_sq == exp_avg_sq and using the wrong one would go unnoticed.
FACTORIES = {
    **OPTIMIZERS,
    "adamw_decay0.5": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
    "amsgrad_b2_0.9": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.9), amsgrad=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.05),  # momentum-only for 5 steps: a larger lr shows XGrad
    # decoupled decay again separates the state rule (without it) from the trajectory rule (with it)
    "radam_decoupled0.5": lambda p: torch.optim.RAdam(p, lr=0.05, weight_decay=0.5, decoupled_weight_decay=True),
    "adamax_l2": lambda p: torch.optim.Adamax(p, lr=0.01, weight_decay=0.1),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
}


def warmup_then_decay(step: int) -> float:
    """A linear warm-up over 5 steps (never 0, so lr_then > 0) then an exponential decay."""
    return min(1.0, (step + 1) / 5) * 0.9 ** max(0, step - 5)


def decay(step: int) -> float:
    return 0.93**step


@dataclass(frozen=True)
class Case:
    optimizer: str
    steps: int = 1
    rule: str = "auto"
    schedule: Callable[[int], float] | None = None
    accumulate: int = 1
    samples: int = 96  # 12 batches of 8
    epochs: int = 2  # 24 optimizer steps without accumulation

    def batches(self) -> list[tuple[Tensor, Tensor]]:
        return batches(*make_data(self.samples), BATCH_SIZE)


def _case(case: Case, test_id: str):
    return pytest.param(case, id=test_id)


# 110 samples = 14 batches: with accumulate_grad_batches=3 the windows are 3,3,3,3 and a forced final one of 2
# micro-batches (loss still divided by 3); 5 epochs = 25 optimizer steps.
ACCUMULATION = dict(accumulate=3, samples=110, epochs=5)

PER_OPTIMIZER = [
    _case(Case(name, steps=steps), f"{name}-s{steps}")
    for name in (
        "sgd_momentum",
        "adam",
        "adamw",
        "adam_amsgrad",
        "amsgrad_b2_0.9",
        "rmsprop_momentum",
        "rmsprop_centered",
        "rmsprop",  # trajectory
        "sgd_nesterov",  # trajectory
    )
    for steps in (1, 2)
]

SCHEDULED = [
    _case(Case("sgd_momentum", schedule=warmup_then_decay), "sgd_momentum-warmup_decay"),
    _case(Case("adam", schedule=warmup_then_decay), "adam-warmup_decay"),
    _case(Case("adamw", steps=2, schedule=decay), "adamw-s2-decay"),
    _case(Case("rmsprop", schedule=warmup_then_decay), "rmsprop-trajectory-warmup_decay"),
    _case(Case("sgd_nesterov", steps=2, schedule=decay), "sgd_nesterov-trajectory-s2-decay"),
]

ACCUMULATED = [
    _case(Case("adam", **ACCUMULATION), "adam-accumulate3"),
    _case(Case("sgd_momentum", steps=2, **ACCUMULATION), "sgd_momentum-s2-accumulate3"),
    _case(Case("rmsprop", **ACCUMULATION), "rmsprop-trajectory-accumulate3"),
    _case(Case("sgd_nesterov", **ACCUMULATION), "sgd_nesterov-trajectory-accumulate3"),
    _case(Case("adam", schedule=warmup_then_decay, **ACCUMULATION), "adam-accumulate3-warmup_decay"),
    _case(Case("sgd_nesterov", schedule=warmup_then_decay, **ACCUMULATION), "sgd_nesterov-accumulate3-warmup_decay"),
]

FORCED_TRAJECTORY = [
    _case(Case("adam", steps=1, rule="trajectory"), "adam-rule_trajectory-s1"),
    _case(Case("adam", steps=2, rule="trajectory"), "adam-rule_trajectory-s2"),
    _case(Case("adamw", steps=1, rule="trajectory"), "adamw-rule_trajectory-s1"),
    _case(Case("adamw_decay0.5", steps=1, rule="trajectory"), "adamw_decay0.5-rule_trajectory-s1"),
    _case(Case("adamw_decay0.5", steps=1), "adamw_decay0.5-s1"),
    _case(Case("sgd_momentum", steps=1, rule="trajectory", schedule=decay), "sgd_momentum-rule_trajectory-decay"),
    _case(Case("adam", steps=1, rule="trajectory", **ACCUMULATION), "adam-rule_trajectory-accumulate3"),
]

MORE_STATE_RULES = [
    _case(Case("adamax", steps=1), "adamax-s1"),
    _case(Case("adamax_l2", steps=2, schedule=warmup_then_decay), "adamax_l2-s2-warmup_decay"),
    _case(Case("radam", steps=1), "radam-s1"),
    _case(Case("radam", steps=2, **ACCUMULATION), "radam-s2-accumulate3"),
    _case(Case("radam_decoupled0.5", steps=1), "radam_decoupled0.5-s1"),
    _case(Case("radam_decoupled0.5", steps=1, rule="trajectory"), "radam_decoupled0.5-rule_trajectory-s1"),
    _case(Case("nadam", steps=1), "nadam-trajectory-s1"),
    _case(Case("adagrad", steps=1, schedule=warmup_then_decay), "adagrad-trajectory-s1-warmup_decay"),
]


def fit_trainer(case: Case, callback: XGradCallback | None) -> Tensor:
    """The final weights of a Lightning fit of ``case``, with ``callback`` if given."""
    x, y = make_data(case.samples)
    module = TinyModule(FACTORIES[case.optimizer], schedule=case.schedule)
    fit = trainer(
        max_epochs=case.epochs,
        accumulate_grad_batches=case.accumulate,
        callbacks=[callback] if callback is not None else [],
    )
    fit.fit(module, loader(x, y, BATCH_SIZE))
    return flat(module.net)


def fit_reference(case: Case, steps: int | None) -> Tensor:
    """The final weights of the reference loop on ``case``; ``steps=None`` is the baseline."""
    net = make_net()
    optimizer = FACTORIES[case.optimizer](net.parameters())
    scheduler = None if case.schedule is None else torch.optim.lr_scheduler.LambdaLR(optimizer, case.schedule)
    xgrad_reference(
        net,
        optimizer,
        case.batches(),
        mse,
        steps,
        accumulate=case.accumulate,
        scheduler=scheduler,
        rule=case.rule,
        epochs=case.epochs,
    )
    return flat(net)


def optimizer_steps(case: Case) -> int:
    return case.epochs * -(-len(case.batches()) // case.accumulate)


def test_cases_cover_twenty_steps() -> None:
    cases = [p.values[0] for p in PER_OPTIMIZER + SCHEDULED + ACCUMULATED + FORCED_TRAJECTORY + MORE_STATE_RULES]
    assert min(optimizer_steps(case) for case in cases) >= 20
    accumulated = [case for case in cases if case.accumulate > 1]
    assert all(len(case.batches()) % case.accumulate != 0 for case in accumulated)


# ---------------------------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize(
    "case",
    [
        _case(Case("sgd_momentum"), "sgd_momentum"),
        _case(Case("adamw"), "adamw"),
        _case(Case("rmsprop"), "rmsprop"),
        _case(Case("adam", schedule=warmup_then_decay), "adam-warmup_decay"),
        _case(Case("sgd_momentum", **ACCUMULATION), "sgd_momentum-accumulate3"),
        _case(Case("adam", schedule=warmup_then_decay, **ACCUMULATION), "adam-accumulate3-warmup_decay"),
    ],
)
def test_reference_baseline_matches_plain_trainer(case: Case) -> None:
    """Without prediction the reference replays Lightning's loop: windows, loss / accumulate, per-step schedule."""
    assert_close(fit_trainer(case, callback=None), fit_reference(case, steps=None))


# ---------------------------------------------------------------------------------------------- the callback
@pytest.mark.parametrize("case", PER_OPTIMIZER + SCHEDULED + ACCUMULATED + FORCED_TRAJECTORY + MORE_STATE_RULES)
def test_callback_matches_reference(case: Case) -> None:
    got = fit_trainer(case, XGradCallback(steps=case.steps, rule=case.rule))
    expected = fit_reference(case, steps=case.steps)
    assert_close(got, expected)
    assert_far(fit_reference(case, steps=None), expected, "baseline vs XGrad")


def test_amsgrad_case_has_a_running_max() -> None:
    """In the ``amsgrad_b2_0.9`` case max_exp_avg_sq and exp_avg_sq really differ, so dW must read the right one."""
    net = make_net()
    optimizer = FACTORIES["amsgrad_b2_0.9"](net.parameters())
    xgrad_reference(net, optimizer, Case("amsgrad_b2_0.9").batches(), mse, steps=1, epochs=2)
    state = optimizer.state[next(net.parameters())]
    assert (state["max_exp_avg_sq"] > 2 * state["exp_avg_sq"]).any()


def test_steps_matter() -> None:
    """s=1 and s=2 end far apart, so the per-steps cases test the factor s, not only that a prediction happens."""
    assert_far(fit_reference(Case("adam", steps=2), 2), fit_reference(Case("adam", steps=1), 1), "s=2 vs s=1")


def test_forced_trajectory_differs_from_state_rule_on_adamw() -> None:
    """AdamW's decoupled decay is in the applied update (trajectory) but not in the state rule's dW."""
    trajectory = Case("adamw_decay0.5", rule="trajectory")
    state = Case("adamw_decay0.5", rule="auto")
    assert_far(fit_reference(trajectory, 1), fit_reference(state, 1), "AdamW trajectory vs state rule")


def test_forced_trajectory_differs_from_state_rule_on_radam() -> None:
    """RAdam's decoupled decay, like AdamW's, is in the applied update but not in the state rule's dW."""
    trajectory = Case("radam_decoupled0.5", rule="trajectory")
    state = Case("radam_decoupled0.5", rule="auto")
    assert_far(fit_reference(trajectory, 1), fit_reference(state, 1), "RAdam trajectory vs state rule")
