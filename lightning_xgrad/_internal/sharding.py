"""Rank-local views of parameters: what elementwise math runs on under FSDP2 and tensor parallelism.

Prediction, CProp and the heavy-ball secant all work elementwise on each rank's local shard, with no communication;
where a global quantity is needed (a norm), each local element is weighted by one over the ranks that hold it.
Pure torch, no Lightning. A torch without DTensor imports this module fine: nothing is sharded there, and
:func:`model_parallel_unsupported` says why the sharded strategies are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: the oldest torch release whose DTensor (``torch.distributed.tensor``) and ``fully_shard``
#: (``torch.distributed.fsdp``) sharded training is tested with; the package's own floor
MODEL_PARALLEL_TORCH = "2.6"

#: why sharded (FSDP2, tensor parallel) training cannot be supported on this torch, or None where it can
DTENSOR_MISSING: str | None = None

if torch.distributed.is_available():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError as error:  # no DTensor here: no parameter can be one, and only sharded training is refused
        DTensor = ()  # type: ignore[assignment,misc]
        DTENSOR_MISSING = f"torch {torch.__version__} has no torch.distributed.tensor.DTensor ({error})"
else:  # torch built without distributed support: no parameter can be a DTensor
    DTensor = ()  # type: ignore[assignment,misc]
    DTENSOR_MISSING = f"torch {torch.__version__} was built without torch.distributed"


def model_parallel_unsupported() -> str | None:
    """Why FSDP2 and tensor parallelism (Lightning's ModelParallelStrategy) are refused on this torch, naming the
    release they need; None where they are supported. Without DTensor the sharded parameters would be treated as
    whole tensors, which is silently wrong, so only those strategies are refused: everything else works."""
    if DTENSOR_MISSING is None:
        return None
    return f"it needs DTensor from torch>={MODEL_PARALLEL_TORCH} with torch.distributed: {DTENSOR_MISSING}"


def local_tensor(value: Any) -> Any:
    """The tensor elementwise math runs on: the rank-local shard of a DTensor, and complex tensors as real views
    (real and imaginary parts as separate coordinates, as torch's optimizers treat them). Both are views, so in-place
    writes land in the original; anything else comes back as it is."""
    if isinstance(value, DTensor):
        value = value.to_local()
    if isinstance(value, Tensor) and value.is_complex():
        value = torch.view_as_real(value)
    return value


def ranks_holding(param: Tensor) -> int:
    """How many ranks hold each element of ``param``'s local tensor: the world over the ranks that shard it."""
    world = torch.distributed.get_world_size()
    if not isinstance(param, DTensor):
        return world
    sharding = 1
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            sharding *= param.device_mesh.size(dim)
    return world // sharding


def sum_over_ranks(owners: Sequence[Tensor], sums: Tensor) -> Tensor:
    """The column sums of ``sums`` over every element of the model, once each, on every rank.

    ``sums`` has one row per parameter in ``owners``: partial sums over that rank's local tensor of it. With DTensor
    parameters (FSDP2, tensor parallel) in a process group, each row is weighted by one over the ranks holding it and
    the totals are summed over the ranks (one ``all_reduce``), so sharded elements count once and replicated ones
    too. Otherwise every rank holds whole tensors (one process, DDP's identical replicas): the local column sums.
    """
    if any(isinstance(p, DTensor) for p in owners) and torch.distributed.is_initialized():
        weights = torch.tensor([1.0 / ranks_holding(p) for p in owners], dtype=sums.dtype, device=sums.device)
        totals = (sums * weights.unsqueeze(1)).sum(0)
        torch.distributed.all_reduce(totals)
        return totals
    return sums.sum(0)
