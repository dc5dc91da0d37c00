"""Metrics of a shared embedding space, each a plain function of tensors.

Retrieval: R@K and median rank, dense (``retrieval_metrics`` from ``zero_shot``) or chunked for
large collections (``chunked_ranks``: the similarity matrix is never built whole).
Classification: top-k accuracy, multi-label mAP (AudioSet protocol).
Probing: alignment accuracy of (item, positive text, negative texts) triples.
Geometry: modality gap (Liang et al. 2022), alignment and uniformity (Wang & Isola 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .zero_shot import retrieval_metrics, topk_accuracy

__all__ = [
    "alignment",
    "alignment_accuracy",
    "average_precision",
    "chunked_ranks",
    "chunked_retrieval_metrics",
    "chunked_topk",
    "class_retrieval",
    "dense_ranks",
    "mean_average_precision",
    "metrics_from_ranks",
    "modality_gap",
    "retrieval_metrics",
    "space_statistics",
    "topk_accuracy",
    "uniformity",
]


# ---------------------------------------------------------------------------------- retrieval


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """1-based ranks of the best positive per query -> R@K and median rank."""
    ranks = ranks.float()
    if ranks.numel() == 0:
        raise ValueError("no queries to score")
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.median())
    out["mean_rank"] = float(ranks.mean())
    return out


def dense_ranks(similarity: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Rank (1-based) of each query's best positive, ties broken in the query's favour:
    one plus the number of gallery items scoring strictly higher than its best positive."""
    if positives is None:
        positives = torch.eye(similarity.shape[0], similarity.shape[1], dtype=torch.bool)
    positives = positives.to(similarity.device)
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive in the gallery")
    best = similarity.masked_fill(~positives, float("-inf")).max(dim=1).values
    return (similarity > best[:, None]).sum(dim=1) + 1


def _floating(x: torch.Tensor) -> torch.Tensor:
    # float64 stays float64 so that exactness checks are not at the mercy of float32 near-ties.
    return x if x.dtype == torch.float64 else x.float()


def _groups(groups: torch.Tensor | None, n: int) -> torch.Tensor:
    # Without groups, query i matches gallery item i (paired collections).
    return torch.arange(n) if groups is None else torch.as_tensor(groups).long().cpu()


def _best_positive_sparse(queries, gallery, qg, gg, max_pairs: int, chunk: int = 1 << 16):
    """Best positive score per query from the explicit (query, gallery) positive pairs, or
    None when there are more than ``max_pairs`` of them (class-level groups)."""
    uniq, counts = torch.unique(gg, return_counts=True)
    slot = torch.searchsorted(uniq, qg).clamp(max=len(uniq) - 1)
    found = uniq[slot] == qg
    per_query = torch.where(found, counts[slot], torch.zeros_like(slot))
    total = int(per_query.sum())
    if total > max_pairs:
        return None
    order = torch.argsort(gg, stable=True)
    group_start = torch.cumsum(counts, 0) - counts
    q_idx = torch.arange(len(qg)).repeat_interleave(per_query)
    within = torch.arange(total) - torch.repeat_interleave(
        torch.cumsum(per_query, 0) - per_query, per_query
    )
    g_idx = order[group_start[slot].repeat_interleave(per_query) + within]
    best = torch.full((len(qg),), float("-inf"), dtype=queries.dtype)
    for s in range(0, total, chunk):
        qi, gi = q_idx[s : s + chunk], g_idx[s : s + chunk]
        dots = (queries[qi] * gallery[gi]).sum(-1)
        best.scatter_reduce_(0, qi, dots, reduce="amax")
    return best


