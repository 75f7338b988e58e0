"""An independent plain-PyTorch reference of the XGrad training loop, written from the formulas alone.

It imports neither ``lightning_xgrad`` nor Lightning, works one tensor at a time and favours readability over speed,
so the callback can be checked against it: same initial weights and the same batches must give the same weights.

Per optimizer step t, with s = ``steps``:

0. ``on_window_start(t)``, if given, runs with the real weights in place (an edit of the weights or the optimizer's
   state there counts as made before the step began);
1. at the first micro-batch of the window, keep W_t and write W_hat = W_t - s * lr * dW_t into the parameters,
   where lr is the group's lr right now (after any scheduler step) and dW_t is read from the optimizer's state:

   - SGD with momentum, not nesterov: dW = momentum_buffer;
   - Adam / AdamW: dW = m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^k), v_hat = v / (1 - b2^k), k the step
     count in the state, v = max_exp_avg_sq with amsgrad; AdamW's decoupled decay is not part of dW;
   - RMSprop with momentum: dW = momentum_buffer;
   - anything else (SGD without momentum or nesterov, RMSprop without momentum, other optimizers) and every
     optimizer under ``rule="trajectory"``: the trajectory rule, lr * dW = W_{t-1} - W_t (the update the optimizer
     applied at its last step) rescaled by lr_now / lr_then, so W_hat = W_t + s * (lr_now / lr_then) * (W_t - W_{t-1});
     a group whose lr is not a number (``None``: optimizers with a relative step size) is not rescaled,
     W_hat = W_t + s * (W_t - W_{t-1}); an update applied with lr 0 gives no direction;

   a parameter without optimizer state (before its first step) is not predicted, and the trajectory rule needs one
   applied update, so it first predicts at the second optimizer step;
2. forward and backward at W_hat for every micro-batch of the window, each loss divided by ``accumulate`` as
   Lightning's ``accumulate_grad_batches`` does;
3. restore W_t, ``optimizer.step()``, ``optimizer.zero_grad()``, then ``scheduler.step()`` when one is given (a
   per-step schedule, Lightning's ``interval="step"``).

With a GradScaler (fp16 autocast), the textbook AMP loop of the torch documentation: the backward pass of the scaled
loss, ``scaler.unscale_``, then the restore of step 3, ``scaler.step`` (which skips the update on inf/nan
gradients) and ``scaler.update``. A skipped step still counts as the trajectory rule's last step: it applied no
update, so the next prediction is W_hat = W.

Windows follow Lightning: a step after every ``accumulate`` micro-batches of an epoch and on the epoch's last batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Batch = Any
LossFn = Callable[[nn.Module, Batch], Tensor]


def learning_rate(group: dict[str, Any]) -> float | None:
    """The group's lr as a number, or ``None`` when it is not one."""
    value = group["lr"]
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        return None
    return float(value)


def windows(num_batches: int, accumulate: int) -> list[list[int]]:
    """The batch indices of each optimizer step in one epoch, as Lightning groups them."""
    result: list[list[int]] = []
    current: list[int] = []
    for index in range(num_batches):
        current.append(index)
        if (index + 1) % accumulate == 0 or index == num_batches - 1:
            result.append(current)
            current = []
    return result


def state_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str:
    """The dW rule ``rule="auto"`` uses for a param group: ``"momentum"``, ``"adam"`` or ``"trajectory"``."""
    if isinstance(optimizer, torch.optim.SGD):
        if group["momentum"] > 0 and not group["nesterov"]:
            return "momentum"
        return "trajectory"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.RMSprop):
        return "momentum" if group["momentum"] > 0 else "trajectory"
    if isinstance(optimizer, torch.optim.Adamax):
        return "adamax"
    if isinstance(optimizer, torch.optim.RAdam):
        return "radam"
    return "trajectory"


