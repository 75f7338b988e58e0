"""XGrad in a Lightning Fabric loop: rules see through Fabric's and Lightning's optimizer wrappers, and
``examples/fabric_loop.py`` trains exactly as the plain-PyTorch reference in ``tests/reference.py`` does.

The example runs in-process for one device (32-true, bf16-mixed, 16-mixed with a CPU GradScaler) and as a real
2-process DDP run (gloo) through its command line; the reference replays the same batches with the same initial
weights. The reference without XGrad must end far from both, so a loop that stopped predicting cannot pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from lightning_xgrad import OptimizerPredictor
from lightning_xgrad.rules import rule_for

from .agreement import ATOL, RTOL, SEPARATION
from .reference import xgrad_reference
from .toolkit import load_example, make_net

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH, SEED = 2, 64, 0
# Agreement (tests/agreement.py): float32 rounding of the prediction formula (foreach vs per tensor), compounded
# over ~46 steps.
#: Under fp16 autocast the package's W_hat, one float32 ulp away from the reference's in about 5% of the elements
#: (its foreach Adam formula rounds differently), sometimes rounds to another float16 weight in the forward pass:
#: measured 4.9e-6 after 46 steps (the first jump at step 8), while the baselines without XGrad agree bit for bit
#: and XGrad moves the weights by 2.2e-2 (the trajectory rule in place of the Adam rule ends 5e-5 away).
TOLERANCES = {"16-mixed": {"rtol": 0.0, "atol": 1.5e-5}}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@cache
def example() -> Any:
    return load_example("fabric_loop")


def flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# ------------------------------------------------------------------------------------------------- rule lookup
class UserAdamW(torch.optim.AdamW):
    """A subclass a user wrote: it may change the update, so it must keep the trajectory rule."""


class WrapperLookalike(torch.optim.AdamW):
    """Not a known wrapper, even though it has an ``optimizer`` attribute: never unwrapped."""

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self.optimizer = torch.optim.AdamW(make_net(1).parameters())


def fabric_optimizer(optimizer_class: type, **kwargs: Any) -> Any:
    fabric = Fabric(accelerator="cpu", devices=1)
    net = make_net()
    _, optimizer = fabric.setup(net, optimizer_class(net.parameters(), **kwargs))
    return optimizer


def test_fabric_wrapper_gets_the_rule_of_the_optimizer_inside() -> None:
    wrapped = fabric_optimizer(torch.optim.AdamW, lr=0.01)
    assert type(wrapped).__name__ == "FabricAdamW" and type(wrapped) is not torch.optim.AdamW
    assert rule_for(wrapped) is not None and rule_for(wrapped).name == "adam"
    predictor = OptimizerPredictor(wrapped)
    assert predictor.optimizer is wrapped.optimizer  # state and param groups are read from the real optimizer
    assert predictor.describe() == "adam"


def test_lightning_optimizer_gets_the_rule_of_the_optimizer_inside() -> None:
    inner = torch.optim.SGD(make_net().parameters(), lr=0.1, momentum=0.9)
    wrapped = LightningOptimizer(inner)
    assert type(wrapped).__name__ == "LightningSGD"
    assert OptimizerPredictor(wrapped).describe() == "sgd_momentum"
    assert OptimizerPredictor(wrapped).optimizer is inner


def test_a_user_subclass_keeps_the_trajectory_rule_wrapped_or_not() -> None:
    assert OptimizerPredictor(UserAdamW(make_net().parameters())).describe() == "trajectory"
    assert OptimizerPredictor(fabric_optimizer(UserAdamW)).describe() == "trajectory"
    lookalike = WrapperLookalike(make_net().parameters())
    predictor = OptimizerPredictor(lookalike)
    assert predictor.optimizer is lookalike and predictor.describe() == "trajectory"


def test_fabric_predictor_predicts_from_the_wrapped_state() -> None:
    """One predict() through the wrapper writes W - lr * m_hat / (sqrt(v_hat) + eps), computed here by hand."""
    wrapped = fabric_optimizer(torch.optim.Adam, lr=0.01)
    params = [p for group in wrapped.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    wrapped.step()
    real = [p.detach().clone() for p in params]
    OptimizerPredictor(wrapped, steps=2).predict()
    for p, w in zip(params, real, strict=True):
        state = wrapped.optimizer.state[p]
        m_hat = state["exp_avg"].double() / (1 - 0.9)
        v_hat = state["exp_avg_sq"].double() / (1 - 0.999)
        expected = w.double() - 2 * 0.01 * m_hat / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------- the example vs the reference
def loss_fn(precision: str) -> Any:
    """Cross-entropy as Fabric computes it: inputs cast and the forward autocast under mixed precision, logits
    back to float32, the loss outside autocast. A DDP batch is one (x, y) per rank: DDP averages the ranks' means."""

    def one(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        dtype = AUTOCAST.get(precision)
        if dtype is None:
            return F.cross_entropy(net(x), y)
        with torch.autocast("cpu", dtype=dtype):
            logits = net(x.to(dtype))
        return F.cross_entropy(logits.float(), y)

    def loss(net: nn.Module, batch: list[tuple[Tensor, Tensor]]) -> Tensor:
        return torch.stack([one(net, x, y) for x, y in batch]).mean()

    return loss


def single_process_batches(epoch: int) -> list[list[tuple[Tensor, Tensor]]]:
    """The example's shuffled loader, epoch by epoch (its generator advances once per epoch)."""
    return _single_process_epochs()[epoch]


@cache
def _single_process_epochs() -> list[list[list[tuple[Tensor, Tensor]]]]:
    train_set, _ = example().digits_datasets(SEED)
    loader = example().train_loader(train_set, BATCH, SEED)
    return [[[batch] for batch in loader] for _ in range(EPOCHS)]


def ddp_batches(epoch: int, world_size: int = 2) -> list[list[tuple[Tensor, Tensor]]]:
    """What Fabric gives each rank under DDP: a DistributedSampler(shuffle=True, seed=the seed) at this epoch."""
    train_set, _ = example().digits_datasets(SEED)
    per_rank = []
    for rank in range(world_size):
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=SEED)
        sampler.set_epoch(epoch)
        indices = torch.tensor(list(sampler))
        per_rank.append([train_set[indices[i : i + BATCH]] for i in range(0, len(indices), BATCH)])
    return [list(step) for step in zip(*per_rank, strict=True)]


