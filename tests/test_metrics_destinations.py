"""Where the ``xgrad/*`` metrics go: the loggers (``test_prediction_quality.py``), ``trainer.callback_metrics`` at the
step they were computed (so ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them), the progress bar on request,
and a warning when nothing would record them.

Values are checked against the closed form of SGD momentum on a linear loss (``test_prediction_quality``'s
``closed_form``): the prediction before optimizer step t = b + 1, made at batch b, has a known cosine and error.
``self.log`` keeps a number as a float32 tensor (Lightning's default dtype), hence float32 tolerances here; the loggers
get the float64 values.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from lightning_xgrad import XGradCallback

from .test_prediction_quality import COSINE, ERROR, MU, SHIFT, LinearLoss, closed_form, index_loader
from .toolkit import TinyModule, XGradMetricsRecorder, loader, make_data, trainer

C_A, C_B = [0.6, -0.8, 0.0], [1.0, 0.0]  # half of the gradient alternates: cosines between 0.5 and 1
ALPHA, BETA = sum(c * c for c in C_A), sum(c * c for c in C_B)
F32 = 1e-6


class CallbackMetricsAtBatchEnd(Callback):
    """What ``trainer.callback_metrics`` holds for the xgrad metrics at the end of every batch (listed after
    XGradCallback, as a user's monitoring callback would be; Lightning runs checkpoint callbacks last anyway)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        self.seen.append({name: float(metrics[name]) for name in (COSINE, ERROR, SHIFT) if name in metrics})


def test_the_metrics_are_in_callback_metrics_at_the_step_they_were_computed() -> None:
    every, batches_run = 3, 31
    seen = CallbackMetricsAtBatchEnd()
    trainer(callbacks=[XGradCallback(log_every_n_steps=every), seen], max_epochs=1).fit(
        LinearLoss(C_A, C_B), index_loader(batches_run)
    )
    logging_batches = [b for b in range(1, batches_run) if b % every == 0]
    assert all(not seen.seen[b] for b in range(logging_batches[0]))  # nothing measured yet
    for b in range(logging_batches[0], batches_run):
        measured_at = max(m for m in logging_batches if m <= b)  # a step-level metric holds until the next value
        cosine, error = closed_form(measured_at + 1, MU, ALPHA, BETA)
        assert seen.seen[b][COSINE] == pytest.approx(cosine, rel=F32), f"batch {b}"
        assert seen.seen[b][ERROR] == pytest.approx(error, rel=F32), f"batch {b}"
        assert seen.seen[b][SHIFT] > 0


def test_model_checkpoint_and_early_stopping_monitor_the_prediction_cosine(tmp_path: Path) -> None:
    """The best checkpoint by ``xgrad/prediction_cosine`` holds the highest cosine of the closed form over the run;
    EarlyStopping reads the metric at each epoch's end (before, both stopped the run: "not available")."""
    checkpoint = ModelCheckpoint(tmp_path, monitor=COSINE, mode="max", every_n_train_steps=1, save_top_k=1)
    stopping = EarlyStopping(monitor=COSINE, mode="max", patience=5, check_on_train_epoch_end=True)
    per_epoch = 12
    trainer(
        callbacks=[XGradCallback(log_every_n_steps=1), stopping, checkpoint], max_epochs=2, enable_checkpointing=True
    ).fit(LinearLoss(C_A, C_B), index_loader(per_epoch))
    cosine = {t: closed_form(t, MU, ALPHA, BETA)[0] for t in range(2, 2 * per_epoch + 1)}  # step t >= 2 is predicted
    assert float(checkpoint.best_model_score) == pytest.approx(max(cosine.values()), rel=F32)
    assert float(stopping.best_score) == pytest.approx(max(cosine[per_epoch], cosine[2 * per_epoch]), rel=F32)


def test_prog_bar_shows_the_metrics_in_the_progress_bar() -> None:
    batches_run = 6
    fit = trainer(callbacks=[XGradCallback(log_every_n_steps=1, prog_bar=True)], max_epochs=1)
    fit.fit(LinearLoss(C_A, C_B), index_loader(batches_run))
    cosine, _ = closed_form(batches_run, MU, ALPHA, BETA)  # the last batch's step, t = batches_run
    assert float(fit.progress_bar_metrics[COSINE]) == pytest.approx(cosine, rel=F32)
    quiet = trainer(callbacks=[XGradCallback(log_every_n_steps=1)], max_epochs=1)
    quiet.fit(LinearLoss(C_A, C_B), index_loader(batches_run))
    assert COSINE not in quiet.progress_bar_metrics and COSINE in quiet.callback_metrics


def test_log_every_n_steps_without_a_logger_warns_once_at_the_start_of_fit() -> None:
    with pytest.warns(UserWarning) as records:
        trainer(callbacks=[XGradCallback(log_every_n_steps=1)], max_epochs=2, logger=False).fit(
            TinyModule(), loader(*make_data(32))
        )
    warned = [r for r in records if "the Trainer has no logger" in str(r.message)]
    assert len(warned) == 1
    assert str(warned[0].message).startswith("XGradCallback(log_every_n_steps=1): the Trainer has no logger")


def test_no_warning_when_a_logger_is_there_or_nothing_is_logged() -> None:
    recorder = XGradMetricsRecorder()  # adds its logger in on_fit_start, after XGradCallback's own
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer(callbacks=[XGradCallback(log_every_n_steps=1), recorder], max_epochs=1, logger=False).fit(
            TinyModule(), loader(*make_data(32))
        )
        trainer(callbacks=[XGradCallback()], max_epochs=1, logger=False).fit(TinyModule(), loader(*make_data(32)))
    assert not [r for r in records if "no logger" in str(r.message)]
    assert any(v == v for v in recorder.logged[COSINE])  # the recorder's logger got the metrics