@torch.no_grad()
def chunked_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
    query_chunk: int = 1024,
    gallery_chunk: int = 16384,
    progress: bool = False,
) -> torch.Tensor:
    """Ranks of the best positive, with memory bounded by ``query_chunk x gallery_chunk``.

    Query i and gallery item j are a positive pair when ``query_groups[i] ==
    gallery_groups[j]``: item ids for paired data (the default, ``arange``), an audio index per
    caption for several captions per item, or class labels for class-level retrieval.
    A query's rank is one plus the number of non-positives scoring strictly above its best
    positive: the same ranks as ``dense_ranks`` on the full matrix. The best positive comes
    from the positive pairs directly when they are few (instance retrieval), else from a first
    pass over the gallery.
    """
    queries = F.normalize(_floating(queries), dim=-1)
    gallery = F.normalize(_floating(gallery), dim=-1)
    qg = _groups(query_groups, len(queries))
    gg = _groups(gallery_groups, len(gallery))
    if len(qg) != len(queries) or len(gg) != len(gallery):
        raise ValueError("groups must have one entry per query / gallery item")
    best_all = _best_positive_sparse(queries, gallery, qg, gg, max_pairs=16 * len(queries) + 1024)
    ranks = torch.empty(len(queries), dtype=torch.long)
    starts = range(0, len(queries), query_chunk)
    for qs in tqdm(starts, desc="rank", disable=not progress, leave=False):
        q, q_groups = queries[qs : qs + query_chunk], qg[qs : qs + query_chunk]
        if best_all is None:
            best = torch.full((len(q),), float("-inf"), dtype=q.dtype)
            for gs in range(0, len(gallery), gallery_chunk):
                sim = q @ gallery[gs : gs + gallery_chunk].T
                pos = q_groups[:, None] == gg[None, gs : gs + gallery_chunk]
                best = torch.maximum(best, sim.masked_fill(~pos, float("-inf")).amax(dim=1))
        else:
            best = best_all[qs : qs + query_chunk]
        if torch.isinf(best).any():
            missing = int(torch.isinf(best).nonzero()[0]) + qs
            raise ValueError(f"query {missing} has no positive in the gallery")
        above = torch.zeros(len(q), dtype=torch.long)
        for gs in range(0, len(gallery), gallery_chunk):
            sim = q @ gallery[gs : gs + gallery_chunk].T
            # Positives never count against their query: this also keeps a rounding difference
            # between the two ways of computing a positive's score from costing a rank.
            negative = q_groups[:, None] != gg[None, gs : gs + gallery_chunk]
            beaten = (sim > best[:, None]) & negative
            above += beaten.sum(dim=1)
        ranks[qs : qs + len(q)] = above + 1
    return ranks


def chunked_retrieval_metrics(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    query_groups: torch.Tensor | None = None,
    gallery_groups: torch.Tensor | None = None,
    query_chunk: int = 1024,
    gallery_chunk: int = 16384,
    progress: bool = False,
) -> dict:
    """R@K and median rank of ``queries`` against ``gallery`` without an N x N matrix."""
    ranks = chunked_ranks(
        queries, gallery, query_groups, gallery_groups, query_chunk, gallery_chunk, progress
    )
    return metrics_from_ranks(ranks, ks)


@torch.no_grad()
def chunked_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int = 10,
    query_chunk: int = 1024,
    gallery_chunk: int = 16384,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of every query: (scores [Q, k], gallery indices [Q, k]), best first,
    merging per-chunk top-k lists so memory stays bounded by the chunk sizes."""
    queries = F.normalize(queries.float(), dim=-1)
    gallery = F.normalize(gallery.float(), dim=-1)
    k = min(k, len(gallery))
    scores = torch.empty(len(queries), k)
    indices = torch.empty(len(queries), k, dtype=torch.long)
    starts = range(0, len(queries), query_chunk)
    for qs in tqdm(starts, desc="top-k", disable=not progress, leave=False):
        q = queries[qs : qs + query_chunk]
        best_s = torch.empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.long)
        for gs in range(0, len(gallery), gallery_chunk):
            sim = q @ gallery[gs : gs + gallery_chunk].T
            s, i = sim.topk(min(k, sim.shape[1]), dim=1)
            merged_s, merged_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + gs], 1)
            top = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
            best_s, best_i = top.values, merged_i.gather(1, top.indices)
        scores[qs : qs + len(q)], indices[qs : qs + len(q)] = best_s, best_i
    return scores, indices


# ----------------------------------------------------------------------------- classification


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class average precision of [N, C] scores against {0, 1} targets -> [C].

    AP = sum over distinct score thresholds of (recall step) x precision, so tied scores form
    one operating point (the definition scikit-learn uses). NaN for a class with no positive.
    """
    scores, targets = scores.float(), targets.float()
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ")
    if scores.ndim == 1:
        scores, targets = scores[:, None], targets[:, None]
    s, order = scores.sort(dim=0, descending=True)
    t = targets.gather(0, order)
    tp, fp = t.cumsum(0), (1 - t).cumsum(0)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last row of each run of tied scores
    at_threshold = torch.where(last, tp, torch.zeros_like(tp)).cummax(dim=0).values
    previous = torch.cat([torch.zeros_like(tp[:1]), at_threshold[:-1]])
    precision = tp / (tp + fp)
    positives = t.sum(0)
    ap = (torch.where(last, (tp - previous) * precision, torch.zeros_like(tp))).sum(0) / positives
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """Multi-label mAP: per-class AP averaged over the classes with at least one positive."""
    ap = average_precision(scores, targets)
    scored = ~torch.isnan(ap)
    if not scored.any():
        raise ValueError("no class has a positive: mAP is undefined")
    return {
        "mAP": float(ap[scored].mean()),
        "classes_scored": int(scored.sum()),
        "per_class_ap": ap.tolist(),
    }


