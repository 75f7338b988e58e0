"""The character-level GPT example: its CLI trains a few steps with and without XGrad; its model is causal."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from packaging.version import Version

from lightning_xgrad import XGradCallback

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
