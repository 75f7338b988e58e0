"""What a step costs as the model grows: ATen calls, temporaries, and the plan.

- Temporaries are chunked by a byte budget (``chunk_bytes``): every chunk of an out-of-place foreach op holds at most
  ``max(largest tensor, chunk_bytes)`` bytes, so the calls per ``predict()`` + ``restore()`` grow at most 2x from 40
  to 4000 small tensors for every rule (counted with the profiler: each top-level ATen call is a kernel launch or
  more on a GPU), and the transient memory stays within the budget (the profiler's allocation events).
- The plan is built once: a trainable parameter without optimizer state (a module unused in forward) is left out
  until its state appears, without a rebuild per step, and predicted from then on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_xgrad import OptimizerPredictor
from lightning_xgrad._internal.chunks import Chunks, budget_for, default_chunk_bytes
from lightning_xgrad.cprop import CPropAdam, CPropSGD
from lightning_xgrad.cprop.tracker import OptimizerConformity
from lightning_xgrad.heavy_ball import AdaptiveHeavyBallAdam, AdaptiveHeavyBallSGD
from lightning_xgrad.optim import AdaM3

from .toolkit import simulate_accelerator_step_counts

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

#: one optimizer per rule (and path through it), with how many steps it needs before the path is taken
RULES: dict[str, tuple[Factory, int]] = {
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True), 3),
    "rmsprop_momentum": (lambda p: torch.optim.RMSprop(p, lr=0.005, momentum=0.9, foreach=True), 3),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True), 3),
    "adam_amsgrad": (lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True, foreach=True), 3),
    "adamax": (lambda p: torch.optim.Adamax(p, lr=0.01, foreach=True), 3),
    # rho_k <= 5 for k <= 5: the bias-corrected momentum; rectified from k = 6 on
    "radam_momentum_phase": (lambda p: torch.optim.RAdam(p, lr=0.01, foreach=True), 3),
    "radam_rectified": (lambda p: torch.optim.RAdam(p, lr=0.01, foreach=True), 6),
    "nadam_trajectory": (lambda p: torch.optim.NAdam(p, lr=0.01, foreach=True), 3),
    "adam3": (lambda p: AdaM3(p, lr=0.01, foreach=True), 3),
    "cprop_sgd": (lambda p: CPropSGD(p, lr=0.05, momentum=0.9, foreach=True), 3),
    "cprop_adam": (lambda p: CPropAdam(p, lr=0.01, foreach=True), 3),
    "heavy_ball_sgd": (lambda p: AdaptiveHeavyBallSGD(p, lr=0.05), 3),
    "heavy_ball_adam": (lambda p: AdaptiveHeavyBallAdam(p, lr=0.01), 3),
}


def _params(n: int, numel: int = 16, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(n)
    return [nn.Parameter(torch.randn(numel, generator=g, dtype=dtype)) for _ in range(n)]


def _trained(factory: Factory, params: list[nn.Parameter], steps: int, **predictor_args: Any) -> OptimizerPredictor:
    """A predictor over ``factory(params)`` after ``steps`` updates with random gradients."""
    optimizer = factory(params)
    predictor = OptimizerPredictor(optimizer, **predictor_args)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        predictor.predict()
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        predictor.restore()
        optimizer.step()
    predictor.predict()  # the plan for the current state, built outside the measurement
    predictor.restore()
    return predictor


class _CallCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1  # the ops this one calls run below the mode: not counted
        return func(*args, **(kwargs or {}))


def aten_calls(step: Callable[[], Any]) -> int:
    """Top-level ATen calls ``step`` makes: each is a kernel launch or more on a GPU (ops called by other ops are not
    counted). What the profiler lists as top-level ``aten::`` events, less the composite no-ops (``aten::to`` to the
    same dtype) that launch nothing, counted with a dispatch mode: the profiler takes seconds over 4000 tensors."""
    counter = _CallCounter()
    with counter:
        step()
    return counter.calls


def transient_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes allocated inside ``step`` beyond what was allocated before it (the profiler's allocation and free
    events, summed in time order: what benchmarks/overhead/measure.py measures)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    live = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _predict_and_restore(predictor: OptimizerPredictor) -> Callable[[], None]:
    def step() -> None:
        assert predictor.predict()
        predictor.restore()

    return step


# ---------------------------------------------------------------- chunks


def test_chunks_hold_as_many_tensors_as_fit_in_the_budget() -> None:
    tensors = [torch.empty(n) for n in [5, 1, 7, 3, 3, 2, 7, 1]]  # float32: 4 bytes per element
    for budget in (0, 12, 28, 40, 60, 1000):
        slices = list(Chunks(tensors, budget))
        assert [i for s in slices for i in range(len(tensors))[s]] == list(range(len(tensors)))  # each once, in order
        limit = max(28, budget)  # the largest tensor is 7 elements, 28 bytes
        assert all(sum(4 * t.numel() for t in tensors[s]) <= limit for s in slices)
        # greedy: no chunk could also have taken the first tensor of the next one
        for s, t in itertools.pairwise(slices):
            assert sum(4 * x.numel() for x in tensors[s]) + 4 * tensors[t.start].numel() > limit
    assert len(Chunks(tensors, budget_for(None, tensors))) == 1  # the default budget (1 MiB on the CPU) takes them all
    assert list(Chunks([], 0)) == [] and budget_for(None, []) == 2**20


def test_chunks_cut_a_derived_list_with_their_budget() -> None:
    tensors = [torch.empty(n) for n in [5, 1, 7, 3, 3, 2, 7, 1]]
    planned = Chunks(tensors, 40)
    subset = tensors[2:5]
    assert planned.of(subset).budget == 40 and list(planned.of(subset)) == list(Chunks(subset, 40))
    assert budget_for(12, tensors) == 12  # a budget given is kept


# ---------------------------------------------------------------- calls


@pytest.mark.parametrize("name", RULES)
def test_calls_per_step_grow_at_most_2x_from_40_to_4000_tensors(name: str) -> None:
    factory, steps = RULES[name]
    calls = [aten_calls(_predict_and_restore(_trained(factory, _params(n), steps))) for n in (40, 4000)]
    assert 0 < calls[1] <= 2 * calls[0], calls


def test_calls_with_direction_scales_and_accelerator_step_counts_grow_at_most_2x(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CProp scales the predictor multiplies in, and the rules' paths for step counts on an accelerator (taken
    here for CPU ones), are chunked alike."""
    simulate_accelerator_step_counts(monkeypatch)
    for name in ("adamw", "adamax", "radam_rectified", "sgd_momentum"):
        factory, steps = RULES[name]
        calls = []
        for n in (40, 4000):
            params = _params(n)
            scales = {p: torch.full_like(p, 0.5) for p in params}
            calls.append(aten_calls(_predict_and_restore(_trained(factory, params, steps, direction_scales=scales))))
        assert 0 < calls[1] <= 2 * calls[0], (name, calls)


