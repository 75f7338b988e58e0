"""XGradCallback: Lightning's lifecycle around weight prediction - when to predict, when to restore.

At the first micro-batch of every optimizer step the callback writes ``W_hat = W - steps * lr * dW`` into the
module, forward and backward run there, and ``on_before_optimizer_step`` (after AMP unscaling, before clipping and
the update) puts the real weights back, so the optimizer updates W with the gradient taken at W_hat. Predicted
weights never leave a training step: validation, checkpoints (through a ``state_dict`` hook, so weights-only and
mid-window saves too), exceptions and the end of fit all see the real weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._validation import check_int
from .predictor import CLOSURE_REEVALUATING, OptimizerPredictor, RuleChoice, check_prediction_args
from .sharding import DTensor, ranks_holding
from .snapshot import ParameterSnapshot

_REFUSED_STRATEGIES = {
    FSDPStrategy: (
        "outside forward its parameters are views of flat shards, and changes written through them may not persist "
        "(pytorch issue 117742), so the prediction and the restore could be silently lost. Use "
        "ModelParallelStrategy with `fully_shard` (FSDP2) in `configure_model`: XGrad predicts its DTensor shards "
        "locally, with no communication."
    ),
    DeepSpeedStrategy: (
        "its optimizer is a ZeRO wrapper over flat fp32 partitions and it accumulates gradients itself, so the "
        "module's parameters are not what the optimizer updates. Use ModelParallelStrategy with `fully_shard` "
        "(FSDP2) or strategy='ddp'."
    ),
}


def _register_state_dict_post_hook(module: torch.nn.Module, hook: Callable[..., None]) -> RemovableHandle:
    """torch >= 2.5 names it ``register_state_dict_post_hook``; earlier releases have the same hook, private."""
    register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    return register(hook)


class XGradCallback(Callback):
    r"""Train with gradients taken at predicted future weights (XGrad, Guan et al., TPAMI 2024).

    Works with the optimizer(s) the LightningModule configures. dW comes from the optimizer's own state where
    a rule knows it (SGD with momentum, Adam, AdamW, RMSprop with momentum), otherwise from the update the optimizer
    applied at its last step (the trajectory rule, exact for any optimizer).

    Args:
        steps: how many future updates to predict (the paper's s).
        rule: ``"auto"`` uses the optimizer's state where a rule is registered, else the trajectory rule;
            ``"trajectory"`` uses the trajectory rule for every optimizer.
        start_step: no prediction before this global step.
        log_every_n_steps: log ``xgrad/relative_shift`` (``||W_hat - W|| / ||W||``) every n optimizer steps;
            ``None`` logs nothing.
        compile: snapshot and predict in one ``torch.compile``d pass per tensor instead of several eager foreach
            passes, for the Adam, AdamW, AdaM3 and momentum rules (others stay eager). Costs a compilation at the
            first predicted step (seconds, up to a minute on a small CPU; inductor caches it for later runs), so it
            is off by default; see benchmarks/results/overhead.md for what it saves.

    Example::

        trainer = Trainer(callbacks=[XGradCallback(steps=1)])
    """

    def __init__(
        self,
        steps: int = 1,
        rule: RuleChoice = "auto",
        start_step: int = 0,
        log_every_n_steps: int | None = None,
        compile: bool = False,
    ) -> None:
        check_prediction_args("XGradCallback", steps, rule, compile)  # the predictor's checks and messages
        check_int("XGradCallback", "start_step", start_step, minimum=0)
        check_int("XGradCallback", "log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        self.steps = steps
        self.rule: RuleChoice = rule
        self.start_step = start_step
        self.log_every_n_steps = log_every_n_steps
        self.compile = compile
        self._snapshot = ParameterSnapshot()
        self._predictors: dict[int, OptimizerPredictor] = {}
        self._loaded_state: dict[str, Any] | None = None
        self._hook_handles: list[RemovableHandle] = []
        self._window_open = False  # between an optimizer step's first micro-batch and its update

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for strategy_class, reason in _REFUSED_STRATEGIES.items():
            if isinstance(trainer.strategy, strategy_class):
                raise MisconfigurationException(
                    f"XGradCallback does not support {type(trainer.strategy).__name__}: {reason}"
                )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, optimizer in enumerate(trainer.optimizers):
            if isinstance(optimizer, CLOSURE_REEVALUATING):
                raise MisconfigurationException(
                    f"XGradCallback cannot be used with {type(optimizer).__name__} (optimizer {index}): it evaluates "
                    "the closure several times per step, so the gradients would be taken at the real weights after "
                    "the first evaluation. Use a first-order optimizer such as SGD, Adam or AdamW."
                )
        owner: dict[torch.Tensor, int] = {}
        for index, optimizer in enumerate(trainer.optimizers):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if owner.setdefault(p, index) != index:
                        raise MisconfigurationException(
                            f"XGradCallback: a parameter of shape {tuple(p.shape)} belongs to optimizers "
                            f"{owner[p]} and {index}; each parameter must belong to one optimizer, since each "
                            "optimizer's step restores its own parameters."
                        )
        self._predictors = {
            id(optimizer): OptimizerPredictor(optimizer, self.steps, self.rule, self._snapshot, self.compile)
            for optimizer in trainer.optimizers
        }
        # Callbacks that rescale each update elementwise (CPropCallback) share their live scales, so the prediction
        # follows the update the optimizer will really apply.
        for callback in trainer.callbacks:
            provider = getattr(callback, "xgrad_direction_scales", None)
            if callable(provider):
                for optimizer in trainer.optimizers:
                    self._predictors[id(optimizer)].direction_scales = provider(optimizer)
        # after configure_model and the strategy's setup: the final modules, and FSDP2's DTensor parameters
        self._register_state_dict_hooks(pl_module)
        for index, optimizer in enumerate(trainer.optimizers):
            self._hook_handles.append(optimizer.register_step_pre_hook(self._restore_before_raw_step))
            self._hook_handles.append(optimizer.register_step_post_hook(self._check_stepped_real_weights(index)))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first hook where a resumed optimizer's state is in place (loaded after on_fit_start).
        predictors = list(self._predictors.values())
        if self._loaded_state is not None:
            for predictor, state in zip(predictors, self._loaded_state.get("optimizers", []), strict=False):
                predictor.load_state_dict(state)
            self._loaded_state = None
        for predictor in predictors:
            predictor.invalidate()
        for index, optimizer in enumerate(trainer.optimizers):
            rule = self._predictors[id(optimizer)].describe()
            rank_zero_info(
                f"XGradCallback: optimizer {index} ({type(optimizer).__name__}) predicts with the {rule} rule, "
                f"steps={self.steps}"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._restore_all(stepped=False)
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._predictors = {}
        self._snapshot.clear()

    # ------------------------------------------------------------------ the step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_open:  # a later micro-batch of the window; carry on after a validation if one ran
            for predictor in self._predictors.values():
                predictor.resume()
            return
        self._window_open = True
        enabled = trainer.global_step >= self.start_step
        predicted = False
        for predictor in self._predictors.values():
            predicted |= predictor.predict(enabled)
        if predicted and self._should_log(trainer):
            shift, norm = self._shift_norms()
            pl_module.log("xgrad/relative_shift", shift / norm.clamp_min(1e-30), on_step=True, on_epoch=False)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._restore_for_step(optimizer)

    def restore_real_weights(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the real weights of ``optimizer``'s parameters back now, ahead of its update (idempotent).

        For other callbacks that read the weights in ``on_before_optimizer_step`` (CPropCallback): calling this
        first makes them independent of the order of the callback list.
        """
        self._restore_for_step(optimizer)

    def _restore_for_step(self, optimizer: torch.optim.Optimizer) -> None:
        # With several optimizers (manual optimization) each step restores its own optimizer's parameters; the
        # others keep their prediction until they step or the batch ends.
        predictor = self._predictors.get(id(optimizer))
        if predictor is not None:
            predictor.restore(stepped=True)
        self._window_open = any(p.phase != "idle" for p in self._predictors.values())

    def _restore_before_raw_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """A step with no closure has its gradients already (a raw ``optimizer.step()`` in manual optimization, or
        AMP's ``scaler.step`` after on_before_optimizer_step): the real weights go back first. Lightning's own steps
        carry a closure that runs the forward pass, so those wait for on_before_optimizer_step."""
        if kwargs.get("closure", args[1] if len(args) > 1 else None) is None:  # args[0] is the optimizer
            self._restore_for_step(optimizer)

    def _check_stepped_real_weights(self, index: int) -> Callable[..., None]:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            predictor = self._predictors.get(id(optimizer))
            if predictor is not None and predictor.phase != "idle":
                raise RuntimeError(
                    f"XGradCallback: optimizer {index} ({type(optimizer).__name__}) stepped while its parameters "
                    "held predicted weights, so its update would be lost at the restore. Step it through the "
                    "LightningOptimizer that `self.optimizers()` returns, or call `optimizer.step()` without a "
                    "closure after the backward pass."
                )

        return hook

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A batch that ends the window but where an optimizer did not step (manual optimization that skips one,
        # an overridden optimizer_step that skips): the window is over, so the prediction must not outlive it.
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self._restore_all(stepped=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_all(stepped=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_all(stepped=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for predictor in self._predictors.values():
            predictor.suspend()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_all(stepped=False)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "rule": self.rule,
            "optimizers": [predictor.state_dict() for predictor in self._predictors.values()],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Runs before the optimizers exist: applied in on_train_start.
        self._loaded_state = state_dict

    def _register_state_dict_hooks(self, pl_module: pl.LightningModule) -> None:
        """Make every ``state_dict()`` of the module report the real weights while a prediction is in place."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = [
            _register_state_dict_post_hook(module, self._real_weights_hook())
            for module in pl_module.modules()
            if any(True for _ in module.parameters(recurse=False))
        ]

    def _real_weights_hook(self) -> Callable[..., None]:
        def hook(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
            real = self._real_values()
            if not real:
                return
            for name, param in module._parameters.items():
                key = prefix + name
                value = real.get(param) if param is not None else None
                if value is None or key not in state_dict or state_dict[key] is param:  # keep_vars keeps vars
                    continue
                if isinstance(param, DTensor):
                    value = DTensor.from_local(
                        value,
                        param.device_mesh,
                        param.placements,
                        run_check=False,
                        shape=param.shape,
                        stride=param.stride(),
                    )
                state_dict[key] = value.detach()

        return hook

    def _real_values(self) -> dict[Tensor, Tensor]:
        return {p: real for predictor in self._predictors.values() for p, _, real in predictor.predicted_params()}

    # ------------------------------------------------------------------ helpers
    def _restore_all(self, stepped: bool) -> None:
        for predictor in self._predictors.values():
            predictor.restore(stepped=stepped)
        self._window_open = False

    def _should_log(self, trainer: pl.Trainer) -> bool:
        return self.log_every_n_steps is not None and trainer.global_step % self.log_every_n_steps == 0

    @torch.no_grad()
    def _shift_norms(self) -> tuple[Tensor, Tensor]:
        triples = [t for predictor in self._predictors.values() for t in predictor.predicted_params()]
        predicted = [local for _, local, _ in triples]
        real = [value for _, _, value in triples]
        shift = torch.stack([d.float().square().sum() for d in torch._foreach_sub(predicted, real)])
        norm = torch.stack([r.float().square().sum() for r in real])
        if any(isinstance(p, DTensor) for p, _, _ in triples) and torch.distributed.is_initialized():
            # Sum the local shards over ranks (logging steps only), counting replicated elements once.
            weights = torch.tensor([1.0 / ranks_holding(p) for p, _, _ in triples], device=shift.device)
            squares = torch.stack([(shift * weights).sum(), (norm * weights).sum()])
            torch.distributed.all_reduce(squares)
        else:
            squares = torch.stack([shift.sum(), norm.sum()])
        return squares[0].sqrt(), squares[1].sqrt()
