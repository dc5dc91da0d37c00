"""Symmetric InfoNCE against the frozen anchor, correct across processes.

Every process gathers the embeddings of all processes, so the contrastive batch (the pool of
negatives) is the global batch. The trainable side is gathered WITH gradients and the frozen
side without. Each process then computes the same global loss; the gradient flowing back into
its own embeddings is summed over processes by the gather's backward, and the data-parallel
average of parameter gradients over processes turns that sum back into exactly the gradient of
the single-process loss on the whole global batch (tests/test_loss.py checks this).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the incoming gradient and keeps this rank's slice.

    Uses only all_gather and all_reduce, which every backend (gloo on CPU, nccl) supports.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def _check_equal_batches(tensor: torch.Tensor) -> None:
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    if len({int(s) for s in sizes}) != 1:
        raise RuntimeError(
            "InfoNCE across processes needs equal per-process batches, got "
            f"{[int(s) for s in sizes]} (use drop_last / even batches)"
        )


def gather_features(
    trainable: torch.Tensor, frozen: torch.Tensor, check_sizes: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather both sides over all processes: ``trainable`` with gradients, ``frozen`` without."""
    if not _distributed():
        return trainable, frozen
    if check_sizes:
        _check_equal_batches(trainable)
    all_trainable = _GatherWithGrad.apply(trainable)
    parts = [torch.empty_like(frozen) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, frozen.detach().contiguous())
    return all_trainable, torch.cat(parts)


def info_nce(
    modality_emb: torch.Tensor,
    anchor_emb: torch.Tensor,
    temperature: float,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives and a fixed temperature.

    Row i of each side is a positive pair; both inputs are L2-normalised here. The loss is the
    mean of modality->anchor and anchor->modality cross-entropies over the (global) batch.
    """
    if modality_emb.shape != anchor_emb.shape:
        raise ValueError(
            f"embedding shapes differ: modality {list(modality_emb.shape)} vs "
            f"anchor {list(anchor_emb.shape)}"
        )
    modality_emb = F.normalize(modality_emb.float(), dim=-1)
    anchor_emb = F.normalize(anchor_emb.float(), dim=-1)
    if gather:
        modality_emb, anchor_emb = gather_features(modality_emb, anchor_emb)
    logits = modality_emb @ anchor_emb.T / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