def test_cprop_statistics_calls_grow_at_most_2x_from_40_to_4000_tensors() -> None:
    """CPropCallback's per-step work for one optimizer: the snapshot before the update and the rescale after it."""
    calls = []
    for n in (40, 4000):
        params = _params(n)
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        tracker = OptimizerConformity(optimizer, {}, beta=0.9, c=1.0, eps=1e-8, cdf="bft")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            tracker.snapshot()
            optimizer.step()
            tracker.scale_update()

        calls.append(aten_calls(lambda t=tracker: (t.snapshot(), t.scale_update())))
    assert 0 < calls[1] <= 2 * calls[0], calls


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("chunk_bytes", [0, 4096])
def test_temporaries_stay_within_the_largest_tensor_or_the_budget(name: str, chunk_bytes: int) -> None:
    """64 tensors of 1 KiB (64 KiB in all): a step allocates at most max(1 KiB, chunk_bytes), where one temporary
    per parameter (torch's own foreach Adam) would be 64 KiB. The few bytes of per-tensor 0-dim scalars some rules
    keep (the heavy-ball Adam's bias corrections) are allowed on top."""
    factory, steps = RULES[name]
    predictor = _trained(factory, _params(64, numel=256), steps, chunk_bytes=chunk_bytes)
    scalars = 64 * 8
    assert transient_bytes(_predict_and_restore(predictor)) <= max(1024, chunk_bytes) + scalars


