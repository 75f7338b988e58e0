"""``XGradCallback.real_weights()``: code inside ``training_step`` reads and edits the real weights, not W_hat.

The two recipes of the README ("Reading or editing weights inside a step"), each against the plain-PyTorch reference
loop where the same read or edit happens on the real weights before the step's prediction: a BYOL/DINO-style EMA
teacher that follows the student, and a WGAN critic whose weights are clamped at the top of ``training_step``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_xgrad import PredictedWeightsEditedWarning, XGradCallback

from .agreement import ATOL, RTOL, mse
from .reference import xgrad_reference
from .toolkit import batches, flat, loader, make_data, make_net, trainer

CLIP = 0.05


# ---------------------------------------------------------------- the README's recipes


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1.0 - momentum)


def distillation_loss(student: nn.Module, teacher: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    prediction = student(x)
    return nn.functional.mse_loss(prediction, y) + nn.functional.mse_loss(prediction, teacher(x).detach())


class StudentTeacher(pl.LightningModule):
    """BYOL/DINO-style: a teacher that is an EMA of the student, updated at the top of every training_step."""

    def __init__(self, optimizer: str = "adamw", inside_real_weights: bool = True, momentum: float = 0.9) -> None:
        super().__init__()
        self.student = make_net()
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.optimizer_name, self.inside_real_weights, self.momentum = optimizer, inside_real_weights, momentum

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.inside_real_weights:  # the README's recipe, word for word
            with XGradCallback.real_weights(self), torch.no_grad():  # not W_hat: the teacher follows the real student
                torch._foreach_lerp_(
                    list(self.teacher.parameters()), list(self.student.parameters()), 1 - self.momentum
                )
        else:
            update_teacher(self.student, self.teacher, self.momentum)
        return distillation_loss(self.student, self.teacher, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.student.parameters())


class ClampedCritic(pl.LightningModule):
    """WGAN's weight clipping: the critic's weights are clamped at the top of every training_step."""

    def __init__(self, optimizer: str = "rmsprop", inside_real_weights: bool = True) -> None:
        super().__init__()
        self.critic = make_net()
        self.optimizer_name, self.inside_real_weights = optimizer, inside_real_weights

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.inside_real_weights:  # the README's recipe, word for word
            with XGradCallback.real_weights(self), torch.no_grad():  # clamped at W_hat, the clip would be undone
                for p in self.critic.parameters():
                    p.clamp_(-CLIP, CLIP)
        else:
            clamp_(self.critic)
        x, y = batch
        return nn.functional.mse_loss(self.critic(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.critic.parameters())


@torch.no_grad()
def clamp_(net: nn.Module) -> None:
    for p in net.parameters():
        p.clamp_(-CLIP, CLIP)


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "rmsprop":  # WGAN's optimizer; no momentum: the trajectory rule
        return torch.optim.RMSprop(params, lr=5e-3)
    raise ValueError(name)


def _fit(module: pl.LightningModule, callbacks: list[Callback], epochs: int = 2, **kwargs: Any) -> None:
    trainer(callbacks=callbacks, max_epochs=epochs, **kwargs).fit(module, loader(*make_data(80), batch_size=8))


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize(("optimizer", "steps"), [("adamw", 2), ("sgd_momentum", 2), ("rmsprop", 1)])
def test_an_ema_teacher_follows_the_real_student(optimizer: str, steps: int) -> None:
    module = StudentTeacher(optimizer)
    _fit(module, [XGradCallback(steps=steps)])

    student = make_net()
    teacher = copy.deepcopy(student).requires_grad_(False)
    xgrad_reference(
        student,
        make_optimizer(optimizer, student.parameters()),
        batches(*make_data(80), 8),
        lambda net, batch: distillation_loss(net, teacher, batch),
        steps=steps,
        epochs=2,
        on_window_start=lambda t: update_teacher(student, teacher, 0.9),
    )
    torch.testing.assert_close(flat(module.teacher), flat(teacher), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(flat(module.student), flat(student), rtol=RTOL, atol=ATOL)

    # the check can fail: a teacher updated outside real_weights() averages W_hat
    outside = StudentTeacher(optimizer, inside_real_weights=False)
    _fit(outside, [XGradCallback(steps=steps)])
    assert (flat(outside.teacher) - flat(teacher)).abs().max() > 100 * ATOL


@pytest.mark.parametrize(("optimizer", "steps"), [("rmsprop", 1), ("sgd_momentum", 2), ("adamw", 2)])
def test_a_weight_clamp_lands_on_the_real_weights_and_is_kept(optimizer: str, steps: int) -> None:
    """With the state rules the prediction is recomputed from the clamped weights exactly as if the clamp had been
    made before the step; the trajectory rule is exact here too (steps=1 at a constant lr, see the README)."""
    module = ClampedCritic(optimizer)
    real = RealAtUpdate()
    _fit(module, [XGradCallback(steps=steps), real])

    critic = make_net()
    xgrad_reference(
        critic,
        make_optimizer(optimizer, critic.parameters()),
        batches(*make_data(80), 8),
        mse,
        steps=steps,
        epochs=2,
        on_window_start=lambda t: clamp_(critic),
    )
    torch.testing.assert_close(flat(module.critic), flat(critic), rtol=RTOL, atol=ATOL)
    # every update started from clamped real weights
    assert all(w.abs().max() <= CLIP for w in real.before_update)

    outside = ClampedCritic(optimizer, inside_real_weights=False)
    real_outside = RealAtUpdate()
    with pytest.warns(PredictedWeightsEditedWarning, match="`critic.0.weight`, `critic.0.bias`, `critic.2.weight`"):
        _fit(outside, [XGradCallback(steps=steps), real_outside])  # ... and said so
    assert max(w.abs().max() for w in real_outside.before_update) > 2 * CLIP  # the clamp was discarded


class RealAtUpdate(Callback):
    """The real weights each update starts from (the callback restored them in on_before_optimizer_step)."""

    def __init__(self) -> None:
        self.before_update: list[Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.before_update.append(flat(pl_module))


# ---------------------------------------------------------------- what the module sees


class Probe(pl.LightningModule):
    """Records the weights inside and right after real_weights(); optionally nests it and calls it in validation."""

    def __init__(self, owner: str = "module") -> None:
        super().__init__()
        self.net = make_net()
        self.owner = owner
        self.inside: list[Tensor] = []
        self.nested: list[Tensor] = []
        self.after: list[Tensor] = []
        self.in_validation: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        owner = self if self.owner == "module" else self.trainer
        with XGradCallback.real_weights(owner):
            self.inside.append(flat(self))
            with XGradCallback.real_weights(owner):
                self.nested.append(flat(self))
        self.after.append(flat(self))
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with XGradCallback.real_weights(self):
            self.in_validation.append(flat(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Weights(Callback):
    """Before XGradCallback: the real weights at batch start; after it: the prediction the forward pass sees."""

    def __init__(self) -> None:
        self.at_batch_start: list[Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.at_batch_start.append(flat(pl_module))


@pytest.mark.parametrize("owner", ["module", "trainer"])
def test_inside_the_module_holds_the_real_weights_bit_exactly_and_the_prediction_comes_back(owner: str) -> None:
    real, seen = Weights(), Weights()
    module = Probe(owner)
    x, y = make_data(80)
    trainer(
        callbacks=[real, XGradCallback(), seen],
        max_epochs=1,
        accumulate_grad_batches=2,
        val_check_interval=3,
        limit_val_batches=1,
    ).fit(module, loader(x, y), loader(*make_data(16, seed=1), batch_size=16))
    assert len(module.inside) == 10
    for i in range(10):
        window_start = i - i % 2
        assert torch.equal(module.inside[i], real.at_batch_start[window_start])
        assert torch.equal(module.nested[i], real.at_batch_start[window_start])  # nesting changes nothing
        # no edit: the recomputed prediction is the one the window started with, bit for bit (Adam: a state rule)
        assert torch.equal(module.after[i], seen.at_batch_start[i])
    assert not torch.equal(module.after[4], module.inside[4])  # a prediction was in place
    # validation after batch 2 runs mid-window, at the real weights, and real_weights() leaves them alone
    assert torch.equal(module.in_validation[0], real.at_batch_start[2])


def test_without_the_callback_or_a_trainer_it_does_nothing() -> None:
    module = Probe()
    _fit(module, [], epochs=1)  # no XGradCallback: a no-op
    assert all(torch.equal(a, b) for a, b in zip(module.inside, module.after, strict=True))
    detached = Probe()
    with XGradCallback.real_weights(detached):  # not attached to a Trainer
        pass
    wrong = XGradCallback.real_weights(make_net())
    with pytest.raises(TypeError, match=r"`owner` must be a LightningModule or a Trainer, got Sequential"), wrong:
        pass


class ClampedGAN(pl.LightningModule):
    """Manual optimization with a generator and a critic, as WGAN trains: the critic is clamped at the top of each
    training_step, inside real_weights()."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))
        self.critic = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.critic_at_update: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt_g, opt_c = self.optimizers()
        with XGradCallback.real_weights(self):
            clamp_(self.critic)
        real, _ = batch
        fake = self.generator(torch.randn(len(real), 4, generator=torch.Generator().manual_seed(batch_idx)))
        opt_c.zero_grad()
        self.manual_backward(self.critic(fake.detach()).mean() - self.critic(real).mean())
        opt_c.step()
        self.critic_at_update.append(torch.cat([p.detach().reshape(-1) for p in self.critic.parameters()]))
        opt_g.zero_grad()
        self.manual_backward(-self.critic(fake).mean())
        opt_g.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.RMSprop(self.generator.parameters(), lr=5e-3), torch.optim.SGD(
            self.critic.parameters(), lr=0.05, momentum=0.9
        )


def test_a_clamped_wgan_critic_under_manual_optimization() -> None:
    """Each critic update starts from clamped weights: after it the weights are at most CLIP + one step away."""
    module = ClampedGAN()
    clamped_at_update = RealCriticAtUpdate()
    _fit(module, [XGradCallback(steps=2), clamped_at_update], epochs=2)
    assert len(clamped_at_update.values) == 20
    assert all(w.abs().max() <= CLIP for w in clamped_at_update.values)


class RealCriticAtUpdate(Callback):
    def __init__(self) -> None:
        self.values: list[Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if optimizer is trainer.optimizers[1]:
            self.values.append(torch.cat([p.detach().reshape(-1) for p in pl_module.critic.parameters()]))
