"""A two-optimizer MLP GAN on scikit-learn's digits (manual optimization) as a LightningCLI program, XGrad optional.

The XGrad paper reports that on GANs (WGAN) results vary sharply with the number of predicted steps, and a GAN
is the usual case of Lightning's manual optimization with several optimizers: this example exercises both. A
small MLP generator and discriminator learn the 1797 real 8x8 scans of ``load_digits()`` (they ship with
scikit-learn, nothing is downloaded) with the standard non-saturating GAN loss, each with its own Adam. With
``XGradCallback`` both networks are predicted at the start of every batch; each ``opt.step()`` puts that
optimizer's real weights back before it updates them, so the discriminator takes its gradient at the predicted
discriminator against samples of the predicted generator, and the generator its gradient at the predicted
generator against the freshly updated discriminator.

Sample quality is measured without downloads at every validation, from the same fixed noise in every run:

* ``val_fd`` (primary, lower is better): the Frechet distance between the real digits and as many generated
  samples, in pixel space (64-d, pixels in [0, 1]): ``|mu_r - mu_g|^2 + Tr(C_r + C_g - 2 (C_r C_g)^(1/2))``.
* ``val_is`` (higher is better, at most 10): an inception-score-like ``exp(E_x KL(p(y|x) || p(y)))`` with a
  logistic-regression digit classifier fitted once per process on the real digits; it rewards samples that are
  each clearly one digit while all ten digits appear.

The config ``examples/configs/digits_gan.yaml`` trains what :func:`train` trains (same seeds, data order,
hyper-parameters and 100 epochs); ``val_fd`` and ``val_is`` are logged every epoch (to
``lightning_logs/digits_gan/version_N/metrics.csv``).

Run it from the repository root (with the package installed, e.g. ``pip install -e ".[examples]"``)::

    python examples/digits_gan.py fit --config examples/configs/digits_gan.yaml
    python examples/digits_gan.py fit --config examples/configs/digits_gan.yaml \
        --trainer.callbacks+=lightning_xgrad.XGradCallback

``examples/gan_demo.py`` trains baseline and XGrad side by side over seeds and prints the comparison table.
"""

from __future__ import annotations

import functools
import itertools

import lightning as L
import numpy as np
import torch
from _quiet import quiet  # beside this file
from lightning.pytorch.cli import ArgsType, LightningCLI
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_xgrad import XGradCallback

PIXELS = 64
#: seed of the noise every validation generates its samples from, the same in every run
EVAL_NOISE_SEED = 1234
METRICS = ("val_fd", "val_is", "d_loss", "g_loss")


def real_digits() -> Tensor:
    """All 1797 digits as (N, 64) float32 pixels in [0, 1] (the scans hold 0..16)."""
    return torch.tensor(load_digits().data / 16.0, dtype=torch.float32)