def class_retrieval(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
) -> dict:
    """Retrieval by class between two embedding sets (e.g. two modalities that never met in
    training): ``top1``, how often the nearest gallery item has the query's class, and ``mAP``,
    the mean over queries of the average precision of the ranking with relevant = same class
    (queries whose class is absent from the gallery are left out of the mean)."""
    scores = _floating(queries) @ _floating(gallery).T  # [Q, G]
    relevant = query_labels.view(-1, 1) == gallery_labels.view(1, -1)
    nearest = scores.argmax(dim=1)
    top1 = relevant[torch.arange(len(queries)), nearest].float().mean()
    ap = average_precision(scores.T, relevant.T.float())  # one column per query
    scored = ~torch.isnan(ap)
    return {
        "top1": float(top1),
        "mAP": float(ap[scored].mean()) if scored.any() else float("nan"),
        "queries": len(queries),
        "gallery": len(gallery),
    }


def labels_to_multi_hot(labels: Sequence[int | Sequence[int]], num_classes: int) -> torch.Tensor:
    """Per-item label lists (or single labels) -> [N, C] {0, 1} targets."""
    out = torch.zeros(len(labels), num_classes)
    for i, label in enumerate(labels):
        ids = [label] if isinstance(label, int) else list(label)
        out[i, ids] = 1.0
    return out


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """[true, predicted] counts."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, -1)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Recall of each class; NaN for a class absent from ``labels``."""
    cm = confusion_matrix(predictions, labels, num_classes).float()
    support = cm.sum(1)
    return torch.where(support > 0, cm.diag() / support.clamp(min=1), float("nan"))


# ----------------------------------------------------------------------------------- probing


def alignment_accuracy(
    items: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | Sequence[torch.Tensor],
) -> float:
    """Share of triples where the item's cosine with its positive text is strictly higher
    than with every one of its negative texts.

    ``items`` and ``positives`` are [N, D]; ``negatives`` is [N, M, D] or a list of N tensors
    [M_i, D] when the number of negatives varies.
    """
    items = F.normalize(items.float(), dim=-1)
    pos = (items * F.normalize(positives.float(), dim=-1)).sum(-1)
    if isinstance(negatives, torch.Tensor):
        neg = torch.einsum("nd,nmd->nm", items, F.normalize(negatives.float(), dim=-1))
        hardest = neg.max(dim=1).values
    else:
        if len(negatives) != len(items):
            raise ValueError("one set of negatives per item is needed")
        hardest = torch.stack(
            [(F.normalize(n.float(), dim=-1) @ x).max() for x, n in zip(items, negatives)]
        )
    return float((pos > hardest).float().mean())


# ---------------------------------------------------------------------------------- geometry


def modality_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Euclidean distance between the centroids of two modalities' normalised embeddings."""
    ca = F.normalize(a.float(), dim=-1).mean(0)
    cb = F.normalize(b.float(), dim=-1).mean(0)
    return float((ca - cb).norm())


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola alignment: E ||x_i - y_i||^alpha over positive pairs (rows), normalised
    embeddings. 0 is perfect; 4 (alpha=2) means every pair is antipodal."""
    if x.shape != y.shape:
        raise ValueError(f"paired embeddings must have the same shape: {x.shape} vs {y.shape}")
    d = (F.normalize(x.float(), dim=-1) - F.normalize(y.float(), dim=-1)).norm(dim=-1)
    return float(d.pow(alpha).mean())


@torch.no_grad()
def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 2048) -> float:
    """Wang & Isola uniformity: log E_{i != j} exp(-t ||x_i - x_j||^2), normalised embeddings.

    Lower is more uniform. Computed block by block with log-sum-exp, so 100k points need no
    N x N matrix and no underflow.
    """
    x = F.normalize(x.float(), dim=-1)
    n = len(x)
    if n < 2:
        raise ValueError("uniformity needs at least two points")
    parts = []
    for s in range(0, n, chunk):
        sq = (2 - 2 * x[s : s + chunk] @ x.T).clamp(min=0)
        logits = -t * sq
        rows = torch.arange(s, min(s + chunk, n))
        logits[rows - s, rows] = float("-inf")  # a point's distance to itself is not a pair
        parts.append(torch.logsumexp(logits.flatten(), 0))
    return float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1)))


def space_statistics(
    embeddings: dict[str, torch.Tensor], paired: bool = True, t: float = 2.0
) -> dict:
    """Per modality: uniformity and norm of the centroid; per pair of modalities: modality gap,
    and, when rows are paired (row i of every modality is the same item), alignment."""
    out: dict = {"uniformity": {}, "centroid_norm": {}, "modality_gap": {}, "alignment": {}}
    names = list(embeddings)
    for name in names:
        emb = embeddings[name]
        out["uniformity"][name] = uniformity(emb, t) if len(emb) > 1 else float("nan")
        out["centroid_norm"][name] = float(F.normalize(emb.float(), dim=-1).mean(0).norm())
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            key = f"{a}-{b}"
            out["modality_gap"][key] = modality_gap(embeddings[a], embeddings[b])
            if paired and embeddings[a].shape == embeddings[b].shape:
                out["alignment"][key] = alignment(embeddings[a], embeddings[b])
    return out
