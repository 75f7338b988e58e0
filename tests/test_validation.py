"""Bad arguments are refused alike everywhere: ``"<Owner>: `name` must be <what is allowed>, got <value!r>"``, a
TypeError for a wrong type and a ValueError for a wrong value, from the one module
``lightning_xgrad._internal.validation``.

``OptimizerPredictor`` refuses what ``XGradCallback`` refuses, with the same words, and every optimizer of the package
refuses an infinite or nan learning rate (torch.optim accepts inf; it can only make the weights inf or nan).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import nn

from lightning_xgrad import CPropCallback, OptimizerPredictor, XGradCallback
from lightning_xgrad._internal.validation import check_choice, check_flag, check_int, check_real, check_real_pair
from lightning_xgrad.cprop import CPropAdam, CPropSGD
from lightning_xgrad.heavy_ball import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD
from lightning_xgrad.optim import AdaM3

from .toolkit import make_net

OPTIMIZER_CLASSES = [AdaM3, CPropSGD, CPropAdam, AdaptiveHeavyBallSGD, AdaptiveHeavyBallAdam]


def adam() -> torch.optim.Optimizer:
    return torch.optim.Adam(make_net().parameters(), lr=0.01)


# ------------------------------------------------------------------------------------------ OptimizerPredictor
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"steps": 0}, ValueError, "`steps` must be an integer >= 1, got 0"),
        ({"steps": -1}, ValueError, "`steps` must be an integer >= 1, got -1"),
        ({"steps": 1.5}, TypeError, "`steps` must be an integer >= 1, got 1.5"),
        ({"steps": True}, TypeError, "`steps` must be an integer >= 1, got True"),
        ({"steps": "2"}, TypeError, "`steps` must be an integer >= 1, got '2'"),
        ({"steps": None}, TypeError, "`steps` must be an integer >= 1, got None"),
        ({"rule": "foo"}, ValueError, "`rule` must be one of ('auto', 'trajectory'), got 'foo'"),
        ({"rule": None}, TypeError, "`rule` must be one of ('auto', 'trajectory'), got None"),
        ({"compile": "yes"}, TypeError, "`compile` must be True or False, got 'yes'"),
        ({"compile": 1}, TypeError, "`compile` must be True or False, got 1"),
        ({"compile_min_bytes": -1}, ValueError, "`compile_min_bytes` must be an integer >= 0, got -1"),
        ({"compile_min_bytes": "4MiB"}, TypeError, "`compile_min_bytes` must be an integer >= 0, got '4MiB'"),
        ({"compile_min_bytes": None}, TypeError, "`compile_min_bytes` must be an integer >= 0, got None"),
        ({"snapshot": {}}, TypeError, "`snapshot` must be a ParameterSnapshot or None, got {}"),
        (
            {"direction_scales": [0.5]},
            TypeError,
            "`direction_scales` must be a mapping from parameters to scales, or None, got [0.5]",
        ),
    ],
)
def test_predictor_refuses_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        OptimizerPredictor(adam(), **kwargs)
    assert str(info.value) == f"OptimizerPredictor: {message}"


def test_predictor_refuses_what_is_not_an_optimizer() -> None:
    with pytest.raises(TypeError) as info:
        OptimizerPredictor(nn.Linear(2, 2))  # type: ignore[arg-type]
    assert str(info.value) == (
        "OptimizerPredictor: `optimizer` must be a torch.optim.Optimizer, got "
        "Linear(in_features=2, out_features=2, bias=True)"
    )


def test_predictor_refuses_lbfgs() -> None:
    with pytest.raises(ValueError) as info:
        OptimizerPredictor(torch.optim.LBFGS(make_net().parameters()))
    assert re.fullmatch(
        r"OptimizerPredictor: `optimizer` must be an optimizer whose step evaluates the closure at most once .*LBFGS"
        r".*, got LBFGS\(\.\.\.\)",
        str(info.value),
    ), str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -1},
        {"steps": 1.5},
        {"steps": True},
        {"rule": "foo"},
        {"compile": "yes"},
        {"compile_min_bytes": -1},
        {"compile_min_bytes": True},
    ],
    ids=str,
)
def test_callback_and_predictor_refuse_alike(kwargs: dict[str, Any]) -> None:
    """One shared check: same exception type, same words, only the owner differs."""
    with pytest.raises(Exception) as from_callback:
        XGradCallback(**kwargs)
    with pytest.raises(Exception) as from_predictor:
        OptimizerPredictor(adam(), **kwargs)
    assert type(from_callback.value) is type(from_predictor.value)
    assert type(from_callback.value) in (TypeError, ValueError)
    callback_words = str(from_callback.value).removeprefix("XGradCallback: ")
    assert callback_words == str(from_predictor.value).removeprefix("OptimizerPredictor: ")


def test_predictor_accepts_good_arguments() -> None:
    """The checks let through what is right: numpy integers, both rules, both flags, a shared snapshot."""
    import numpy as np

    from lightning_xgrad.prediction.snapshot import ParameterSnapshot

    predictor = OptimizerPredictor(adam(), steps=np.int64(2), rule="trajectory", compile=False)
    assert predictor.steps == 2
    OptimizerPredictor(adam(), steps=3, rule="auto", snapshot=ParameterSnapshot(), compile=True)


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, TypeError), ("32MiB", TypeError), (True, TypeError)], ids=repr
)
def test_chunk_bytes_is_refused_alike_by_the_predictor_and_both_callbacks(value: Any, error: type) -> None:
    """``chunk_bytes``: an integer >= 0 (0: chunks of the largest tensor) or None (the 32 MiB default)."""
    for owner, build in (
        ("OptimizerPredictor", lambda: OptimizerPredictor(adam(), chunk_bytes=value)),
        ("XGradCallback", lambda: XGradCallback(chunk_bytes=value)),
        ("CPropCallback", lambda: CPropCallback(chunk_bytes=value)),
    ):
        with pytest.raises(error) as info:
            build()
        assert str(info.value) == f"{owner}: `chunk_bytes` must be an integer >= 0 or None, got {value!r}"
    for good in (0, 4096, None):
        XGradCallback(chunk_bytes=good)
        CPropCallback(chunk_bytes=good)
        OptimizerPredictor(adam(), chunk_bytes=good)


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("32MiB", TypeError), (True, TypeError)],
    ids=repr,
)
def test_metrics_max_bytes_is_refused_when_not_a_positive_integer_or_none(value: Any, error: type) -> None:
    """``metrics_max_bytes``: a byte budget (an integer >= 1) or None (always exact)."""
    with pytest.raises(error) as info:
        XGradCallback(metrics_max_bytes=value)
    assert str(info.value) == f"XGradCallback: `metrics_max_bytes` must be an integer >= 1 or None, got {value!r}"
    for good in (1, 2**20, None):
        assert XGradCallback(metrics_max_bytes=good).metrics_max_bytes == good
    assert XGradCallback().metrics_max_bytes == 32 * 2**20


# ----------------------------------------------------------------------------------- learning rates, everywhere
@pytest.mark.parametrize("lr", [math.inf, -math.inf, math.nan, torch.tensor(math.inf)], ids=repr)
@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda cls: cls.__name__)
def test_every_optimizer_refuses_a_non_finite_lr(cls: type, lr: Any) -> None:
    with pytest.raises(ValueError) as info:
        cls(make_net().parameters(), lr=lr)
    assert str(info.value) == f"{cls.__name__}: `lr` must be a finite number >= 0 (or a 1-element tensor), got {lr!r}"


@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda cls: cls.__name__)
def test_every_optimizer_takes_lr_as_torch_does(cls: type) -> None:
    """0, a float and a 1-element tensor are fine (torch.optim's rule); a negative lr and a string are not."""
    for lr in (0.0, 0.01, torch.tensor(0.01)):
        assert cls(make_net().parameters(), lr=lr).param_groups[0]["lr"] is lr
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: `lr` must be .*, got -0\.1$"):
        cls(make_net().parameters(), lr=-0.1)
    with pytest.raises(TypeError, match=rf"^{cls.__name__}: `lr` must be .*, got '0\.1'$"):
        cls(make_net().parameters(), lr="0.1")


@pytest.mark.parametrize(
    ("owner", "build"),
    [
        ("CPropCallback", lambda: CPropCallback(c=math.inf)),
        ("CPropSGD", lambda: CPropSGD(make_net().parameters(), cprop_c=math.inf)),
        ("AdaM3", lambda: AdaM3(make_net().parameters(), weight_decay=math.inf)),
        ("AdaptiveHeavyBallAdam", lambda: AdaptiveHeavyBallAdam(make_net().parameters(), eps=math.inf)),
    ],
)
def test_every_real_argument_must_be_finite(owner: str, build: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{owner}: `\w+` must be a finite number >= 0, got inf$"):
        build()


# ----------------------------------------------------------------------------------------- the checks themselves
def test_check_real_bounds_open_and_closed() -> None:
    assert check_real("O", "x", 0.0, low=0.0) == 0.0
    assert check_real("O", "x", 1.0, low=0.0, high=1.0, low_open=True) == 1.0
    with pytest.raises(ValueError, match=r"^O: `x` must be a number in \(0, 1\], got 0\.0$"):
        check_real("O", "x", 0.0, low=0.0, high=1.0, low_open=True)
    with pytest.raises(ValueError, match=r"^O: `x` must be a number in \[0, 1\), got 1$"):
        check_real("O", "x", 1, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"^O: `x` must be a finite number < 2, got 2$"):
        check_real("O", "x", 2, high=2.0, high_open=True)
    with pytest.raises(TypeError, match=r"^O: `x` must be a finite number, got \(1\+0j\)$"):
        check_real("O", "x", 1 + 0j)
    with pytest.raises(TypeError, match=r"^O: `x` must be a finite number, got tensor\(1\.\)$"):
        check_real("O", "x", torch.tensor(1.0))  # tensors only where allowed (lr)
    with pytest.raises(TypeError, match=r"got tensor\(1\.\+0\.j\)$"):
        check_real("O", "x", torch.tensor(1 + 0j), allow_tensor=True)


def test_check_int_flag_choice_pair() -> None:
    assert check_int("O", "n", None, minimum=1, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^O: `n` must be an integer, got 1\.0$"):
        check_int("O", "n", 1.0)
    assert check_flag("O", "f", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^O: `f` must be True or False, got None$"):
        check_flag("O", "f", None)
    with pytest.raises(ValueError, match=r"^O: `c` must be one of \('a', 'b'\), got 'c'$"):
        check_choice("O", "c", "c", ("a", "b"))
    assert check_real_pair("O", "betas", [0, 0.5], low=0.0, high=1.0, high_open=True) == (0.0, 0.5)
    with pytest.raises(
        ValueError, match=r"^O: `betas` must be a pair of numbers in \[0, 1\), got \(0\.1, 0\.2, 0\.3\)$"
    ):
        check_real_pair("O", "betas", (0.1, 0.2, 0.3), low=0.0, high=1.0, high_open=True)
