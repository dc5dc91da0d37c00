"""Few-shot linear probes on frozen embeddings (ImageBind's few-shot ESC-50 / SUN-D figure).

A multinomial logistic regression (torch, full-batch L-BFGS) on the normalised embeddings of
k labelled items per class. Its L2 weight decay is chosen on a validation split held out of the
training pool (never the test set): the pool is split once per class, the shots are drawn from
the rest, every decay of the grid is fitted, and the one with the best validation accuracy is
scored on the test set. k-shot results average several draws of the shots.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

DEFAULT_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_SHOTS = (1, 5, 10, None)  # None: every training item


@contextmanager
def _threads_for(work: int):
    """One thread for small problems: hundreds of tiny L-BFGS steps spend their time in
    thread hand-offs otherwise (100x slower on a loaded two-core machine)."""
    before = torch.get_num_threads()
    if work < 4_000_000 and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float | Sequence[float],
    max_iter: int = 100,
):
    """Cross-entropy + ``weight_decay * ||W||^2`` (bias not decayed) -> (W [C, D], b [C]).

    Given several decays, fits one model per decay in a single L-BFGS run and returns
    (W [G, C, D], b [G, C]): the objective is a sum of independent convex terms, so its
    minimiser is every term's own minimiser, at the cost of one fit instead of G.
    """
    single = not isinstance(weight_decay, (list, tuple))
    decays = torch.tensor([weight_decay] if single else list(weight_decay), dtype=torch.float32)
    x = F.normalize(x.float(), dim=-1)
    y = y.long()
    g = len(decays)
    weight = torch.zeros(g, num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(g, num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-8,
        line_search_fn="strong_wolfe",
    )
    targets = y.repeat(g)

    def closure():
        optimizer.zero_grad()
        logits = torch.einsum("nd,gcd->gnc", x, weight) + bias[:, None, :]
        ce = F.cross_entropy(logits.reshape(-1, num_classes), targets, reduction="none")
        loss = ce.view(g, -1).mean(1).sum() + (decays * weight.pow(2).sum((1, 2))).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), _threads_for(x.numel() * num_classes * g):
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return (weight[0], bias[0]) if single else (weight, bias)


def predict(model: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    weight, bias = model
    return (F.normalize(x.float(), dim=-1) @ weight.T + bias).argmax(dim=1)


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y.long()).float().mean()) if len(y) else float("nan")


def stratified_split(labels: torch.Tensor, fraction: float, generator: torch.Generator):
    """Per class, ``fraction`` of the items (at least one where a class has two or more) go to
    the second part -> (first indices, second indices)."""
    first, second = [], []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n = int(round(len(idx) * fraction))
        n = max(n, 1) if len(idx) > 1 and fraction > 0 else n
        second.append(idx[:n])
        first.append(idx[n:])
    return torch.cat(first), torch.cat(second)


def sample_shots(labels: torch.Tensor, k: int | None, generator: torch.Generator) -> torch.Tensor:
    """k indices per class (all of a class's items when it has fewer; everything for None)."""
    if k is None:
        return torch.arange(len(labels))
    picks = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.cat(picks)


def select_weight_decay(
    x_train,
    y_train,
    x_val,
    y_val,
    num_classes: int,
    grid: Sequence[float] = DEFAULT_GRID,
    max_iter: int = 100,
):
    """Fit every decay of ``grid`` -> (best decay, its model, {decay: validation accuracy}).
    Ties go to the stronger decay (the simpler model)."""
    grid = sorted(grid, reverse=True)
    weights, biases = fit_logistic(x_train, y_train, num_classes, list(grid), max_iter)
    scores, best = {}, None
    for i, wd in enumerate(grid):
        scores[wd] = accuracy((weights[i], biases[i]), x_val, y_val)
        if best is None or scores[wd] > scores[grid[best]]:
            best = i
    return grid[best], (weights[best], biases[best]), scores


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    shots: Sequence[int | None] = DEFAULT_SHOTS,
    seeds: int = 3,
    grid: Sequence[float] = DEFAULT_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
) -> dict:
    """k-shot linear-probe accuracy for each k of ``shots`` (None: all).

    Returns ``{"1": {"top1": mean, "std": ..., "runs": [...], "weight_decay": [...]}, ...}``
    keyed by the shot count ("all" for None).
    """
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    with _threads_for(train_x.numel() * num_classes * len(grid)):
        return _linear_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            num_classes,
            shots,
            seeds,
            grid,
            val_fraction,
            seed,
            max_iter,
        )


def _linear_probe(
    train_x, train_y, test_x, test_y, num_classes, shots, seeds, grid, val_fraction, seed, max_iter
) -> dict:
    g = torch.Generator().manual_seed(seed)
    pool, val = stratified_split(train_y, val_fraction, g)
    if len(val) == 0:
        raise ValueError("the training pool is too small to hold out a validation split")
    results = {}
    for k in shots:
        runs, decays, sizes = [], [], []
        for s in range(1 if k is None else seeds):
            draw = torch.Generator().manual_seed(seed * 1000 + s)
            chosen = pool[sample_shots(train_y[pool], k, draw)]
            wd, model, _ = select_weight_decay(
                train_x[chosen],
                train_y[chosen],
                train_x[val],
                train_y[val],
                num_classes,
                grid,
                max_iter,
            )
            runs.append(accuracy(model, test_x, test_y))
            decays.append(wd)
            sizes.append(len(chosen))
        t = torch.tensor(runs)
        results["all" if k is None else str(k)] = {
            "top1": float(t.mean()),
            "std": float(t.std()) if len(t) > 1 else 0.0,
            "runs": runs,
            "weight_decay": decays,
            "train_items": max(sizes),  # fewer than k x classes where a class has fewer
        }
    return results


def folded_linear_probe(x: torch.Tensor, y: torch.Tensor, folds: Sequence[int], **kwargs) -> dict:
    """Cross-fold protocol (ESC-50): each fold is the test set once, the other folds train;
    per fold results and the mean over folds for each shot count."""
    folds_t = torch.tensor(list(folds))
    per_fold = {}
    for fold in sorted(set(folds_t.tolist())):
        test = folds_t == fold
        per_fold[str(fold)] = linear_probe(x[~test], y[~test], x[test], y[test], **kwargs)
    shots = next(iter(per_fold.values())).keys()
    mean = {
        k: {"top1": sum(f[k]["top1"] for f in per_fold.values()) / len(per_fold)} for k in shots
    }
    return {"mean": mean, "per_fold": per_fold}


def format_linear_probe(results: dict, title: str = "linear probe") -> str:
    """shots | top-1 (mean over draws or folds) | spread."""
    table = results.get("mean", results)
    lines = [title, "shots | top1  | std", "------+-------+------"]
    for k, v in table.items():
        spread = f"{100 * v['std']:.1f}" if "std" in v else "-"
        lines.append(f"{k:>5} | {100 * v['top1']:5.1f} | {spread}")
    return "\n".join(lines)