def reference(
    precision: str, batches: Any, steps: int | None = 1, rule: str = "auto", optimizer_name: str = "adamw"
) -> Tensor:
    ex = example()
    net = ex.make_model(SEED)
    optimizer = ex.make_optimizer(optimizer_name, net.parameters(), ex.DEFAULT_LR[optimizer_name])
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    xgrad_reference(net, optimizer, batches, loss_fn(precision), steps, rule=rule, epochs=EPOCHS, scaler=scaler)
    return flat(net)


def run_example(precision: str, steps: int, rule: str = "auto", optimizer_name: str = "adamw") -> Tensor:
    result = example().train(
        steps=steps,
        rule=rule,
        optimizer_name=optimizer_name,
        epochs=EPOCHS,
        batch_size=BATCH,
        precision=precision,
        quiet=True,
    )
    assert result["optimizer_steps"] == EPOCHS * len(_single_process_epochs()[0])
    return flat(result["module"])


@pytest.mark.parametrize(
    ("precision", "rule", "optimizer_name"),
    [
        ("32-true", "auto", "adamw"),
        ("32-true", "auto", "sgd"),
        ("32-true", "trajectory", "adamw"),
        ("bf16-mixed", "auto", "adamw"),
        ("16-mixed", "auto", "adamw"),
    ],
)
def test_example_matches_the_reference(precision: str, rule: str, optimizer_name: str) -> None:
    got = run_example(precision, steps=1, rule=rule, optimizer_name=optimizer_name)
    expected = reference(precision, single_process_batches, rule=rule, optimizer_name=optimizer_name)
    tolerance = TOLERANCES.get(precision, {"rtol": RTOL, "atol": ATOL})
    torch.testing.assert_close(got, expected, **tolerance)
    # XGrad acted: the reference without prediction (the example's --steps 0, see below) ends far away
    baseline = reference(precision, single_process_batches, steps=None, optimizer_name=optimizer_name)
    effect = float((baseline - expected).abs().max())
    bound = tolerance["atol"] + tolerance["rtol"] * float(expected.abs().max())
    assert effect > SEPARATION * bound, f"XGrad moved the weights by only {effect:.3g}"


def test_example_without_xgrad_is_the_reference_without_xgrad_bit_for_bit() -> None:
    """The loops agree on everything but XGrad (data order, casts, autocast, loss scaling, unscaling, the step)."""
    assert torch.equal(run_example("16-mixed", steps=0), reference("16-mixed", single_process_batches, steps=None))


def test_example_16_mixed_on_cpu_is_fp16_with_a_grad_scaler() -> None:
    """The premise of the 16-mixed case: without the plugin, Fabric on CPU would switch "16-mixed" to bf16."""
    precision = example().make_fabric("cpu", 1, "auto", "16-mixed").strategy.precision
    assert precision.precision == "16-mixed"
    assert isinstance(precision.scaler, torch.amp.GradScaler)


def test_example_under_ddp_matches_the_reference(tmp_path: Path) -> None:
    """Two real processes (gloo): Fabric relaunches the example's command line; rank 0 saves the weights."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores
    save = tmp_path / "ddp.ckpt"
    command = [sys.executable, "examples/fabric_loop.py", "--devices", "2", "--strategy", "ddp"]
    command += ["--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--save", str(save)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"example failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    state = torch.load(save, weights_only=True)["model"]
    got = torch.cat([value.reshape(-1) for value in state.values()])
    expected = reference("32-true", ddp_batches)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    baseline = reference("32-true", ddp_batches, steps=None)
    assert float((baseline - expected).abs().max()) > SEPARATION * ATOL


def test_unscale_the_optimizer_inside_fabrics_wrapper_or_let_clip_gradients_do_it() -> None:
    """Why the example unscales ``optimizer.optimizer``: Fabric's step hands the optimizer inside to scaler.step, and
    the GradScaler remembers per optimizer object whether it unscaled already."""
    gradients = {}  # the gradient each way of unscaling leaves for the update; d/dw of the loss = 2 per weight
    for target in ("inside", "wrapper", "clip_gradients"):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
        net = nn.Linear(4, 1)
        model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=1.0))
        fabric.backward(model(torch.ones(2, 4)).sum())
        if target == "clip_gradients":  # unscales the optimizer inside; a norm bound that clips nothing
            fabric.clip_gradients(model, optimizer, max_norm=1e9)
        else:
            fabric.strategy.precision.unscale_gradients(optimizer.optimizer if target == "inside" else optimizer)
        optimizer.step()
        gradients[target] = net.weight.grad.clone()  # the gradient the update used (unscaled in place)
    assert torch.equal(gradients["inside"], torch.full((1, 4), 2.0))
    assert torch.equal(gradients["clip_gradients"], torch.full((1, 4), 2.0))
    assert torch.equal(gradients["wrapper"], torch.full((1, 4), 2.0 / 1024))  # divided by the scale twice


def test_example_has_a_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        example().main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--steps", "--optimizer", "--precision", "--devices", "--strategy", "--save"):
        assert option in out
