"""Global-batch losses under data parallelism: gather features from every rank, gradients included.

With ``W`` processes each holding ``B / W`` samples of a global batch of ``B``,
the batch-level losses (SDM, triplet, ITC) must see all ``B`` samples to equal
the one-process loss: their targets, softmax denominators and hardest negatives
depend on the whole batch. :func:`all_gather_with_grad` concatenates the ranks'
``(B / W, ...)`` tensors into ``(B, ...)`` in rank order (rank ``r``'s rows at
``r * B / W``), and its backward hands each rank the gradient of its own rows,
summed over the ranks (every rank computes the same global loss from the same
gathered tensor).

Why the sum is right: each rank's parameter gradient then holds
``W * dL/dx_r * dx_r/dtheta`` for the batch-level loss ``L``, and DDP averages
over the ``W`` ranks, which leaves ``sum_r dL/dx_r * dx_r/dtheta = dL/dtheta``,
the one-process gradient. Per-sample losses (ID, TIR) stay local means; DDP's
average of equal-sized local means is the global mean.

Without an initialised process group (or with one process) everything here is
the identity, so plain one-process code pays nothing. A model gathers only when
asked (:attr:`tipr.model.TIPRModel.gather_across_ranks`, which the training
module sets), never because a process group happens to exist.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "world_and_rank", "world_size"]


def world_and_rank() -> tuple[int, int]:
    """``(processes, this process's rank)`` in the default group; ``(1, 0)`` without ``torch.distributed``.

    The one place tipr asks (samplers, the data module, the gathers)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return world_and_rank()[0]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)  # (W * b, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum of every rank's gradient w.r.t. the gathered rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``(b, ...)`` on each of ``W`` ranks -> ``(W * b, ...)`` in rank order; gradients flow to each rank's rows.

    Every rank must pass the same shape (the samplers give each rank an equal slice of the global batch).
    """
    if world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad` for tensors without gradients (labels)."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