def direction(rule: str, group: dict[str, Any], state: dict[str, Any]) -> Tensor:
    """dW per unit lr for one parameter from its optimizer state (the state must not be empty)."""
    if rule == "momentum":
        return state["momentum_buffer"]
    if rule == "adam":
        beta1, beta2 = group["betas"]
        k = float(state["step"])
        second = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        m_hat = state["exp_avg"] / (1 - beta1**k)
        v_hat = second / (1 - beta2**k)
        return m_hat / (v_hat.sqrt() + group["eps"])
    if rule == "adamax":  # Kingma & Ba, Algorithm 2: m_hat over the exponentially weighted infinity norm
        k = float(state["step"])
        return state["exp_avg"] / (1 - group["betas"][0] ** k) / state["exp_inf"]
    if rule == "radam":  # Liu et al. 2020, Algorithm 2; torch puts eps on sqrt(v), before the bias correction
        beta1, beta2 = group["betas"]
        k = float(state["step"])
        m_hat = state["exp_avg"] / (1 - beta1**k)
        rho_inf = 2 / (1 - beta2) - 1
        rho = rho_inf - 2 * k * beta2**k / (1 - beta2**k)
        if rho <= 5:
            return m_hat
        r = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
        return r * m_hat * (1 - beta2**k) ** 0.5 / (state["exp_avg_sq"].sqrt() + group["eps"])
    raise ValueError(f"no state rule {rule!r}")


def xgrad_reference(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch] | Callable[[int], Sequence[Batch]],
    loss_fn: LossFn,
    steps: int | None,
    accumulate: int = 1,
    scheduler: Any = None,
    rule: str = "auto",
    epochs: int = 1,
    scaler: torch.amp.GradScaler | None = None,
    on_window_start: Callable[[int], None] | None = None,
    on_update: Callable[[int, dict[Tensor, Tensor], dict[Tensor, Tensor]], None] | None = None,
) -> None:
    """Train ``net`` in place for ``epochs`` passes over ``batches`` with XGrad weight prediction.

    Args:
        net: the model; its parameters must be the ones ``optimizer`` holds.
        optimizer: a fresh ``torch.optim`` optimizer over ``net``'s parameters.
        batches: the micro-batches of one epoch, in order, replayed every epoch; or a function from the epoch index
            to that epoch's micro-batches (shuffled data).
        loss_fn: ``loss_fn(net, batch)`` returns the (undivided) loss of one micro-batch.
        steps: the number of future steps to predict (s); ``None`` trains the baseline without prediction.
        accumulate: micro-batches per optimizer step (Lightning's ``accumulate_grad_batches``).
        scheduler: stepped once after every optimizer step, if given.
        rule: ``"auto"`` (state rules where known, else the trajectory rule) or ``"trajectory"`` (everywhere).
        epochs: passes over ``batches``.
        scaler: a GradScaler for fp16 autocast (``loss_fn`` runs the autocast); ``None`` steps plainly.
        on_window_start: called with the optimizer step index t before each prediction (real weights in place).
        on_update: called after each optimizer step t (numbered from 1) with ``W_t`` and ``W_hat`` of every predicted
            parameter (two dicts keyed by the parameter, whose value is now the updated ``W_{t+1}``).
    """
    if rule not in ("auto", "trajectory"):
        raise ValueError(f"unknown rule {rule!r}")
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise NotImplementedError("the reference does not model maximize=True")

    # The trajectory rule's memory: W_{t-1} (the weights before the last step) and lr_then (that step's lr).
    previous: dict[Tensor, Tensor] = {}
    lr_then: dict[Tensor, float | None] = {}

    t = 0
    for epoch in range(epochs):
        epoch_batches = batches(epoch) if callable(batches) else batches
        for window in windows(len(epoch_batches), accumulate):
            if on_window_start is not None:
                on_window_start(t)
            t += 1
            # 1. predict
            real: dict[Tensor, Tensor] = {}
            predicted: dict[Tensor, Tensor] = {}
            if steps is not None:
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        group_rule = "trajectory" if rule == "trajectory" else state_rule(optimizer, group)
                        lr_now = learning_rate(group)
                        for p in group["params"]:
                            if group_rule == "trajectory":
                                if p not in previous or lr_then[p] == 0:
                                    continue
                                ratio = 1.0 if lr_now is None or lr_then[p] is None else lr_now / lr_then[p]
                                w_hat = p + steps * ratio * (p - previous[p])
                            else:
                                state = optimizer.state[p]
                                if not state:
                                    continue
                                w_hat = p - steps * lr_now * direction(group_rule, group, state)
                            real[p] = p.detach().clone()
                            p.copy_(w_hat)
                            predicted[p] = p.detach().clone()

            # 2. forward and backward at W_hat
            for index in window:
                loss = loss_fn(net, epoch_batches[index]) / accumulate
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)

            # 3. restore, step
            with torch.no_grad():
                for p, value in real.items():
                    p.copy_(value)
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        previous[p] = p.detach().clone()
                        lr_then[p] = learning_rate(group)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            if on_update is not None:
                on_update(t, real, predicted)
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