def test_the_chunk_budget_is_checked() -> None:
    params = _params(2)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"OptimizerPredictor: `chunk_bytes` must be an integer >= 0 or None, got -1"):
        OptimizerPredictor(optimizer, chunk_bytes=-1)
    with pytest.raises(TypeError, match=r"`chunk_bytes` must be an integer >= 0 or None, got 1.5"):
        OptimizerPredictor(optimizer, chunk_bytes=1.5)
    assert OptimizerPredictor(optimizer).chunk_bytes is None  # the default of the parameters' device


def test_the_default_budget_is_32_mib_on_an_accelerator_and_1_mib_on_the_cpu() -> None:
    """Cache-sized chunks on the CPU (where a call costs no launch); few calls on an accelerator. A list's budget
    is its first tensor's device's: meta tensors stand in for an accelerator's here."""
    assert default_chunk_bytes(torch.device("cpu")) == default_chunk_bytes("cpu") == 2**20
    assert default_chunk_bytes(torch.device("cuda", 1)) == default_chunk_bytes("mps") == 32 * 2**20
    cpu = [torch.empty(2**17) for _ in range(4)]  # 512 KiB each: two per chunk on the CPU
    meta = [t.to("meta") for t in cpu]
    assert len(Chunks(cpu, budget_for(None, cpu))) == 2 and len(Chunks(meta, budget_for(None, meta))) == 1
    assert budget_for(None, meta) == 32 * 2**20 and budget_for(None, cpu) == 2**20 == budget_for(None, [])


# ---------------------------------------------------------------- the plan


def _adam_prediction(optimizer: torch.optim.Optimizer, p: Tensor, steps: int) -> Tensor:
    """W_hat of one parameter of torch's Adam, by hand, at the parameter's own step count (float64)."""
    group = optimizer.param_groups[0]
    (b1, b2), eps, lr = group["betas"], group["eps"], group["lr"]
    state = optimizer.state[p]
    k = float(state["step"])
    m_hat = state["exp_avg"] / (1 - b1**k)
    v_hat = state["exp_avg_sq"] / (1 - b2**k)
    return p.detach() - steps * lr * m_hat / (v_hat.sqrt() + eps)


def test_an_unused_module_costs_no_plan_and_is_predicted_once_it_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """One Linear in the optimizer but unused in forward: the plan is built once the used parameters have state and
    not again while the unused ones get none; once the module is used, its state appears and the next prediction
    includes it, at its own step count, as the formula does by hand."""
    builds: list[int] = []
    original = OptimizerPredictor._build_plan

    def counting(self: OptimizerPredictor, *args: Any) -> None:
        builds.append(1)
        original(self, *args)

    monkeypatch.setattr(OptimizerPredictor, "_build_plan", counting)
    torch.manual_seed(0)
    used = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    unused = nn.Linear(6, 2).double()
    optimizer = torch.optim.Adam([*used.parameters(), *unused.parameters()], lr=0.01)
    predictor = OptimizerPredictor(optimizer, steps=2)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def train(with_unused: bool) -> None:
        real = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
        expected = [
            _adam_prediction(optimizer, p, 2) if optimizer.state.get(p) else p.detach().clone()
            for p in optimizer.param_groups[0]["params"]
        ]
        predictor.predict()
        for p, want in zip(optimizer.param_groups[0]["params"], expected, strict=True):
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
        optimizer.zero_grad()
        out = used(x) + (unused(x) if with_unused else 0)
        nn.functional.mse_loss(out, y).backward()
        predictor.restore()
        assert all(torch.equal(p.detach(), w) for p, w in zip(optimizer.param_groups[0]["params"], real, strict=True))
        optimizer.step()

    for _ in range(30):
        train(with_unused=False)
    # at the first step (no state at all) and at the second (the used parameters' state): then never again
    assert len(builds) == 2
    assert all(p not in optimizer.state for p in unused.parameters())
    for _ in range(5):
        train(with_unused=True)  # step 1 of these creates its state; steps 2-5 predict it (checked in train)
    assert len(builds) == 3
    assert all(int(optimizer.state[p]["step"]) == 5 for p in unused.parameters())
