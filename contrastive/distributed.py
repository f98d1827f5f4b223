"""All-gather with gradient, so that negatives are global under DDP while anchors stay local.

``torch.distributed.nn.functional.all_gather`` back-propagates with reduce-scatter or all-to-all, which the
gloo backend (CPU) does not always support; this version back-propagates with one ``all_reduce`` (supported
everywhere) and takes this rank's slice, which gives exactly the full-batch gradient (see
``tests/test_ddp.py``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on every rank's rows
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (n, ...) from all ranks in rank order → (world·n, ...), differentiable.

    Every rank must pass the same ``n`` (training loaders use ``drop_last=True``)."""
    if not is_distributed():
        return x
    _check_equal_sizes(x)
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks in rank order; no gradient (ids, labels, eval embeddings).
    Unequal first dimensions are padded for the collective and trimmed after."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = torch.zeros((m - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    out = [torch.empty((m, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(out, torch.cat([x, pad]).contiguous())
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)], dim=0)


def _check_equal_sizes(x: Tensor) -> None:
    n = torch.tensor([x.shape[0]], device=x.device)
    lo, hi = n.clone(), n.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(
            f"gather_with_grad needs the same batch size on every rank; got sizes between {lo.item()} and "
            f"{hi.item()} (use drop_last=True for training loaders)"
        )
