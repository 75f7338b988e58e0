"""The methods compared, the learning-rate grid, and the arms of the two phases: tuning and the seeds.

Every method trains the char-GPT with the config's recipe (its parameter groups, betas (0.9, 0.99), weight decay 0.1
on matrices, warm-up then cosine to 0.1 x lr) and differs only in the optimizer (``--model.optimizer``, see
``examples/char_gpt.py``): AdamW (the reference), NAdam with decoupled weight decay, schedule-free AdamW (its own
warm-up, no schedule) and Lookahead (k=5, alpha=0.5) over AdamW. XGrad composes with each: the adam rule for AdamW,
the trajectory rule for the others (``OptimizerPredictor(optimizer).describe()``).

Tuning: every arm (method, with or without XGrad) at every lr of the grid, seed 0, ``tune_epochs`` epochs with the
schedule shrunk to that length (the warm-up keeps its fraction of the run), trained without the tuning split and
validated on it. Seeds: every arm at its own best lr for the full run, validated on the reported split.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from benchmarks.arms import Arm
from benchmarks.convergence import CONFIGS, TASKS

#: the methods by their ``--model.optimizer`` name, and their labels; the first is the reference
METHODS: dict[str, str] = {
    "adamw": "AdamW",
    "nadam": "NAdam",
    "schedulefree_adamw": "schedule-free AdamW",
    "lookahead_adamw": "Lookahead AdamW",
}
REFERENCE = "adamw"
#: the lr grid: half-decade steps over 30x, so that schedule-free's larger best lr is inside it
GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
QUICK_GRID: tuple[float, ...] = (1e-3, 1e-2)
#: the fraction of every module's text held out as the tuning split
TUNING_FRACTION = 0.1


def _config() -> dict:
    return yaml.safe_load((CONFIGS / TASKS["char_gpt"].config).read_text())


@dataclass(frozen=True)
class Schedule:
    """How long a run trains (``epochs`` of ``batches`` batches) and its warm-up, a fixed fraction of the run."""

    epochs: int
    batches: int
    warmup_fraction: float

    @classmethod
    def of_config(cls, epochs: int | None = None, batches: int | None = None) -> Schedule:
        """The config's schedule (its warm-up fraction: 100 of 1,000 steps), ``epochs`` and ``batches`` if given."""
        config = _config()
        config_batches = config["data"]["train_batches_per_epoch"]
        config_steps = config["trainer"]["max_epochs"] * config_batches
        return cls(
            epochs or config["trainer"]["max_epochs"],
            batches or config_batches,
            config["model"]["warmup_steps"] / config_steps,
        )

    @property
    def steps(self) -> int:
        return self.epochs * self.batches

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.steps))

    def flags(self) -> tuple[str, ...]:
        return (
            f"--trainer.max_epochs={self.epochs}",
            f"--data.train_batches_per_epoch={self.batches}",
            f"--model.warmup_steps={self.warmup_steps}",
        )


def arm_key(method: str, xgrad: bool) -> str:
    return f"{method}-xgrad" if xgrad else method


def arm_label(method: str, xgrad_steps: int) -> str:
    return f"{METHODS[method]} + XGrad s={xgrad_steps}" if xgrad_steps else METHODS[method]


def lr_key(lr: float) -> str:
    return f"lr{lr:g}"


def tuning_arm(method: str, xgrad_steps: int, lr: float, schedule: Schedule) -> Arm:
    """``method`` at ``lr`` for the tuning run: trained without the tuning split, validated on it."""
    flags = (
        f"--model.optimizer={method}",
        f"--model.lr={lr:g}",
        *schedule.flags(),
        f"--data.tuning_fraction={TUNING_FRACTION:g}",
        "--data.val_split=tuning",
    )
    key = f"{arm_key(method, bool(xgrad_steps))}/{lr_key(lr)}"
    return Arm(key, f"{arm_label(method, xgrad_steps)} lr {lr:g}", flags, xgrad_steps)


def seeds_arm(method: str, xgrad_steps: int, lr: float, schedule: Schedule) -> Arm:
    """``method`` at its picked ``lr`` for the reported runs: the whole training split, the reported validation."""
    flags = (f"--model.optimizer={method}", f"--model.lr={lr:g}", *schedule.flags())
    return Arm(arm_key(method, bool(xgrad_steps)), arm_label(method, xgrad_steps), flags, xgrad_steps)
