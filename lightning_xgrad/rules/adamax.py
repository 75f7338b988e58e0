"""Rule for torch's Adamax: dW = m_hat / u, the direction its update applies.

torch's Adamax keeps ``exp_avg`` (m) and ``exp_inf`` (u = max(b2 * u, |g| + eps)) and applies
``p -= lr / (1 - b1^k) * m / u``; L2 weight decay and ``maximize`` are already inside g, so inside m and u.
Step counts kept on an accelerator (capturable Adamax) are not read on the host: the bias corrections are then
computed there, as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._internal.adam_direction import bias_corrected_step_sizes
from .._internal.chunks import Chunks
from .._internal.scalars import one_minus_powers
from .base import PredictionRule


class AdamaxRule(PredictionRule):
    """torch.optim.Adamax (also capturable, with ``step`` on the accelerator: no host read)."""

    name = "adamax"
    step_column = 2

    def state_tensors(self, state: dict[str, Any]) -> tuple[Any, ...] | None:
        if "exp_avg" not in state or "exp_inf" not in state:
            return None
        return state["exp_avg"], state["exp_inf"], state["step"]

    def add_direction_(
        self, params: list[Tensor], columns: Sequence[Any], group: dict[str, Any], alpha: float, chunks: Chunks
    ) -> None:
        exp_avgs, exp_infs, steps = columns
        beta1 = float(group["betas"][0])
        if steps.host_readable:
            step_sizes = bias_corrected_step_sizes(alpha, beta1, steps.floats())
            torch._foreach_addcdiv_(params, exp_avgs, exp_infs, step_sizes)  # in place, no temporaries: one call
            return
        if alpha == 0:
            return
        # (1 - b1^k) / alpha per tensor, on the device: the divisor that turns m / u into alpha * m / (bc1 * u)
        divisors = one_minus_powers(beta1, steps.tensors)
        torch._foreach_div_(divisors, alpha)
        for part in chunks:
            denom = torch._foreach_mul(exp_infs[part], divisors[part])
            torch._foreach_addcdiv_(params[part], exp_avgs[part], denom)
            del denom  # one chunk of temporaries alive at a time
