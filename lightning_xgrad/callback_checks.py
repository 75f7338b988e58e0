"""What XGradCallback refuses, and why: strategies under which the prediction or the restore could be lost, optimizers
it cannot predict correctly, and a second instance of itself. Each refusal says what to do instead."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ._internal.checkpoint import count_instances
from ._internal.sharding import model_parallel_unsupported
from .prediction.arguments import CLOSURE_REEVALUATING
from .prediction.predictor import OptimizerPredictor

__all__ = ["check_optimizers", "check_setup", "warn_without_step_hooks"]

_REFUSED_STRATEGIES: dict[type, str] = {
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
if (_no_model_parallel := model_parallel_unsupported()) is not None:  # a torch without DTensor
    _REFUSED_STRATEGIES[ModelParallelStrategy] = _no_model_parallel


def check_setup(trainer: Any, callback_class: type) -> None:
    """Refuse the Trainer's strategy where XGrad cannot work, and a second XGradCallback."""
    for strategy_class, reason in _REFUSED_STRATEGIES.items():
        if isinstance(trainer.strategy, strategy_class):
            raise MisconfigurationException(
                f"XGradCallback does not support {type(trainer.strategy).__name__}: {reason}"
            )
    count = count_instances(trainer, callback_class)
    if count > 1:
        raise MisconfigurationException(
            f"XGradCallback was added {count} times to the Trainer's callbacks; add it once (each would predict "
            "on top of the others). With LightningCLI this happens when the config already lists it and the "
            "command line appends another with `--trainer.callbacks+=lightning_xgrad.XGradCallback`: set the "
            "arguments of the one in the config instead (`init_args: {steps: 2}`), or remove it from the config."
        )


def check_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
    """Refuse what XGrad cannot predict correctly: closure re-evaluating optimizers, parameters in two optimizers."""
    for index, optimizer in enumerate(optimizers):
        if isinstance(optimizer, CLOSURE_REEVALUATING):
            raise MisconfigurationException(
                f"XGradCallback cannot be used with {type(optimizer).__name__} (optimizer {index}): it evaluates "
                "the closure several times per step, so the gradients would be taken at the real weights after "
                "the first evaluation. Use a first-order optimizer such as SGD, Adam or AdamW."
            )
    owner: dict[torch.Tensor, int] = {}
    for index, optimizer in enumerate(optimizers):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if owner.setdefault(p, index) != index:
                    raise MisconfigurationException(
                        f"XGradCallback: a parameter of shape {tuple(p.shape)} belongs to optimizers "
                        f"{owner[p]} and {index}; each parameter must belong to one optimizer, since each "
                        "optimizer's step restores its own parameters."
                    )


def warn_without_step_hooks(index: int, predictor: OptimizerPredictor, automatic: bool, measuring: bool) -> None:
    """What cannot work for an optimizer whose steps nothing sees (training itself is exact: Lightning restores in
    on_before_optimizer_step), where the run needs it: raw steps in manual optimization, the update metrics."""
    if predictor.guards_step:
        return
    lost = []
    if not automatic:
        lost.append(
            "a raw `optimizer.step()` can neither put the real weights back first nor be seen by the trajectory "
            "rule: in manual optimization, step it through the LightningOptimizer that `self.optimizers()` returns"
        )
    if measuring:
        lost.append("xgrad/prediction_cosine and xgrad/prediction_error cannot be measured for it")
    if lost:
        rank_zero_warn(
            f"XGradCallback: optimizer {index} ({type(predictor.optimizer).__name__}) runs no step hooks (it does not "
            f"call torch.optim.Optimizer.__init__, and wraps no optimizer that does), so {'; and '.join(lost)}."
        )
