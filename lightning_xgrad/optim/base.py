"""What every optimizer of this package does the same way: the ``step()`` preamble and the step counters.

``step(closure)`` evaluates the closure with gradients enabled, then updates every param group without autograd,
each on the parameters that have a gradient (sparse ones refused); an optimizer writes only ``_update_group``. Step
counters are kept as torch's Adam keeps them (0-dim float tensors on the CPU), and the foreach implementation is
chosen as torch's optimizers choose it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .._internal.compat import foreach_by_default

__all__ = ["BaseOptimizer", "gradients", "increment_step_counts_", "use_foreach"]


class BaseOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose subclasses implement :meth:`_update_group` (or :meth:`_update`)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self) -> None:
        """Update every param group that has parameters with a gradient."""
        for group in self.param_groups:
            params = self._params_with_grad(group)
            if params:
                self._update_group(group, params)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Apply one step to ``params``, the parameters of ``group`` that have a gradient."""
        raise NotImplementedError

    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        """The parameters of ``group`` that have a gradient this step; a sparse gradient is refused."""
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; use dense ones (torch.optim.SparseAdam "
                    "takes sparse gradients)"
                )
            params.append(p)
        return params


def gradients(params: list[Tensor]) -> list[Tensor]:
    """The ``grad`` of each parameter, for parameters known to have one (:meth:`BaseOptimizer._params_with_grad`)."""
    return cast(list[Tensor], [p.grad for p in params])


def increment_step_counts_(step_counts: list[Tensor]) -> None:
    """Add 1 to every step counter, in one foreach op; counters on the CPU get a CPU tensor added rather than the
    scalar 1 wrapped once per tensor."""
    if step_counts[0].is_cpu:
        torch._foreach_add_(step_counts, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(step_counts, 1)


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """``foreach`` as given, or where torch's own optimizers would pick it (accelerators, not the CPU)."""
    return foreach_by_default(params) if foreach is None else foreach
