"""Zero-shot classification by text prompts and cross-modal retrieval, as library functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.datasets import collate


@torch.no_grad()
def class_text_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """Prompt ensembling: the mean of the normalised template embeddings of each class,
    normalised again. Returns [num_classes, D]."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    prompts = [t.format(name) for name in classnames for t in templates]
    emb = F.normalize(encode_text(prompts).float(), dim=-1)
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


def topk_hits(
    scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, torch.Tensor]:
    """Per row, whether its label is among the k highest scores (k capped at #classes):
    ``{"top1": bool [N], ...}``, the items behind :func:`topk_accuracy` and its intervals."""
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {labels.shape[0]} labels")
    ranked = scores.argsort(dim=1, descending=True)
    return {
        f"top{k}": (ranked[:, : min(k, scores.shape[1])] == labels[:, None]).any(dim=1) for k in ks
    }


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Share of rows whose label is among the k highest scores, for each k (capped at #classes)."""
    hits = topk_hits(scores, labels, ks)
    return {
        name: float(hit.float().mean()) if len(labels) else float("nan")
        for name, hit in hits.items()
    }


def retrieval_metrics(
    similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10), positives: torch.Tensor | None = None
) -> dict:
    """Query->gallery retrieval: R@K and median rank (1-based), from :func:`retrieval_ranks`."""
    ranks = retrieval_ranks(similarity, positives)
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.float().median())
    return out


def retrieval_ranks(
    similarity: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Each query's rank (1-based) of its best positive in the gallery.

    ``similarity`` is [queries, gallery]. ``positives`` is a boolean matrix of the same shape
    marking every correct gallery item (several captions per item); by default item i matches
    gallery item i.
    """
    if positives is None:
        if similarity.shape[0] != similarity.shape[1]:
            raise ValueError("a non-square similarity needs an explicit positives matrix")
        positives = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive in the gallery")
    order = similarity.argsort(dim=1, descending=True)
    hit_at = positives.gather(1, order)  # [Q, G], True where the ranked item is a positive
    return hit_at.float().argmax(dim=1) + 1


@torch.no_grad()
def embed_dataset(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    key: str,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ``dataset[i][key]`` in batches -> (embeddings [N, D] on CPU, labels [N])."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    embs, labels = [], []
    for batch in tqdm(loader, desc=f"embed {key}", disable=not progress, leave=False):
        embs.append(F.normalize(encode(batch[key].to(device)).float(), dim=-1).cpu())
        labels.append(batch["label"])
    return torch.cat(embs), torch.cat(labels)


def zero_shot_classification(
    embeddings: torch.Tensor, labels: torch.Tensor, class_embeddings: torch.Tensor
) -> dict:
    """Top-1/top-5 by nearest class embedding, with the per-item hits (``"hits"``) and the
    predictions behind them."""
    scores = F.normalize(embeddings.float(), dim=-1) @ class_embeddings.float().T
    hits = topk_hits(scores, labels, (1, 5))
    return {
        "zero_shot_top1": float(hits["top1"].float().mean()),
        "zero_shot_top5": float(hits["top5"].float().mean()),
        "predictions": scores.argmax(dim=1),
        "hits": hits,
    }


def class_scores(
    embeddings: torch.Tensor,
    name_embeddings: torch.Tensor,
    owner: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Cosine scores [N, num_classes] where a class may be named several ways: each class
    scores as its best name (``owner[k]`` is the class of name k; default one name per class).
    NYU-D's "other" is the best of 18 scene names this way."""
    scores = F.normalize(embeddings.float(), dim=-1) @ name_embeddings.float().T
    if owner is None:
        return scores
    owner = owner.to(scores.device).long()
    num_classes = int(owner.max()) + 1 if num_classes is None else num_classes
    out = torch.full((scores.shape[0], num_classes), float("-inf"), device=scores.device)
    return out.scatter_reduce(1, owner.expand_as(scores), scores, reduce="amax")
