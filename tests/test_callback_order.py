"""What other callbacks see, by their place in the callback list relative to XGradCallback, as docs/guarantees.md
("Who sees W_hat") and docs/troubleshooting.md ("Does the order of the callbacks matter?") state it: in
``on_train_batch_start`` the callbacks before it see the real weights and those after it W_hat; in
``on_before_optimizer_step`` the other way round; a callback that asks every ``RealWeightsRestorer`` first sees the
real weights wherever it stands; and training is the same in every order."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_xgrad import XGradCallback
from lightning_xgrad.protocols import RealWeightsRestorer

from .toolkit import TinyModule, flat, loader, make_data, trainer


class Probe(Callback):
    """Records, from the second batch on, whether the module holds the weights it held at the end of the last batch
    (the real weights: the optimizer's update is done there) in the two hooks where XGradCallback acts."""

    def __init__(self, ask_restorers: bool = False) -> None:
        self.ask_restorers = ask_restorers
        self.real: torch.Tensor | None = None
        self.seen: dict[str, list[bool]] = {"on_train_batch_start": [], "on_before_optimizer_step": []}

    def _record(self, hook: str, pl_module: pl.LightningModule) -> None:
        if self.real is not None:
            self.seen[hook].append(torch.equal(flat(pl_module), self.real))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._record("on_train_batch_start", pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.ask_restorers:  # the recipe of docs/guarantees.md
            for callback in trainer.callbacks:
                if isinstance(callback, RealWeightsRestorer):
                    callback.restore_real_weights(optimizer)
        self._record("on_before_optimizer_step", pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.real = flat(pl_module).clone()


def _fit(callbacks: list[Callback]) -> torch.Tensor:
    module = TinyModule()
    trainer(max_epochs=1, callbacks=callbacks).fit(module, loader(*make_data(48)))
    return flat(module)


def test_callbacks_before_and_after_xgrad_see_what_the_docs_say() -> None:
    before, after = Probe(), Probe()
    _fit([before, XGradCallback(), after])
    assert len(before.seen["on_train_batch_start"]) == 5  # 6 batches; the first has nothing to compare with
    assert all(before.seen["on_train_batch_start"]) and not any(before.seen["on_before_optimizer_step"])
    assert not any(after.seen["on_train_batch_start"]) and all(after.seen["on_before_optimizer_step"])


@pytest.mark.parametrize("place", ["before", "after"])
def test_asking_the_restorers_gives_the_real_weights_in_either_place(place: str) -> None:
    probe = Probe(ask_restorers=True)
    callbacks: list[Callback] = [probe, XGradCallback()] if place == "before" else [XGradCallback(), probe]
    trained = _fit(callbacks)
    assert len(probe.seen["on_before_optimizer_step"]) == 5 and all(probe.seen["on_before_optimizer_step"])
    assert torch.equal(trained, _fit([XGradCallback()]))  # asking changes nothing in training
