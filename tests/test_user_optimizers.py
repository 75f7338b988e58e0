"""Optimizers built the way third parties build them, each against the plain-PyTorch XGrad loop of ``reference.py``.

- a Lookahead written as timm writes it: a ``torch.optim.Optimizer`` subclass that never calls
  ``Optimizer.__init__`` (no hook registries), wraps a base optimizer, shares its ``param_groups`` and delegates its
  step to it;
- pytorch-optimizer's own ``Lookahead``, which makes its step-hook registries by hand and no others;
- a wrapper that shares both ``param_groups`` and ``state`` with its inner optimizer, with a state rule registered
  for its class (the prediction must read the state the inner optimizer really writes);
- a hand-rolled ``Optimizer`` subclass whose ``state`` is a custom mapping, not a ``defaultdict``.

Each trains with XGradCallback exactly as the reference trains it, and the user's objects are left as they were
(the ``state`` mapping is the same object, its type unchanged).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_xgrad import CPropCallback, XGradCallback, register_rule
from lightning_xgrad.rules import AdamRule, SGDRule

from .agreement import mse
from .reference import xgrad_reference
from .toolkit import TinyModule, XGradMetricsRecorder, batches, flat, loader, make_data, make_net, trainer

X, Y = make_data(80)
DATA = batches(X, Y, 8)


def _fit(factory: Any, callbacks: list[Any] | None = None, epochs: int = 2, **kwargs: Any) -> TinyModule:
    module = TinyModule(factory)
    trainer(callbacks=[XGradCallback(steps=2)] if callbacks is None else callbacks, max_epochs=epochs, **kwargs).fit(
        module, loader(X, Y)
    )
    return module


def _reference(factory: Any, steps: int | None, epochs: int = 2) -> Tensor:
    net = make_net()
    xgrad_reference(net, factory(net.parameters()), DATA, mse, steps=steps, epochs=epochs)
    return flat(net)


def _assert_matches_the_reference(module: TinyModule, factory: Any, steps: int = 2) -> None:
    expected = _reference(factory, steps)
    torch.testing.assert_close(flat(module), expected, rtol=1e-5, atol=1e-6)
    assert (_reference(factory, None) - expected).abs().max() > 1e-3  # the prediction changed the run


# ---------------------------------------------------------------- timm's Lookahead


class TimmStyleLookahead(torch.optim.Optimizer):
    """timm's ``Lookahead`` (timm/optim/lookahead.py), as written there: no ``Optimizer.__init__``, the base
    optimizer's ``param_groups`` shared, its own ``state`` for the slow weights, its own ``state_dict``.

    One addition: ``zero_grad`` delegates to the base optimizer. timm's class inherits ``Optimizer.zero_grad``, which
    on torch 2.x wraps the class's ``step`` in torch's hook runner when the instance lacks the profiling name
    ``Optimizer.__init__`` sets; the hook registries are missing too, so torch itself fails the next step with
    ``AttributeError: ... '_optimizer_step_pre_hooks'``, with or without XGrad (checked with torch 2.13 and Lightning
    2.6). The copy here trains, so that the comparison is about XGrad."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, alpha: float = 0.5, k: int = 3) -> None:
        defaults = {"lookahead_alpha": alpha, "lookahead_k": k, "lookahead_step": 0}
        self._base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.defaults = base_optimizer.defaults
        self.defaults.update(defaults)
        self.state = defaultdict(dict)
        for name, default in defaults.items():
            for group in self.param_groups:
                group.setdefault(name, default)

    @torch.no_grad()
    def update_slow(self, group: dict[str, Any]) -> None:
        for fast_p in group["params"]:
            if fast_p.grad is None:
                continue
            param_state = self.state[fast_p]
            if "slow_buffer" not in param_state:
                param_state["slow_buffer"] = fast_p.detach().clone()
            slow = param_state["slow_buffer"]
            slow.add_(fast_p - slow, alpha=group["lookahead_alpha"])
            fast_p.copy_(slow)

    def step(self, closure: Any = None) -> Any:
        loss = self._base_optimizer.step(closure)
        for group in self.param_groups:
            group["lookahead_step"] += 1
            if group["lookahead_step"] % group["lookahead_k"] == 0:
                self.update_slow(group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._base_optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self._base_optimizer.state_dict(), "slow": copy.deepcopy(dict(self.state))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._base_optimizer.load_state_dict(state_dict["base"])


def timm_lookahead(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return TimmStyleLookahead(torch.optim.AdamW(params, lr=0.01, weight_decay=0.01))


def test_a_lookahead_written_like_timms_trains_like_the_reference() -> None:
    """It has no hook registries of its own (predicting used to die on them); the trajectory rule extrapolates the
    update it really applies, slow-weight syncs included."""
    module = _fit(timm_lookahead)
    assert not hasattr(module.trainer.optimizers[0], "_optimizer_step_pre_hooks")  # still as built
    _assert_matches_the_reference(module, timm_lookahead)


class RawLookaheadSteps(TinyModule):
    """Manual optimization stepping the raw optimizer (no LightningOptimizer): only the step guard restores first,
    and it runs through the base optimizer's hooks."""

    def __init__(self, raw: bool) -> None:
        super().__init__(timm_lookahead)
        self.automatic_optimization = False
        self.raw = raw

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers(use_pl_optimizer=not self.raw)
        optimizer.zero_grad()
        self.manual_backward(mse(self.net, batch))
        optimizer.step()


def test_raw_steps_of_a_hookless_wrapper_are_guarded_through_the_optimizer_it_wraps() -> None:
    raw, lightning = RawLookaheadSteps(raw=True), RawLookaheadSteps(raw=False)
    for module in (raw, lightning):
        trainer(callbacks=[XGradCallback(steps=2)], max_epochs=2).fit(module, loader(X, Y))
    assert torch.equal(flat(raw), flat(lightning))
    _assert_matches_the_reference(raw, timm_lookahead)


# ---------------------------------------------------------------- pytorch-optimizer's Lookahead


def pytorch_optimizer_lookahead(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    return pytorch_optimizer.Lookahead(torch.optim.AdamW(params, lr=0.01), k=3, alpha=0.5)


def test_pytorch_optimizers_lookahead_trains_like_the_reference() -> None:
    """It makes its step-hook registries by hand but no load_state_dict hook registry."""
    module = _fit(pytorch_optimizer_lookahead)
    assert not hasattr(module.trainer.optimizers[0], "_optimizer_load_state_dict_post_hooks")
    _assert_matches_the_reference(module, pytorch_optimizer_lookahead)


# ---------------------------------------------------------------- a wrapper sharing param_groups and state


class SharingWrapper(torch.optim.Optimizer):
    """Wraps AdamW without ``Optimizer.__init__``, sharing its ``param_groups`` and its ``state`` (the same
    objects) and delegating its step: the update is AdamW's, so AdamW's state rule is registered for it."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.defaults = inner.defaults
        self.param_groups = inner.param_groups
        self.state = inner.state

    def step(self, closure: Any = None) -> Any:
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self.param_groups, self.state = self.inner.param_groups, self.inner.state


def adamw(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)


def sharing_wrapper(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return SharingWrapper(adamw(params))


def test_a_wrapper_sharing_its_state_is_predicted_from_the_state_its_inner_optimizer_writes() -> None:
    """The prediction reads AdamW's moments through the wrapper's ``state`` (the state rule, not the trajectory):
    training equals XGrad with AdamW itself, and the wrapper still shares the inner optimizer's objects after fit."""
    register_rule(SharingWrapper, AdamRule())  # the class is this module's own: registering it touches no other test
    module = _fit(sharing_wrapper)
    wrapper = module.trainer.optimizers[0]
    assert wrapper.state is wrapper.inner.state and type(wrapper.state) is defaultdict
    assert wrapper.param_groups is wrapper.inner.param_groups
    _assert_matches_the_reference(module, adamw)


def test_a_torch_optimizers_state_mapping_is_left_as_it_was() -> None:
    module = _fit(adamw)
    state = module.trainer.optimizers[0].state
    assert type(state) is defaultdict and len(state) == 4


# ---------------------------------------------------------------- an Optimizer with a custom state mapping


class ParameterState(MutableMapping):
    """Per-parameter state kept by ``id`` in a plain dict (some libraries key by id to allow non-hashable keys)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Tensor, dict[str, Any]]] = {}

    def __getitem__(self, p: Tensor) -> dict[str, Any]:
        return self._entries[id(p)][1]

    def __setitem__(self, p: Tensor, value: dict[str, Any]) -> None:
        self._entries[id(p)] = (p, value)

    def __delitem__(self, p: Tensor) -> None:
        del self._entries[id(p)]

    def __iter__(self) -> Iterator[Tensor]:
        return (p for p, _ in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class MappingStateSGD(torch.optim.Optimizer):
    """Heavy-ball SGD written by hand (torch's SGD update with momentum, dampening 0, no weight decay) whose ``state``
    is a :class:`ParameterState`."""

    def __init__(self, params: Any, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": 0.0, "nesterov": False})
        self.state = ParameterState()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                entry = self.state.get(p)
                if entry is None:
                    self.state[p] = entry = {}
                if "momentum_buffer" not in entry:
                    entry["momentum_buffer"] = p.grad.clone()
                else:
                    entry["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                p.add_(entry["momentum_buffer"], alpha=-group["lr"])
        return loss


class ResetAt(Callback):
    """Resets the first layer's optimizer state (``state[p] = {}`` is not a change of the mapping's identity) at the
    start of step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            for p in pl_module.net[0].parameters():
                trainer.optimizers[0].state[p] = {}


def _reset_first_layer(optimizer: torch.optim.Optimizer, net: nn.Module, t: int, at: int) -> None:
    if t == at:
        for p in net[0].parameters():
            optimizer.state[p] = {}


def test_an_optimizer_with_a_custom_state_mapping_is_predicted_from_it_and_a_reset_is_noticed() -> None:
    """The momentum rule reads the buffers through the custom mapping; a reset entry is never read stale (the
    reference restarts from a torch SGD with the same reset at the same step)."""
    register_rule(MappingStateSGD, SGDRule())  # the class is this module's own: registering it touches no other test
    module = _fit(MappingStateSGD, [ResetAt(6), XGradCallback(steps=2)], epochs=1)
    assert type(module.trainer.optimizers[0].state) is ParameterState

    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    xgrad_reference(
        net, optimizer, DATA, mse, steps=2, on_window_start=lambda t: _reset_first_layer(optimizer, net, t, 6)
    )
    torch.testing.assert_close(flat(module), flat(net), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- an optimizer with no step hooks anywhere


class HooklessModule(TinyModule):
    """``tests/test_guards.py``'s HooklessSGD (no ``Optimizer.__init__``, wraps nothing); with ``raw_steps`` in
    manual optimization through the raw optimizer, stepping before anything restores."""

    def __init__(self, raw_steps: bool = False) -> None:
        super().__init__(hookless_sgd)
        self.automatic_optimization = not raw_steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer.zero_grad()
        self.manual_backward(mse(self.net, batch))
        optimizer.step()
        return None


def hookless_sgd(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    from .test_guards import HooklessSGD

    return HooklessSGD(params, lr=0.05)


def test_an_optimizer_with_no_step_hooks_anywhere_trains_exactly_under_lightning() -> None:
    """Lightning restores in on_before_optimizer_step, inside the step's closure: no hook of the optimizer needed."""
    module = TinyModule(hookless_sgd)
    trainer(callbacks=[XGradCallback(steps=2)], max_epochs=2).fit(module, loader(X, Y))
    _assert_matches_the_reference(module, hookless_sgd)


def test_manual_optimization_with_an_optimizer_with_no_step_hooks_anywhere_is_warned_about() -> None:
    """Its raw steps cannot be seen, so they can neither restore first nor be recorded by the trajectory rule."""
    with pytest.warns(UserWarning) as records:
        trainer(callbacks=[XGradCallback(steps=2)], max_epochs=1).fit(HooklessModule(raw_steps=True), loader(X, Y))
    warned = [str(r.message) for r in records if "runs no step hooks" in str(r.message)]
    assert len(warned) == 1
    assert warned[0].startswith("XGradCallback: optimizer 0 (HooklessSGD) runs no step hooks")
    assert "step it through the LightningOptimizer that `self.optimizers()` returns" in warned[0]


def test_the_metrics_of_an_optimizer_with_no_step_hooks_anywhere_are_warned_about() -> None:
    """Its update cannot be seen after the step, so the cosine and the error cannot be measured; the shift can."""
    recorder = XGradMetricsRecorder()
    with pytest.warns(UserWarning) as records:
        trainer(callbacks=[XGradCallback(steps=2, log_every_n_steps=1), recorder], max_epochs=1).fit(
            TinyModule(hookless_sgd), loader(X, Y)
        )
    warned = [str(r.message) for r in records if "runs no step hooks" in str(r.message)]
    assert len(warned) == 1 and warned[0].endswith(
        "so xgrad/prediction_cosine and xgrad/prediction_error cannot be measured for it."
    )
    assert all(v != v for v in recorder.logged["xgrad/prediction_cosine"])  # NaN: never logged
    assert any(v > 0 for v in recorder.logged["xgrad/relative_shift"])


def test_cprop_refuses_an_optimizer_with_no_step_hooks_anywhere() -> None:
    with pytest.raises(MisconfigurationException, match="CPropCallback cannot scale the updates of HooklessSGD"):
        trainer(callbacks=[CPropCallback()], max_epochs=1).fit(TinyModule(hookless_sgd), loader(X, Y))


def test_cprop_scales_a_hookless_wrapper_through_the_optimizer_it_wraps() -> None:
    """timm's Lookahead under CPropCallback: the inner AdamW's hooks see each update of the shared parameters."""
    module = _fit(timm_lookahead, [CPropCallback()], epochs=1)
    unscaled = _fit(timm_lookahead, [], epochs=1)
    assert (flat(module) - flat(unscaled)).abs().max() > 1e-4


class StatelessSGD(torch.optim.Optimizer):
    """Plain SGD without ``Optimizer.__init__`` whose ``state`` is not a mapping (a list, as a port from another
    framework might keep it)."""

    def __init__(self, params: Any, lr: float = 0.05) -> None:
        self.param_groups = [{"params": list(params), "lr": lr}]
        self.defaults = {"lr": lr}
        self.state: list[Any] = []

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for p in self.param_groups[0]["params"]:
            p.add_(p.grad, alpha=-self.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None


def test_an_optimizer_whose_state_is_no_mapping_gets_the_trajectory_rule_planned_once(monkeypatch: Any) -> None:
    from lightning_xgrad import OptimizerPredictor

    builds: list[int] = []
    original = OptimizerPredictor._build_plan
    monkeypatch.setattr(OptimizerPredictor, "_build_plan", lambda self, *a: (builds.append(1), original(self, *a)))
    net = make_net()
    optimizer = StatelessSGD(net.parameters())
    predictor = OptimizerPredictor(optimizer, steps=2)
    for batch in DATA:
        predictor.predict()
        mse(net, batch).backward()
        predictor.restore()
        optimizer.step()
        optimizer.zero_grad()
    assert len(builds) == 1 and predictor.describe() == "trajectory"
    reference = make_net()
    xgrad_reference(reference, torch.optim.SGD(reference.parameters(), lr=0.05), DATA, mse, steps=2)
    torch.testing.assert_close(flat(net), flat(reference), rtol=1e-5, atol=1e-6)
