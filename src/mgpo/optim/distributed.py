"""Training on many processes: what the optimizers exchange between ranks (docs/distributed.md).

* DDP (and a single process): every trainable tensor is a plain tensor holding the same values on every rank,
  and DDP has already averaged the gradients, so every rank computes the same perturbation with no exchange at
  all. :class:`Exchange` is then inert (no collective is issued).
* FSDP2 (``torch.distributed.fsdp.fully_shard``): trainable tensors, their gradients and the optimizer state are
  ``DTensor`` shards along dim 0 of a 1-D device mesh. Every norm, Gram entry and finiteness flag of a step is
  then a sum of per-rank parts, collected in one vector per phase of the step. LoRA factors and momenta that the
  weight-space term needs whole are gathered with :meth:`Exchange.full_and_sum`, one flattened
  ``all_gather_single`` per call (LoRA-sized; base weights never), which carries the phase's per-rank parts
  as well; :meth:`Exchange.all_reduce` sums them when there is nothing to gather.

Anything else (DeepSpeed ZeRO, tensor parallelism, HSDP's 2-D meshes, some tensors sharded and others not) is
refused when the optimizer is built, by :func:`check_placements` (called from ``refuse_unsupported``).

Pure PyTorch; nothing here reads a device value back to the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor, Shard
else:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch built without distributed support: nothing can be sharded
        DTensor, Shard = (), ()

# Test-only switch: False turns the reductions off (each rank then uses its own shard's norms), so the FSDP tests
# can show that they catch exactly that bug. Never set it outside tests.
REDUCE = True

_SUPPORTED = (
    "Supported: PyTorch DDP, or FSDP2 (torch.distributed.fsdp.fully_shard, or the HF Trainer / accelerate "
    "with fsdp_version 2) on a 1-D mesh."
)


def is_sharded(t: torch.Tensor) -> TypeGuard[DTensor]:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (the tensor itself when it is not sharded). Shares storage: in-place writes to
    it change ``t``."""
    return t._local_tensor if is_sharded(t) else t


