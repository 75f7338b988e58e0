"""XGradCallback inside code written by others: Lightning's own weight-averaging callbacks, Hugging Face GPT-2 with
tied embeddings, peft's LoRA adapters on it, schedule-free AdamW with its train()/eval() switching, and optimizers
whose group lr is not a number (transformers' Adafactor, and one written here).

Each is checked against an independent reference: the plain-PyTorch XGrad loop of ``tests/reference.py``, or, for
StochasticWeightAveraging's BatchNorm epoch, the statistics recomputed by hand at the averaged weights. Optimizers
built the way other libraries build them (no ``Optimizer.__init__``, shared ``param_groups``) are in
``test_user_optimizers.py``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import callbacks as lightning_callbacks
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from torch import Tensor, nn

from lightning_xgrad import XGradCallback

from .agreement import ATOL, RTOL, mse
from .reference import xgrad_reference
from .toolkit import TinyModule, batches, flat, loader, make_data, make_net, trainer

# ---------------------------------------------------------------- StochasticWeightAveraging


class BatchNormModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return mse(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class WeightsAtEpochStart(Callback):
    """Placed before XGradCallback: the weights at the first batch of every epoch (after SWA's own epoch-start)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.weights[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.net.named_parameters()}


def test_swa_batchnorm_epoch_recomputes_the_statistics_at_the_averaged_weights() -> None:
    """SWA ends fit with one more epoch that only recomputes BatchNorm statistics (backward skipped): no batch of it
    is followed by a gradient, so none may run at predicted weights."""
    x, y = make_data(64)
    weights = WeightsAtEpochStart()
    module = BatchNormModule()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    trainer(callbacks=[swa, weights, XGradCallback()], max_epochs=3).fit(module, loader(x, y))
    assert sorted(weights.weights) == [0, 1, 2, 3]  # epoch 3 is SWA's BatchNorm epoch

    reference = copy.deepcopy(module.net)
    reference.load_state_dict(weights.weights[3], strict=False)  # the averaged weights SWA put in for that epoch
    norm = reference[1]
    norm.reset_running_stats()
    norm.momentum = None  # a cumulative average over the epoch, as SWA does
    reference.train()
    with torch.no_grad():
        for batch in batches(x, y, 8):
            reference(batch[0])
    torch.testing.assert_close(module.net[1].running_mean, norm.running_mean, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(module.net[1].running_var, norm.running_var, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- EMAWeightAveraging


@pytest.mark.skipif(
    not hasattr(lightning_callbacks, "EMAWeightAveraging"),
    reason=f"Lightning {pl.__version__} has no EMAWeightAveraging",
)
def test_ema_weight_averaging_averages_the_real_weights() -> None:
    """Lightning's EMA callback updates after every optimizer step and swaps its average in for validation (here
    mid-window, with accumulation): at the end of fit the module holds the EMA of the real weights."""
    x, y = make_data(80)
    module = TinyModule()  # Adam
    ema = lightning_callbacks.EMAWeightAveraging(decay=0.8)
    trainer(
        callbacks=[XGradCallback(steps=2), ema],
        max_epochs=2,
        accumulate_grad_batches=2,
        val_check_interval=3,
        limit_val_batches=1,
    ).fit(module, loader(x, y), loader(*make_data(16, seed=1), batch_size=16))

    net = make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
    average: list[Tensor] = []

    def update_average() -> None:
        current = [p.detach().clone() for p in net.parameters()]
        if not average:
            average.extend(current)
        else:
            for a, c in zip(average, current, strict=True):
                a.copy_(0.8 * a + 0.2 * c)

    xgrad_reference(
        net,
        optimizer,
        batches(x, y, 8),
        mse,
        steps=2,
        accumulate=2,
        epochs=2,
        on_window_start=lambda t: update_average() if t > 0 else None,
    )
    update_average()
    torch.testing.assert_close(flat(module), torch.cat([a.reshape(-1) for a in average]), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- Hugging Face GPT-2, tied embeddings


def _gpt2(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=48,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def _tokens(n: int = 32, length: int = 12) -> Tensor:
    return torch.randint(0, 48, (n, length), generator=torch.Generator().manual_seed(0))


def _language_model_loss(model: nn.Module, batch: tuple[Tensor]) -> Tensor:
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


class LanguageModule(pl.LightningModule):
    """The causal language model ``build()`` returns, trained by the optimizer ``optimizer(model)`` makes."""

    def __init__(self, build: Any, optimizer: Any) -> None:
        super().__init__()
        self.model = build()
        self.make_optimizer = optimizer

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        return _language_model_loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.model)


def _gpt2_adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def test_gpt2_with_tied_embeddings_matches_the_reference() -> None:
    """In float64: the attention's key bias has a zero gradient in exact arithmetic (softmax ignores a shift shared by
    all keys), so in float32 it trains on rounding noise that AdamW normalises to steps of size lr, different in any
    two implementations; in float64 that noise stays far below eps."""
    module = LanguageModule(_gpt2, _gpt2_adamw)
    assert module.model.lm_head.weight is module.model.transformer.wte.weight  # tied: one parameter, predicted once
    dataset = torch.utils.data.TensorDataset(_tokens())
    trainer(callbacks=[XGradCallback()], max_epochs=2, precision="64-true").fit(
        module, torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False)
    )

    model = _gpt2().double()
    data = [(t,) for t in _tokens().split(8)]
    xgrad_reference(model, _gpt2_adamw(model), data, _language_model_loss, steps=1, epochs=2)
    torch.testing.assert_close(flat(module.model), flat(model), rtol=1e-10, atol=1e-12)

    baseline = _gpt2().double()
    xgrad_reference(baseline, _gpt2_adamw(baseline), data, _language_model_loss, steps=None, epochs=2)
    assert (flat(baseline) - flat(model)).abs().max() > 100 * ATOL


# ---------------------------------------------------------------- optimizers whose group lr is not a number


class RelativeStepSGD(torch.optim.Optimizer):
    """Sizes its own steps and keeps ``lr=None`` in its param groups, as relative-step optimizers do:
    ``p -= 0.1 / sqrt(k) * grad`` at its k-th step."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": None})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                p.add_(p.grad, alpha=-0.1 / state["step"] ** 0.5)
        return loss


def _adafactor(params: Any) -> torch.optim.Optimizer:
    transformers = pytest.importorskip("transformers")
    return transformers.optimization.Adafactor(params)  # its defaults: lr=None, relative_step=True


@pytest.mark.parametrize("factory", [RelativeStepSGD, _adafactor], ids=["relative_step_sgd", "adafactor"])
def test_an_optimizer_with_lr_none_is_extrapolated_without_rescaling(factory: Any) -> None:
    module = TinyModule(factory)
    trainer(callbacks=[XGradCallback(steps=2)], max_epochs=2).fit(module, loader(*make_data(80), batch_size=8))
    assert module.trainer.optimizers[0].param_groups[0]["lr"] is None

    net = make_net()
    xgrad_reference(net, factory(net.parameters()), batches(*make_data(80), 8), mse, steps=2, epochs=2)
    torch.testing.assert_close(flat(module), flat(net), rtol=RTOL, atol=ATOL)
    baseline = make_net()
    xgrad_reference(baseline, factory(baseline.parameters()), batches(*make_data(80), 8), mse, steps=None, epochs=2)
    assert (flat(baseline) - flat(net)).abs().max() > 100 * ATOL


# ---------------------------------------------------------------- schedule-free AdamW (the schedulefree package)


def _schedule_free(params: Any) -> torch.optim.Optimizer:
    schedulefree = pytest.importorskip("schedulefree")
    return schedulefree.AdamWScheduleFree(params, lr=0.02, warmup_steps=3, weight_decay=1e-3)


class ScheduleFreeModule(TinyModule):
    """Switches the optimizer as schedulefree's README says: ``train()`` before training, ``eval()`` before the
    weights are used for anything else (here at each epoch's end)."""

    def __init__(self) -> None:
        super().__init__(_schedule_free)

    def on_train_epoch_start(self) -> None:
        self.optimizers(use_pl_optimizer=False).train()

    def on_train_epoch_end(self) -> None:
        self.optimizers(use_pl_optimizer=False).eval()


def test_schedule_free_adamw_with_its_train_eval_switching_matches_the_reference() -> None:
    """Its parameters hold the gradient point y between train() and eval(); XGrad extrapolates y's trajectory (the
    trajectory rule) and eval() still moves the real weights to the average x."""
    x, y = make_data(80)
    module = ScheduleFreeModule()
    trainer(callbacks=[XGradCallback(steps=2)], max_epochs=3).fit(module, loader(x, y))

    def reference(steps: int | None) -> Tensor:
        net = make_net()
        optimizer = _schedule_free(net.parameters())
        per_epoch = len(batches(x, y, 8))
        xgrad_reference(
            net,
            optimizer,
            batches(x, y, 8),
            mse,
            steps=steps,
            epochs=3,
            on_window_start=lambda t: optimizer.train() if t % per_epoch == 0 else None,
            on_update=lambda t, *_: optimizer.eval() if t % per_epoch == 0 else None,
        )
        return flat(net)

    expected = reference(2)
    torch.testing.assert_close(flat(module), expected, rtol=RTOL, atol=ATOL)
    assert (reference(None) - expected).abs().max() > 100 * ATOL


# ---------------------------------------------------------------- peft LoRA adapters on GPT-2


def _lora_gpt2() -> nn.Module:
    peft = pytest.importorskip("peft")
    model = _gpt2()
    torch.manual_seed(1)  # the adapters' initialisation
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    return peft.get_peft_model(model, config)


def _adapter_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def test_peft_lora_adapters_are_predicted_and_the_frozen_model_left_alone() -> None:
    """Only the adapters are in the optimizer: they are predicted (against the reference), the frozen base weights
    never move, and nothing of the base model is an edit of W_hat. In float64, as for GPT-2 above: float32 rounding
    of the attention makes any two implementations differ by a few ulps of the adapters' steps."""
    module = LanguageModule(_lora_gpt2, _adapter_optimizer)
    dataset = torch.utils.data.TensorDataset(_tokens())
    fit = trainer(callbacks=[XGradCallback()], max_epochs=2, precision="64-true")
    frozen = {n: p.detach().double() for n, p in module.model.named_parameters() if not p.requires_grad}
    fit.fit(module, torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False))
    assert all(torch.equal(p, frozen[n]) for n, p in module.model.named_parameters() if not p.requires_grad)

    data = [(t,) for t in _tokens().split(8)]

    def reference(steps: int | None) -> Tensor:
        model = _lora_gpt2().double()
        xgrad_reference(model, _adapter_optimizer(model), data, _language_model_loss, steps=steps, epochs=2)
        return flat(model)

    expected = reference(1)
    torch.testing.assert_close(flat(module.model), expected, rtol=1e-10, atol=1e-12)
    assert (reference(None) - expected).abs().max() > 100 * ATOL
