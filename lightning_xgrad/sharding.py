"""Rank-local views of parameters: what elementwise math runs on under FSDP2 and tensor parallelism.

Prediction, CProp and the heavy-ball secant all work elementwise on each rank's local shard, with no communication;
where a global quantity is needed (a norm), each local element is weighted by one over the ranks that hold it.
Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

if torch.distributed.is_available():  # DTensor (FSDP2, tensor parallel)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError as error:  # an old torch: sharded parameters would be treated as whole tensors, silently wrong
        raise ImportError(
            f"lightning_xgrad needs torch.distributed.tensor.DTensor, which torch {torch.__version__} lacks; "
            "install torch>=2.13, the oldest release tested (README, Install)"
        ) from error
else:  # pragma: no cover - torch built without distributed support: no parameter can be a DTensor
    DTensor = ()  # type: ignore[assignment,misc]


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
