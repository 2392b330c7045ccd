"""Exact cross-process gathering for losses over the global batch.

``all_gather_with_grad`` concatenates every process's tensor (sizes may differ) and, in the backward pass,
sums the incoming gradients over processes (all-reduce) before keeping this process's slice. When every
process evaluates the same loss ``L`` on the gathered global batch, the gradient reaching the local
embeddings is ``world_size * dL/dx_local``; the usual data-parallel averaging of parameter gradients
(DDP / Accelerate divide by ``world_size``) then yields exactly ``dL/dtheta`` of one process that saw the
whole batch. This is the scheme of open_clip's ``gather_features(..., gather_with_grad=True)`` written with
public ``torch.distributed`` calls only.

``gather_batch`` gathers without gradient (ids, teacher rows). Both are the identity when
``torch.distributed`` is not initialised or the world has one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "batch_sizes", "all_gather_with_grad", "gather_batch"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def batch_sizes(tensor: torch.Tensor) -> list[int]:
    """Every process's ``tensor.shape[0]`` (one small all-gather); pass it to the gathers of the same batch."""
    if not is_distributed():
        return [tensor.shape[0]]
    local = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _gather_padded(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    longest = max(sizes)
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], dim=0)
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        sizes = sizes if sizes is not None else batch_sizes(tensor)
        ctx.offset = sum(sizes[: dist.get_rank()])
        ctx.length = tensor.shape[0]
        return _gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset : ctx.offset + ctx.length], None


def all_gather_with_grad(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, differentiably (see module docstring).

    ``sizes``: every process's row count, from :func:`batch_sizes`, to skip one all-gather per call."""
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor, sizes)


@torch.no_grad()
def gather_batch(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0 without gradient (ids, teacher rows)."""
    if not is_distributed():
        return tensor
    return _gather_padded(tensor, sizes if sizes is not None else batch_sizes(tensor))
