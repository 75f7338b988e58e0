"""Baseline vs. XGrad on character-level language modelling: a small GPT on Python's own standard library source.

The text is real and already on every machine that runs this package, so nothing is downloaded: the source of
twenty pure-Python standard-library modules (``STDLIB_MODULES``: argparse, ast, configparser, dataclasses, difflib,
enum, fractions, functools, heapq, inspect, optparse, pprint, random, shutil, statistics, subprocess, tempfile,
textwrap, threading, typing), read in that order through each module's import loader
(``importlib.util.find_spec(name).loader.get_source(name)``, which finds ``<stdlib>/argparse.py`` and the like
without importing anything) and concatenated: code, comments and docstrings, 1,187,622 characters on CPython
3.11.7. The text is fixed for a given Python install and varies slightly between Python versions (the modules
change a little with every release). An installation without standard-library sources (some embedded builds ship
only ``.pyc``) gets a clear error.

Data (``CharTextDataModule``): the last ``val_fraction`` (10%) of every module's text is validation, the rest
training, so both splits cover every module. The vocabulary is every character seen at least ``min_char_count``
(10) times in the whole text, in code-point order, plus id 0 for all rarer characters (96 + 1 = 97 ids on 3.11.7:
ASCII; the few non-ASCII characters in docstrings map to 0). An "epoch" is ``train_batches_per_epoch`` (100)
batches of ``block_size`` (64) character windows at random offsets of the training split, drawn by a
``torch.Generator`` seeded with ``seed``, so every run with that seed sees the same windows in the same order;
validation is the first ``val_batches`` (32) batches of non-overlapping windows of the validation split (65,536 of
its 118,762 characters). For scale, a unigram model (training-split character frequencies) has a validation
perplexity of 20.78 on 3.11.7 (``CharTextDataModule.unigram_perplexity()``).

Tuning split: ``tuning_fraction`` > 0 holds out that fraction of every module's text, just before its validation part,
from training: every module's text is then training | tuning | validation. ``val_split="tuning"`` validates on it
instead of the validation split, so hyperparameters can be picked on text that neither the runs being tuned train on
nor the reported validation holds. The default, ``tuning_fraction=0``, carves nothing: the splits are the ones above.

Model (``CharGPT``): a decoder-only transformer in the GPT-2 layout: token and learned position embeddings,
``n_layer`` pre-LayerNorm blocks of causal self-attention (``F.scaled_dot_product_attention(is_causal=True)``)
and a 4x GELU MLP, a final LayerNorm and a linear head tied to the token embedding (``tie_weights``); 0.42 M
parameters by default. No dropout by default, so baseline and XGrad runs from one seed differ only in the weights
the gradients are taken at. AdamW (decay on matrices only, not on biases, LayerNorms or embeddings) with a linear
warm-up over ``warmup_steps`` and a cosine decay to ``min_lr_ratio * lr`` at the last step
(``trainer.estimated_stepping_batches``), stepped every batch. ``optimizer`` picks the alternatives a user might
train with instead, with the same parameter groups and betas: ``"nadam"`` (``torch.optim.NAdam`` with decoupled
weight decay, same schedule), ``"lookahead_adamw"`` (pytorch-optimizer's ``Lookahead`` over the same AdamW, k=5,
alpha=0.5; same schedule) and ``"schedulefree_adamw"`` (``schedulefree.AdamWScheduleFree`` with its own linear warm-up
over ``warmup_steps`` and no scheduler: it needs none). Schedule-free keeps the gradient point y in the parameters
while training and the average x, the weights it reports, otherwise: the model switches it as its README says,
``train()`` when training starts or resumes, ``eval()`` before every validation and when training ends, and
checkpoints hold x. Logged: ``train_loss`` every step, and after every
validation ``val_loss`` (mean per-character cross-entropy, nats) and ``val_ppl = exp(val_loss)``.

The vocabulary size and the context length come from the data: ``CharGPTCLI`` links ``data.vocab_size`` to
``model.vocab_size`` once the data module is instantiated (the vocabulary is read from the text then) and
``data.block_size`` to ``model.block_size`` at parse time, so neither is set in the model's config. From Python,
pass them yourself: ``CharGPT(vocab_size=data.vocab_size, block_size=data.block_size)``.

Run it from the repository root (with the package installed, e.g. ``pip install -e ".[examples]"``)::

    python examples/char_gpt.py fit --config examples/configs/char_gpt.yaml            # baseline, ~75 s on 2 cores
    python examples/char_gpt.py fit --config examples/configs/char_gpt.yaml \\
        --trainer.callbacks+=lightning_xgrad.XGradCallback --trainer.callbacks.steps=1  # with XGrad

and from Python ``train(None)`` / ``train(1)`` return the final ``val_loss`` and ``val_ppl`` of one run each. The
config trains 10 epochs of 100 steps (1000 steps, 2 M characters seen), about 75 s on a 2-core CPU; with seed 0
(CPython 3.11.7, torch 2.13.0) the baseline ends at val_loss 1.2548 / val_ppl 3.507 and ``XGradCallback(steps=1)``
at 1.2294 / 3.419, against 20.78 for the unigram model. One seed: not evidence of a difference by itself.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from _quiet import quiet  # beside this file
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchmetrics import MeanMetric

#: the standard-library modules whose source is the text, in the order they are concatenated
STDLIB_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "configparser",
    "dataclasses",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "inspect",
    "optparse",
    "pprint",
    "random",
    "shutil",
    "statistics",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
)
#: the config the CLI example and :func:`train` use
CONFIG = Path(__file__).resolve().parent / "configs" / "char_gpt.yaml"
#: the id of every character outside the vocabulary
UNKNOWN_ID = 0
#: the splits validation can run on
ValSplit = Literal["val", "tuning"]
#: the optimizers ``CharGPT`` trains with
OptimizerName = Literal["adamw", "nadam", "schedulefree_adamw", "lookahead_adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


def stdlib_sources(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """The source text of each module, through its import loader (nothing is imported)."""
    sources = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        loader = None if spec is None else spec.loader
        source = loader.get_source(name) if loader is not None and hasattr(loader, "get_source") else None
        if not source:
            raise RuntimeError(
                f"the source of the standard-library module {name!r} is not available in this Python installation "
                f"({spec.origin if spec is not None else 'not found'}); this example needs the stdlib .py files"
            )
        sources.append(source)
    return sources


class _Windows(Dataset):
    """``(x, y)`` pairs of ``block_size`` ids, ``y`` shifted by one, starting at ``starts`` (every offset if None)."""

    def __init__(self, ids: Tensor, block_size: int, starts: Tensor | None = None) -> None:
        if len(ids) <= block_size:
            raise ValueError(f"{len(ids)} characters are too few for windows of block_size={block_size}")
        self.ids = ids
        self.block_size = block_size
        self.starts = starts

    def __len__(self) -> int:
        return len(self.ids) - self.block_size if self.starts is None else len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index if self.starts is None else int(self.starts[index])
        chunk = self.ids[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharTextDataModule(L.LightningDataModule):
    """Characters of the standard-library sources as int64 ids: random training windows, fixed validation windows.

    ``max_chars`` keeps only the first ``max_chars`` characters of the concatenated text (before the split);
    ``vocab_size``, ``num_chars`` and the splits are read from the text on first use (about 0.1 s).
    ``tuning_fraction`` holds that fraction of every module's text out of training (the tuning split) and
    ``val_split`` names the split validation runs on: ``"val"`` (the reported one) or ``"tuning"``.
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        max_chars: int | None = None,
        train_batches_per_epoch: int = 100,
        val_batches: int = 32,
        min_char_count: int = 10,
        tuning_fraction: float = 0.0,
        val_split: ValSplit = "val",
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if not 0.0 <= tuning_fraction < 1.0 - val_fraction:
            raise ValueError(
                f"tuning_fraction must be in [0, 1 - val_fraction) = [0, {1.0 - val_fraction:g}), "
                f"got {tuning_fraction!r}"
            )
        if val_split not in get_args(ValSplit):
            raise ValueError(f"val_split must be one of {get_args(ValSplit)}, got {val_split!r}")
        if val_split == "tuning" and tuning_fraction == 0.0:
            raise ValueError('val_split="tuning" needs a tuning split: set tuning_fraction > 0')
        for name, value in [
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("train_batches_per_epoch", train_batches_per_epoch),
            ("val_batches", val_batches),
            ("min_char_count", min_char_count),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if max_chars is not None and max_chars < 1:
            raise ValueError(f"max_chars must be at least 1 or None, got {max_chars!r}")
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.max_chars = max_chars
        self.train_batches_per_epoch = train_batches_per_epoch
        self.val_batches = val_batches
        self.min_char_count = min_char_count
        self.tuning_fraction = tuning_fraction
        self.val_split = val_split
        self._vocab: str | None = None
        self._train_ids: Tensor | None = None
        self._tuning_ids: Tensor | None = None
        self._val_ids: Tensor | None = None

    def _load(self) -> None:
        if self._vocab is not None:
            return
        texts, budget = [], self.max_chars
        for source in stdlib_sources():
            texts.append(source if budget is None else source[:budget])
            if budget is not None:
                budget -= len(texts[-1])
                if budget == 0:
                    break
        codes = _code_points("".join(texts))
        counts = torch.bincount(codes)
        self._vocab = "".join(chr(code) for code in (counts >= self.min_char_count).nonzero().flatten().tolist())
        if not self._vocab:
            raise ValueError(f"no character occurs min_char_count={self.min_char_count} times in the text")
        # code point -> id lookup table; every character outside the vocabulary maps to UNKNOWN_ID
        table = torch.full((len(counts),), UNKNOWN_ID, dtype=torch.int64)
        table[_code_points(self._vocab)] = torch.arange(1, len(self._vocab) + 1)
        ids = table[codes]
        train, tuning, val, start = [], [], [], 0
        for text in texts:
            cut = start + len(text) - round(len(text) * self.val_fraction)  # the last val_fraction of every module
            tuning_cut = cut - round(len(text) * self.tuning_fraction)  # the tuning_fraction before it
            train.append(ids[start:tuning_cut])
            tuning.append(ids[tuning_cut:cut])
            val.append(ids[cut : start + len(text)])
            start += len(text)
        self._train_ids, self._tuning_ids, self._val_ids = torch.cat(train), torch.cat(tuning), torch.cat(val)

    @property
    def vocab(self) -> str:
        """The characters with ids 1, 2, ...; id 0 stands for every other character."""
        self._load()
        assert self._vocab is not None
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 1

    @property
    def train_ids(self) -> Tensor:
        self._load()
        assert self._train_ids is not None
        return self._train_ids

    @property
    def tuning_ids(self) -> Tensor:
        """The tuning split (empty when ``tuning_fraction`` is 0): never in the training windows."""
        self._load()
        assert self._tuning_ids is not None
        return self._tuning_ids

    @property
    def val_ids(self) -> Tensor:
        self._load()
        assert self._val_ids is not None
        return self._val_ids

    @property
    def num_chars(self) -> int:
        """Characters in all splits together."""
        return len(self.train_ids) + len(self.tuning_ids) + len(self.val_ids)

    def decode(self, ids: Tensor) -> str:
        """Ids back to text, ``\\ufffd`` for the unknown id."""
        chars = "\ufffd" + self.vocab
        return "".join(chars[i] for i in ids.tolist())

    def unigram_perplexity(self) -> float:
        """Validation perplexity of the training split's character frequencies (add-one smoothed): the scale a
        model has to beat by using context at all."""
        counts = torch.bincount(self.train_ids, minlength=self.vocab_size).double() + 1.0
        log_probs = (counts / counts.sum()).log()
        return math.exp(-float(log_probs[self.val_ids].mean()))

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def train_dataloader(self) -> DataLoader:
        windows = _Windows(self.train_ids, self.block_size)
        sampler = RandomSampler(
            windows,
            replacement=True,
            num_samples=self.train_batches_per_epoch * self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),  # the same windows in every run with this seed
        )
        return DataLoader(windows, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """The first ``val_batches`` batches of non-overlapping windows of the split ``val_split`` names."""
        ids = self.tuning_ids if self.val_split == "tuning" else self.val_ids
        starts = torch.arange(0, len(ids) - self.block_size, self.block_size)
        windows = _Windows(ids, self.block_size, starts[: self.val_batches * self.batch_size])
        return DataLoader(windows, batch_size=self.batch_size, num_workers=self.num_workers)


def _code_points(text: str) -> Tensor:
    """The Unicode code points of ``text`` as int64, without a Python loop over characters."""
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, channels = x.shape
        q, k, v = (
            t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(channels, dim=2)
        )
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, time, channels)))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(L.LightningModule):
    """A small GPT over character ids; ``vocab_size`` and ``block_size`` must match the data (the CLI links them)."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        tie_weights: bool = True,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        optimizer: OptimizerName = "adamw",
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if vocab_size < 2 or block_size < 1 or n_layer < 1 or warmup_steps < 0:
            raise ValueError("vocab_size must be at least 2, block_size and n_layer at least 1, warmup_steps >= 0")
        self.save_hyperparameters()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(n_embd, n_head, dropout) for _ in range(n_layer)))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):  # residual projections, as in GPT-2
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        self.val_loss_mean = MeanMetric()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``(batch, time, vocab_size)`` for ids ``(batch, time)``, ``time <= block_size``."""
        time = ids.shape[1]
        if time > self.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size {self.block_size}")
        positions = torch.arange(time, device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))
        return self.head(self.ln_f(self.blocks(x)))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_loss_mean.update(self._loss(batch), weight=batch[1].numel())  # mean over characters

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss_mean.compute()
        self.val_loss_mean.reset()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_ppl", loss.exp(), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and not _is_embedding(self, p)]
        no_decay = [p for p in params if all(p is not q for q in decay)]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        betas = tuple(hp.betas)
        optimizer: torch.optim.Optimizer
        if hp.optimizer == "schedulefree_adamw":
            from schedulefree import AdamWScheduleFree

            # its warm-up is its own and it needs no schedule: the lr stays hp.lr after the warm-up
            return {"optimizer": AdamWScheduleFree(groups, lr=hp.lr, betas=betas, warmup_steps=hp.warmup_steps)}
        if hp.optimizer == "nadam":
            optimizer = torch.optim.NAdam(groups, lr=hp.lr, betas=betas, decoupled_weight_decay=True)
        elif hp.optimizer == "lookahead_adamw":
            from pytorch_optimizer import Lookahead

            optimizer = Lookahead(torch.optim.AdamW(groups, lr=hp.lr, betas=betas), k=5, alpha=0.5)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=betas)
        total = self.trainer.estimated_stepping_batches
        schedule = functools.partial(
            _warmup_cosine,
            warmup_steps=hp.warmup_steps,
            total_steps=int(total) if math.isfinite(total) else None,
            min_ratio=hp.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_free(self) -> dict[int, Any]:
        """The trainer's optimizers that have schedule-free's ``train()``/``eval()`` modes, by their index: they hold
        y (the gradient point) in the parameters while training and x (the average) otherwise."""
        return {
            index: optimizer
            for index, optimizer in enumerate(self.trainer.optimizers)
            if "train_mode" in optimizer.param_groups[0] and callable(getattr(optimizer, "eval", None))
        }

    def on_train_start(self) -> None:
        for optimizer in self._schedule_free().values():
            optimizer.train()

    def on_validation_start(self) -> None:
        for optimizer in self._schedule_free().values():
            optimizer.eval()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:  # back to training
            for optimizer in self._schedule_free().values():
                optimizer.train()

    def on_train_end(self) -> None:
        for optimizer in self._schedule_free().values():  # the trained model is x
            optimizer.eval()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved while training holds x with the optimizer in eval mode (``train()`` at the start of a
        resumed fit moves the parameters back to y); the run itself goes on in train mode."""
        training = {i: opt for i, opt in self._schedule_free().items() if opt.param_groups[0]["train_mode"]}
        if not training:
            return
        for optimizer in training.values():
            optimizer.eval()
        # collected again at x, and copied: the state dict shares storage with the parameters, which train() moves
        checkpoint["state_dict"] = {
            key: value.clone() for key, value in self.trainer.strategy.lightning_module_state_dict().items()
        }
        states = checkpoint.get("optimizer_states")  # absent from a weights-only checkpoint
        for index, optimizer in training.items():
            if states is not None:
                for group in states[index]["param_groups"]:
                    group["train_mode"] = False
            optimizer.train()


def _is_embedding(module: nn.Module, param: Tensor) -> bool:
    return any(param is m.weight for m in module.modules() if isinstance(m, nn.Embedding))


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """The LR factor at ``step``: linear warm-up to 1, then cosine to ``min_ratio`` at ``total_steps`` (held after;
    constant 1 after the warm-up when the number of steps is unknown)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CharGPTCLI(LightningCLI):
    """LightningCLI that takes the model's vocabulary size and context length from the data module."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.block_size", "model.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def after_fit(self) -> None:
        """Print the final validation next to the unigram baseline (``fit`` subcommand only)."""
        metrics = self.trainer.callback_metrics
        if self.trainer.is_global_zero and "val_ppl" in metrics:
            print(
                f"final val_loss={float(metrics['val_loss']):.4f} val_ppl={float(metrics['val_ppl']):.3f} "
                f"(unigram val_ppl={self.datamodule.unigram_perplexity():.3f})"
            )


def make_cli(args: list[str] | None = None, run: bool = True) -> CharGPTCLI:
    """The example's CLI: ``args`` as on the command line (``sys.argv`` if None); ``run=False`` parses and
    instantiates only (no subcommand then). Writes no config file."""
    return CharGPTCLI(CharGPT, CharTextDataModule, args=args, run=run, save_config_callback=None)


def _override_flag(key: str, value: Any) -> str:
    """``--group.key=value`` for a model, data or Trainer argument; a dotted ``key`` names its group itself."""
    if "." not in key:
        groups = [
            group
            for group, target in (("model", CharGPT), ("data", CharTextDataModule), ("trainer", L.Trainer))
            if key in inspect.signature(target.__init__).parameters
        ]
        if len(groups) != 1:
            raise TypeError(f"train() got an unknown or ambiguous override {key!r} (in {groups or 'no group'})")
        key = f"{groups[0]}.{key}"
    if isinstance(value, str):  # as typed: a quoted string is not a Literal's value
        return f"--{key}={value}"
    return f"--{key}={json.dumps(value)}"  # JSON is YAML, which is how the CLI parses values


def train(
    xgrad_steps: int | None,
    seed: int = 0,
    max_epochs: int | None = None,
    progress_bar: bool = True,
    **overrides: Any,
) -> dict[str, float]:
    """Train once with ``configs/char_gpt.yaml``, with ``XGradCallback(steps=xgrad_steps)`` unless it is None;
    return the final ``val_loss`` and ``val_ppl``.

    ``seed`` seeds the weights and the data order; ``max_epochs`` None keeps the config's. ``overrides`` set model,
    data or Trainer arguments by name (``lr=1e-3``, ``block_size=32``, ``limit_val_batches=2``; dotted names such as
    ``**{"trainer.max_steps": 10}`` also work).
    """
    quiet()
    args = [
        f"--config={CONFIG}",
        f"--seed_everything={seed}",
        f"--data.seed={seed}",
        f"--trainer.enable_progress_bar={json.dumps(progress_bar)}",
    ]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    args += [_override_flag(key, value) for key, value in overrides.items()]
    if xgrad_steps is not None:
        args += ["--trainer.callbacks+=lightning_xgrad.XGradCallback", f"--trainer.callbacks.steps={xgrad_steps}"]
    with warnings.catch_warnings():  # args given while sys.argv holds the caller's own: intended here
        warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
        cli = make_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {name: float(cli.trainer.callback_metrics[name]) for name in ("val_loss", "val_ppl")}


if __name__ == "__main__":
    quiet()
    make_cli()