@functools.cache
def _digit_classifier() -> LogisticRegression:
    """A digit classifier fitted on the real digits, once per process (98.5% training accuracy)."""
    digits = load_digits()
    # one BLAS thread: with several, this small fit runs 50x slower on a 2-core machine that torch keeps busy
    with threadpool_limits(limits=1):
        return LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0.0))) @ eigenvectors.T


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) samples.

    ``Tr((C_r C_f)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the symmetric
    ``C_r^(1/2) C_f C_r^(1/2)`` (same eigenvalues), which stays real and exact where ``C_r`` is singular (the
    digits' corner pixels are always 0) and ``scipy.linalg.sqrtm(C_r @ C_f)`` warns.
    """
    mu_r, mu_f = real.mean(axis=0), fake.mean(axis=0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root_r = _psd_sqrt(cov_r)
    trace_covmean = np.sqrt(np.linalg.eigvalsh(root_r @ cov_f @ root_r).clip(min=0.0)).sum()
    return float(np.sum((mu_r - mu_f) ** 2) + np.trace(cov_r) + np.trace(cov_f) - 2.0 * trace_covmean)


def inception_like_score(samples: np.ndarray) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` under :func:`_digit_classifier`, for (N, 64) samples in [0, 1]."""
    with threadpool_limits(limits=1):
        probs = _digit_classifier().predict_proba(samples)
    marginal = probs.mean(axis=0, keepdims=True)
    kl = np.sum(probs * (np.log(probs + 1e-12) - np.log(marginal + 1e-12)), axis=1)
    return float(np.exp(kl.mean()))


class DigitsGANData(L.LightningDataModule):
    """The digits as (N, 64) pixels in [-1, 1] (the generator's tanh range) for training; validation sees every
    real digit once, in ``val_batch_size`` batches, as the reference sample for the quality metrics."""

    def __init__(self, batch_size: int = 64, val_batch_size: int = 600, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = TensorDataset(real_digits() * 2.0 - 1.0)

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed)  # same batch order for every run with this seed
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,  # 1797 = 28 * 64 + 5: no 5-image batch at the end of each epoch
            generator=generator,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        return DataLoader(self.dataset, batch_size=self.val_batch_size, num_workers=self.num_workers)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class DigitsGAN(L.LightningModule):
    """An MLP GAN for 8x8 digits trained with manual optimization: two Adams, non-saturating loss.

    Args:
        latent_dim: size of the generator's Gaussian input.
        hidden_dim: width of the two hidden layers of both networks.
        lr_g: the generator's Adam learning rate.
        lr_d: the discriminator's Adam learning rate.
        beta1: Adam's first beta for both optimizers (0.5, the usual choice for GANs).
        beta2: Adam's second beta for both optimizers.
        g_every: step the generator on every ``g_every``-th batch only (1: every batch); the discriminator steps
            on every batch.
        seed: seed of the training noise (its own generator, so the noise does not depend on anything else).
    """

    def __init__(
        self,
        latent_dim: int = 32,
        hidden_dim: int = 128,
        lr_g: float = 1e-3,
        lr_d: float = 1e-3,
        beta1: float = 0.5,
        beta2: float = 0.999,
        g_every: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if g_every < 1:
            raise ValueError(f"g_every must be at least 1, got {g_every!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(_mlp([latent_dim, hidden_dim, hidden_dim, PIXELS]), nn.Tanh())
        self.discriminator = _mlp([PIXELS, hidden_dim, hidden_dim, 1])
        self._noise: torch.Generator | None = None
        self._val_noise: torch.Generator | None = None
        self._val_real: list[Tensor] = []
        self._val_fake: list[Tensor] = []

    def forward(self, z: Tensor) -> Tensor:
        """Generated digits in [-1, 1], (N, 64)."""
        return self.generator(z)

    def _latent(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, self.hparams.latent_dim, generator=generator).to(self.device)

    def on_train_start(self) -> None:
        if self._noise is None:
            self._noise = torch.Generator().manual_seed(self.hparams.seed)

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        assert self._noise is not None
        fake = self(self._latent(len(real), self._noise))

        # discriminator: real -> 1, fake -> 0; the generator is not trained by this loss
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake.detach())
        d_real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        d_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        d_loss = d_real + d_fake
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.log("d_loss", d_loss.detach(), prog_bar=True)

        if batch_idx % self.hparams.g_every != 0:
            return
        # generator, non-saturating: make the (just updated) discriminator call the fakes real
        logits = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        opt_g.zero_grad()
        self.manual_backward(g_loss)  # also fills the discriminator's grads; its zero_grad clears them next batch
        opt_g.step()
        self.log("g_loss", g_loss.detach(), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._val_noise = torch.Generator().manual_seed(EVAL_NOISE_SEED)
        self._val_real, self._val_fake = [], []

    def validation_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        (real,) = batch
        assert self._val_noise is not None
        fake = self(self._latent(len(real), self._val_noise))
        self._val_real.append(real.cpu())
        self._val_fake.append(fake.cpu())

    def on_validation_epoch_end(self) -> None:
        # pixels back to [0, 1], where the classifier was fitted and where the distances are reported
        real = ((torch.cat(self._val_real) + 1.0) / 2.0).double().numpy()
        fake = ((torch.cat(self._val_fake) + 1.0) / 2.0).double().numpy()
        self._val_real, self._val_fake = [], []
        self.log("val_fd", frechet_distance(real, fake), prog_bar=True)
        self.log("val_is", inception_like_score(fake), prog_bar=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        betas = (hp.beta1, hp.beta2)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr_g, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=betas)
        return [opt_g, opt_d]


def train(
    xgrad_steps: int | None,
    epochs: int = 100,
    seed: int = 0,
    progress_bar: bool = True,
    g_every: int = 1,
) -> dict[str, float]:
    """Train once, with XGrad unless ``xgrad_steps`` is None; return the final val_fd, val_is and the losses of
    the last batch (d_loss, g_loss)."""
    L.seed_everything(seed, workers=True, verbose=False)
    model = DigitsGAN(g_every=g_every, seed=seed)
    data = DigitsGANData(seed=seed)
    callbacks = [] if xgrad_steps is None else [XGradCallback(steps=xgrad_steps)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        deterministic=True,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data)
    return {name: float(trainer.callback_metrics[name]) for name in METRICS}


def reference_scores() -> dict[str, float]:
    """What the metrics give for real data: val_fd between two random halves of the digits, val_is of all."""
    real = real_digits().double().numpy()
    order = np.random.default_rng(0).permutation(len(real))
    half = len(real) // 2
    return {
        "val_fd": frechet_distance(real[order[:half]], real[order[half:]]),
        "val_is": inception_like_score(real),
    }


def cli_main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """The program ``python examples/digits_gan.py`` runs: a LightningCLI over :class:`DigitsGAN` and
    :class:`DigitsGANData`; ``args`` and ``run`` as LightningCLI takes them (``None``: the command line)."""
    quiet()
    return LightningCLI(
        DigitsGAN,
        DigitsGANData,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},  # a rerun into the same log folder replaces its config.yaml
    )


if __name__ == "__main__":
    torch.set_num_threads(1)  # MLPs this small run faster on one thread (about 1.5x on a 2-core CPU), as gan_demo.py
    cli_main()
