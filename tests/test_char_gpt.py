"""The character-level GPT example: its CLI trains a few steps with and without XGrad; its model is causal; its
tuning split is held out; its other optimizers are the ones named, schedule-free switched between its modes."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from packaging.version import Version

from lightning_xgrad import OptimizerPredictor, XGradCallback

from .toolkit import flat, load_example

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

# a few steps of the example's own config: 4 training batches, 2 validation batches, no printing
QUICK = [
    "--trainer.max_epochs=1",
    "--data.train_batches_per_epoch=4",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.warmup_steps=2",
]
XGRAD = ["--trainer.callbacks+=lightning_xgrad.XGradCallback", "--trainer.callbacks.steps=1"]


@pytest.fixture(scope="module")
def char_gpt():
    return load_example("char_gpt")


@pytest.fixture(scope="module")
def runs(char_gpt):
    """One quick fit without and one with XGrad, through the CLI in-process: {name: fitted LightningCLI}."""
    results = {}
    for name, extra in (("baseline", []), ("xgrad", XGRAD)):
        cli = char_gpt.make_cli(["--config", str(char_gpt.CONFIG), *QUICK, *extra], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        results[name] = cli
    return results


def test_the_data_is_real_text_with_a_vocabulary_linked_to_the_model(runs) -> None:
    cli = runs["baseline"]
    data = cli.datamodule
    assert data.num_chars > 100_000
    assert data.vocab_size > 30
    assert cli.model.tok_emb.num_embeddings == data.vocab_size  # linked by the CLI
    if Version(lightning.__version__) >= Version("2.5.2"):  # before, LightningCLI left instantiation links out
        assert cli.model.hparams.vocab_size == data.vocab_size
    assert cli.model.hparams.block_size == data.block_size
    assert len(data.val_ids) == pytest.approx(0.1 * data.num_chars, rel=0.01)
    assert "def " in data.decode(data.train_ids[:5000])  # Python source, decoded back
    assert 1.0 < data.unigram_perplexity() < data.vocab_size


def test_both_runs_validate_with_ppl_the_exp_of_the_loss(runs) -> None:
    for cli in runs.values():
        assert cli.trainer.global_step == 4
        metrics = cli.trainer.callback_metrics
        loss, ppl = float(metrics["val_loss"]), float(metrics["val_ppl"])
        assert math.isfinite(loss) and math.isfinite(ppl)
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
        assert loss < math.log(cli.datamodule.vocab_size) + 0.5  # near or below a uniform guess after 4 steps


def test_xgrad_changed_the_weights(runs) -> None:
    baseline, xgrad = runs["baseline"], runs["xgrad"]
    assert not any(isinstance(c, XGradCallback) for c in baseline.trainer.callbacks)
    (callback,) = [c for c in xgrad.trainer.callbacks if isinstance(c, XGradCallback)]
    assert callback.steps == 1
    # same seed, same initial weights and batches: only the weights the gradients were taken at differ
    assert not torch.equal(flat(baseline.model), flat(xgrad.model))
    assert float(baseline.trainer.callback_metrics["val_loss"]) != float(xgrad.trainer.callback_metrics["val_loss"])


def test_the_model_is_causal(char_gpt) -> None:
    torch.manual_seed(0)
    model = char_gpt.CharGPT(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32).eval()
    ids = torch.randint(1, 50, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=1e-6)  # earlier positions untouched
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the changed position and later ones do see it


def test_the_model_refuses_sequences_longer_than_its_block_size(char_gpt) -> None:
    model = char_gpt.CharGPT(vocab_size=10, block_size=8, n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_train_returns_the_final_metrics_and_rejects_unknown_overrides(char_gpt) -> None:
    result = char_gpt.train(
        1,
        max_epochs=1,
        progress_bar=False,
        train_batches_per_epoch=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    assert set(result) == {"val_loss", "val_ppl"}
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-5)
    with pytest.raises(TypeError, match="unknown or ambiguous override"):
        char_gpt.train(None, no_such_argument=1)


# ---------------------------------------------------------------------- the tuning split


def test_the_tuning_split_is_carved_from_training_text_and_disjoint_from_validation(char_gpt) -> None:
    """Every module's text is training | tuning | validation; the validation split is the default's, the training
    split the default's minus the tuning text, and validation runs on the split ``val_split`` names."""
    default = char_gpt.CharTextDataModule()
    tuned = char_gpt.CharTextDataModule(tuning_fraction=0.1, val_split="tuning", val_batches=2, batch_size=4)
    assert torch.equal(tuned.val_ids, default.val_ids)  # the reported split is untouched
    assert len(tuned.tuning_ids) == pytest.approx(0.1 * default.num_chars, rel=0.01)
    assert len(tuned.train_ids) + len(tuned.tuning_ids) == len(default.train_ids)
    train, tuning, start = default.train_ids, [], 0
    sources = char_gpt.stdlib_sources()
    kept = []  # the default's training text of every module, cut into what stays training and what is tuning
    for source in sources:
        length = len(source) - round(len(source) * 0.1)
        cut = length - round(len(source) * 0.1)
        kept.append(train[start : start + cut])
        tuning.append(train[start + cut : start + length])
        start += length
    assert start == len(train)
    assert torch.equal(tuned.train_ids, torch.cat(kept))  # no tuning character is in the training windows' text
    assert torch.equal(tuned.tuning_ids, torch.cat(tuning))
    (x, y), *_ = tuned.val_dataloader()
    assert torch.equal(x[1], tuned.tuning_ids[64:128]) and torch.equal(y[0], tuned.tuning_ids[1:65])
    (x, _), *_ = char_gpt.CharTextDataModule(tuning_fraction=0.1).val_dataloader()
    assert torch.equal(x[0], default.val_ids[:64])  # val_split="val": the reported split
    assert len(default.tuning_ids) == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"val_split": "tuning"}, "needs a tuning split"),
        ({"tuning_fraction": 0.9}, "tuning_fraction must be in"),
        ({"tuning_fraction": 0.1, "val_split": "test"}, "val_split must be one of"),
    ],
)
def test_the_data_module_refuses_a_split_it_cannot_make(char_gpt, arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        char_gpt.CharTextDataModule(**arguments)


# ---------------------------------------------------------------------- the other optimizers

OPTIMIZER_QUICK = [*QUICK, "--data.train_batches_per_epoch=6"]  # past Lookahead's k=5: a slow-weight update


def _fit(char_gpt, *extra: str, callbacks: tuple = ()):
    cli = char_gpt.make_cli(["--config", str(char_gpt.CONFIG), *OPTIMIZER_QUICK, *extra], run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_the_optimizer_argument_refuses_an_unknown_name(char_gpt, capsys) -> None:
    with pytest.raises(ValueError, match="optimizer must be one of"):
        char_gpt.CharGPT(vocab_size=10, optimizer="sgd")
    with pytest.raises(SystemExit):
        char_gpt.make_cli(["fit", "--config", str(char_gpt.CONFIG), "--model.optimizer=sgd"])  # as typed
    assert "Expected a typing.Literal['adamw', 'nadam', 'schedulefree_adamw'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["nadam", "schedulefree_adamw", "lookahead_adamw"])
def test_each_optimizer_trains_with_xgrad_on_the_trajectory_rule(char_gpt, name: str) -> None:
    """The named optimizer is the one that stepped (its own state), with the default's groups and betas; XGrad
    composes with it through the trajectory rule; only schedule-free has no LR scheduler."""
    cli = _fit(char_gpt, f"--model.optimizer={name}", *XGRAD)
    (optimizer,) = cli.trainer.optimizers
    groups = optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and all(g["betas"] == (0.9, 0.99) for g in groups)
    assert OptimizerPredictor(optimizer).describe() == "trajectory"
    params = [p for g in groups for p in g["params"]]
    if name == "nadam":
        assert type(optimizer) is torch.optim.NAdam and optimizer.defaults["decoupled_weight_decay"] is True
        assert all(float(optimizer.state[p]["step"]) == 6 and "mu_product" in optimizer.state[p] for p in params)
    elif name == "lookahead_adamw":
        from pytorch_optimizer import Lookahead

        assert type(optimizer) is Lookahead and (optimizer.k, optimizer.alpha) == (5, 0.5)
        assert type(optimizer.optimizer) is torch.optim.AdamW
        assert all(float(optimizer.optimizer.state[p]["step"]) == 6 for p in params)
        assert groups[0]["counter"] == 1  # 6 steps: one slow-weight update at the fifth
        # the update synced the slow weights to the fast ones; one AdamW step since moved the fast ones
        assert all(not torch.equal(optimizer.state[p]["slow_params"], p) for p in params[:1])
    else:
        from schedulefree import AdamWScheduleFree

        assert type(optimizer) is AdamWScheduleFree and groups[0]["warmup_steps"] == 2 and groups[0]["k"] == 6
        assert cli.trainer.lr_scheduler_configs == []
    if name != "schedulefree_adamw":
        (config,) = cli.trainer.lr_scheduler_configs
        assert config.interval == "step"
    if name == "schedulefree_adamw":
        assert all(group["lr"] == 3e-3 for group in groups)  # the lr itself is never scheduled
    else:
        assert all(group["lr"] < 3e-3 for group in groups)  # the cosine decay


class _ModeSpy(lightning.Callback):
    """Records schedule-free's mode where XGrad predicts, where the optimizer steps and where validation runs."""

    def __init__(self) -> None:
        self.modes: dict[str, list[bool]] = {"batch start": [], "optimizer step": [], "validation": []}

    @staticmethod
    def _mode(trainer) -> bool:
        return trainer.optimizers[0].param_groups[0]["train_mode"]

    def on_train_batch_start(self, trainer, *args) -> None:
        self.modes["batch start"].append(self._mode(trainer))

    def on_before_optimizer_step(self, trainer, *args) -> None:
        self.modes["optimizer step"].append(self._mode(trainer))

    def on_validation_batch_start(self, trainer, *args) -> None:
        self.modes["validation"].append(self._mode(trainer))


def test_schedule_free_trains_in_train_mode_validates_in_eval_mode_and_ends_at_x(char_gpt, monkeypatch) -> None:
    from schedulefree import AdamWScheduleFree

    calls: list[str] = []
    for mode in ("train", "eval"):
        original = getattr(AdamWScheduleFree, mode)
        monkeypatch.setattr(AdamWScheduleFree, mode, lambda self, o=original, m=mode: (calls.append(m), o(self))[1])
    spy = _ModeSpy()
    epochs = ["--trainer.max_epochs=2", "--trainer.num_sanity_val_steps=1"]
    cli = _fit(char_gpt, "--model.optimizer=schedulefree_adamw", *epochs, *XGRAD, callbacks=(spy,))
    # the sanity check, the start of training, then per epoch validation and back to training, and the end
    assert calls == ["eval", "train", "eval", "train", "eval", "train", "eval"]
    assert spy.modes["batch start"] == spy.modes["optimizer step"] == [True] * 12  # XGrad predicts from y
    assert spy.modes["validation"] == [False] * 5  # the sanity check's batch and both epochs' two
    fitted = float(cli.trainer.callback_metrics["val_loss"])
    (validated,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert validated["val_loss"] == pytest.approx(fitted, rel=1e-6)  # the model left after fit is the one validated


def test_a_schedule_free_checkpoint_saved_while_training_holds_x(char_gpt, tmp_path) -> None:
    cli = _fit(char_gpt, "--model.optimizer=schedulefree_adamw")
    (optimizer,) = cli.trainer.optimizers
    x = {name: p.detach().clone() for name, p in cli.model.named_parameters()}  # fit ends in eval mode: at x
    optimizer.train()
    y = flat(cli.model)
    assert not torch.allclose(torch.cat([v.flatten() for v in x.values()]), y)
    cli.trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    for name, value in x.items():
        torch.testing.assert_close(saved["state_dict"][name], value)
    assert [g["train_mode"] for g in saved["optimizer_states"][0]["param_groups"]] == [False, False]
    assert optimizer.param_groups[0]["train_mode"] is True  # the run itself goes on at y
    torch.testing.assert_close(flat(cli.model), y)