def local_grad(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``p.grad``, for a tensor that has a gradient (the optimizers' ``_params_with_grad()``)."""
    grad = p.grad
    assert grad is not None
    return grad._local_tensor if is_sharded(grad) else grad


def check_placements(params: list[torch.Tensor]) -> None:
    """Raise ``ValueError`` for parameter layouts the optimizers would train wrongly."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return
    if len(sharded) != len(params):
        raise ValueError(
            f"{len(sharded)} of {len(params)} trainable tensors are FSDP-sharded DTensors and the others are not: "
            "the unsharded ones would be counted once per rank. Apply fully_shard to the root module as well "
            "(fully_shard(block) for each block, then fully_shard(model)). " + _SUPPORTED
        )
    for p in sharded:
        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
            raise ValueError(
                f"A trainable tensor is a DTensor with placements {tuple(placements)} on a {mesh.ndim}-D mesh: tensor "
                "parallelism (or HSDP's 2-D mesh) is not supported; the perturbation's norms would need reductions "
                "over other mesh dimensions. " + _SUPPORTED
            )
    meshes = {id(p.device_mesh) for p in sharded}
    groups = {p.device_mesh.get_group() for p in sharded}
    if len(meshes) > 1 and len(groups) > 1:
        raise ValueError(
            "The trainable tensors are sharded over different process groups; use one mesh for the "
            "whole model. " + _SUPPORTED
        )


class Exchange:
    """The collectives of one optimizer over its tensors: inert unless they are FSDP-sharded."""

    def __init__(self, params: list[torch.Tensor]):
        sharded = [p for p in params if is_sharded(p)]
        self.sharded = bool(sharded)
        self.group = sharded[0].device_mesh.get_group() if sharded else None
        self.world = dist.get_world_size(self.group) if sharded else 1
        self.rank = dist.get_rank(self.group) if sharded else 0

    def all_reduce(self, parts: torch.Tensor) -> torch.Tensor:
        """Sum ``parts`` (a vector of per-rank partial sums) over the ranks: one collective, or none when the
        tensors are not sharded. Sums of squares stay sums of squares; a NaN/Inf on any rank reaches every rank."""
        if self.sharded and REDUCE and parts.numel():
            dist.all_reduce(parts, group=self.group)
        return parts

    def full(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The whole tensors (plain ones as they are). All sharded ones travel in one flattened
        ``all_gather_single``: each rank sends its shards back to back, padded to the longest rank."""
        return self.full_and_sum(tensors, None)[0]

    def full_and_sum(
        self, tensors: list[torch.Tensor], parts: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """:meth:`full`, and ``parts`` (a vector of per-rank partial sums) summed over the ranks, in the same
        collective: each rank appends its parts to what it sends, and every rank adds up the gathered copies in
        rank order. With nothing to gather the parts take one all-reduce (:meth:`all_reduce`) instead."""
        which = [i for i, t in enumerate(tensors) if is_sharded(t)]
        if not which:
            return list(tensors), (None if parts is None else self.all_reduce(parts))
        world = self.world
        # rows of each tensor on each rank: FSDP2's Shard(0) splits dim 0 like torch.chunk
        rows = []
        for i in which:
            n = tensors[i].shape[0]
            size = -(-n // world)
            rows.append([max(0, min(size, n - r * size)) for r in range(world)])
            if local(tensors[i]).shape[0] != rows[-1][self.rank]:
                raise RuntimeError(
                    f"a sharded tensor of {n} rows has {local(tensors[i]).shape[0]} on rank "
                    f"{self.rank}, not the {rows[-1][self.rank]} of FSDP2's even Shard(0) split; "
                    "custom shard placements are not supported."
                )
        widths = [tensors[i].shape[1:].numel() for i in which]  # from the shape: indexing a DTensor communicates
        per_rank = [sum(rw[r] * w for rw, w in zip(rows, widths)) for r in range(world)]
        n_parts = 0 if parts is None else parts.numel()
        longest = max(per_rank) + n_parts
        dtype = tensors[which[0]].dtype if parts is None else parts.dtype
        for i in which:  # one buffer in the widest dtype: casting up and back down is exact
            dtype = torch.promote_types(dtype, tensors[i].dtype)
        send = torch.zeros(longest, dtype=dtype, device=local(tensors[which[0]]).device)
        if per_rank[self.rank]:
            send[: per_rank[self.rank]] = torch.cat([local(tensors[i]).reshape(-1).to(dtype) for i in which])
        if parts is not None and n_parts:
            send[longest - n_parts :] = parts
        recv = torch.empty(world * longest, dtype=send.dtype, device=send.device)
        dist.all_gather_single(recv, send, group=self.group)  # all_gather_into_tensor's successor
        recv = recv.view(world, longest)
        pieces: list[list[torch.Tensor]] = [[] for _ in which]
        for r in range(world):
            offset = 0
            for k, i in enumerate(which):
                n = rows[k][r] * widths[k]
                pieces[k].append(recv[r, offset : offset + n].view(rows[k][r], *tensors[i].shape[1:]))
                offset += n
        out = list(tensors)
        for k, i in enumerate(which):
            out[i] = torch.cat(pieces[k], 0).to(tensors[i].dtype)
        if parts is not None and n_parts:
            gathered = recv[:, longest - n_parts :]
            parts = (gathered.sum(0) if REDUCE else gathered[self.rank]).to(parts.dtype)
        return out, parts


def local_state(obj: Any) -> Any:
    """``obj`` (an optimizer ``state_dict()``) with every DTensor replaced by this rank's shard: what a per-rank
    checkpoint file holds under FSDP. Resume with the same number of processes (:func:`sharded_state`)."""
    if is_sharded(obj):
        return obj._local_tensor
    if isinstance(obj, dict):
        return {k: local_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(local_state(v) for v in obj)
    return obj


def sharded_state(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The inverse of :func:`local_state` for a mgpo optimizer's state dict: every per-parameter state tensor
    that has the shape of its FSDP-sharded parameter's local shard becomes a DTensor laid out like it again
    (``load_state_dict`` would otherwise keep plain tensors beside DTensor parameters)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def wrap(section: dict[str, Any]) -> dict[str, Any]:
        state: dict[Any, Any] = {}
        for index, entries in section.get("state", {}).items():
            p = params[index] if isinstance(index, int) and index < len(params) else None
            if p is None or not is_sharded(p):
                state[index] = entries
                continue
            shard = p._local_tensor.shape
            state[index] = {
                k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
                if torch.is_tensor(v) and not is_sharded(v) and v.shape == shard and v.dim()
                else v
                for k, v in entries.items()
            }
        return {**section, "state": state}

    return {**state_dict, "base": wrap(state_dict["base"]), "own": wrap(state_dict["own"])}
