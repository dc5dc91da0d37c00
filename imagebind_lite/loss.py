"""Contrastive losses against the frozen anchor, correct across processes.

``info_nce`` (ImageBind's symmetric InfoNCE, fixed temperature) and ``siglip`` (SigLIP's pairwise
sigmoid loss, learnable temperature and bias). The contrastive batch (the pool of negatives) is
always the global batch: every process gathers the embeddings of all processes, the trainable
side WITH gradients and the frozen side without.

InfoNCE, ``local=False``: each process computes the same global loss ([N, N] logits); the
gradient flowing back into its own embeddings is summed over processes by the gather's backward,
and the data-parallel average of parameter gradients turns that sum back into exactly the
gradient of the single-process loss on the whole global batch. ``local=True`` (open_clip's local
loss): each process scores only its own rows against the global batch ([n, N] logits, memory
linear in the global batch); the mean of the processes' losses is the global loss and the
averaged gradients are again exactly its gradients. SigLIP's pairs are independent, so each
process always scores its own rows against every anchor embedding (it is local by nature), and
its learnable scale and bias live in ``SigLIPHead``, a module of the prepared model, so that
data parallelism averages their gradients like the encoder's. tests/test_loss.py checks 2
processes against 1 for each.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# One output buffer, no per-rank copies to concatenate (torch < 2.14 names it differently).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the incoming gradient and keeps this rank's slice.

    Uses only all_gather and all_reduce, which every backend (gloo on CPU, nccl) supports.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        return _all_gather(tensor)

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
            "a contrastive loss across processes needs equal per-process batches, got "
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
    return _GatherWithGrad.apply(trainable), gather_frozen(frozen)


def gather_frozen(frozen: torch.Tensor) -> torch.Tensor:
    """All processes' rows of a side that takes no gradient, in rank order."""
    return _all_gather(frozen.detach()) if _distributed() else frozen


def _normalised_pair(modality_emb: torch.Tensor, anchor_emb: torch.Tensor):
    if modality_emb.shape != anchor_emb.shape:
        raise ValueError(
            f"embedding shapes differ: modality {list(modality_emb.shape)} vs "
            f"anchor {list(anchor_emb.shape)}"
        )
    return F.normalize(modality_emb.float(), dim=-1), F.normalize(anchor_emb.float(), dim=-1)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def info_nce(
    modality_emb: torch.Tensor,
    anchor_emb: torch.Tensor,
    temperature: float,
    gather: bool = True,
    local: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives and a fixed temperature.

    Row i of each side is a positive pair; both inputs are L2-normalised here. The loss is the
    mean of modality->anchor and anchor->modality cross-entropies over the (global) batch; with
    ``local`` over this process's rows only (module docstring).
    """
    modality_emb, anchor_emb = _normalised_pair(modality_emb, anchor_emb)
    mine_m, mine_a = modality_emb, anchor_emb
    if gather:
        modality_emb, anchor_emb = gather_features(modality_emb, anchor_emb)
    if not local:
        logits = modality_emb @ anchor_emb.T / temperature
        targets = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    n = mine_m.shape[0]
    first = _rank() * n if gather else 0
    targets = torch.arange(first, first + n, device=mine_m.device)
    to_anchor = F.cross_entropy(mine_m @ anchor_emb.T / temperature, targets)
    to_modality = F.cross_entropy(mine_a @ modality_emb.T / temperature, targets)
    return (to_anchor + to_modality) / 2


def siglip(
    modality_emb: torch.Tensor,
    anchor_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    gather: bool = True,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss: every (modality i, anchor j) pair is a binary problem, positive
    when i == j, with logits ``exp(logit_scale) * cos + logit_bias`` (both learnable). Summed
    over the global batch's anchors and averaged over this process's rows; the mean over
    processes is the loss of the global batch.

    ``rows=(start, stop)``: ``modality_emb`` holds only rows ``start:stop`` of this process's
    batch (one micro-batch of an accumulated step) and ``anchor_emb`` the whole batch; the
    result is their share (their sum divided by the whole batch's rows). A row's pairs involve
    no other row's embedding, so the shares of the micro-batches add up to the batch's loss and
    their gradients to its gradients."""
    n = anchor_emb.shape[0]
    start, stop = rows if rows is not None else (0, n)
    if rows is None:
        modality_emb, anchor_emb = _normalised_pair(modality_emb, anchor_emb)
    else:
        if (
            modality_emb.shape != (stop - start, *anchor_emb.shape[1:])
            or not 0 <= start <= stop <= n
        ):
            raise ValueError(
                f"rows {start}:{stop} of a batch of {n} do not fit modality embeddings of "
                f"shape {list(modality_emb.shape)}"
            )
        modality_emb = F.normalize(modality_emb.float(), dim=-1)
        anchor_emb = F.normalize(anchor_emb.float(), dim=-1)
    if gather and _distributed():
        _check_equal_batches(anchor_emb)  # the positives' columns assume equal batches
        anchor_emb = gather_frozen(anchor_emb)
    logits = modality_emb @ anchor_emb.T * logit_scale.exp() + logit_bias
    signs = -torch.ones_like(logits)
    first = (_rank() * n if gather else 0) + start
    mine = torch.arange(stop - start, device=logits.device)
    signs[mine, mine + first] = 1.0  # this process's positives
    return -F.logsigmoid(signs * logits).sum() / n


class SigLIPHead(nn.Module):
    """SigLIP's learnable logit scale (the log of the logits' multiplier) and bias, and its loss.

    A module so that they live in the module the run prepares (``AlignmentModule``): trained by
    the run's one AdamW (no weight decay: they are scalars), saved in its checkpoints, and their
    gradients averaged over processes like the encoder's, because the loss is computed in the
    prepared module's forward (DDP's unused-parameter search sees them). Initialised as the
    SigLIP paper: scale 10 (``logit_scale = log 10``), bias -10.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0):
        super().__init__()
        if init_scale <= 0:
            raise ValueError(
                f"init_scale: the logits' multiplier must be positive, got {init_scale}"
            )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, modality_emb, anchor_emb, rows: tuple[int, int] | None = None):
        return siglip(modality_emb, anchor_emb, self.logit_scale, self.logit_bias, rows=rows)

    def scalars(self) -> dict:
        """The learnt values, as the run's metrics record them."""
        return {
            "siglip_scale": float(self.logit_scale.detach().exp()),
            "siglip_bias": float(self.logit_bias.detach()),
        }
