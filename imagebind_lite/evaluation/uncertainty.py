"""Confidence intervals for evaluation figures: a seeded percentile bootstrap over the evaluated
items, or over groups of items where items share a source (a speaker, a writer), since items of
one source are not independent draws.

Every metric the project reports is a mean over items of a per-item value (1/0 for top-1, top-5
and R@K hits), so the bootstrap resamples those values: items with replacement (``groups=None``),
or whole groups with replacement, the metric then being the resampled items' mean (a cluster
bootstrap). The interval is the 2.5th and 97.5th percentiles of ``resamples`` such means.
"""

from __future__ import annotations

import torch

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_ci(
    values: torch.Tensor,
    groups: torch.Tensor | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> list[float]:
    """``[lo, hi]``: the ``level`` percentile-bootstrap interval of ``values.mean()``.

    ``values`` is one number per evaluated item; ``groups`` (same length, any integer ids), when
    given, makes whole groups the resampled units. Seeded, and independent of the items' order:
    the same items (and groups) give the same interval.
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    g = torch.Generator().manual_seed(seed)
    if groups is None:
        # Sorted first, so that the same items in another order give the same interval.
        values = values.sort().values
        picks = torch.randint(len(values), (resamples, len(values)), generator=g)
        means = values[picks].mean(dim=1)
    else:
        groups = torch.as_tensor(groups).flatten()
        if groups.shape != values.shape:
            raise ValueError(f"bootstrap_ci: {len(groups)} groups for {len(values)} values")
        _, owner = torch.unique(groups, return_inverse=True)
        n = int(owner.max()) + 1
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, values)
        counts = torch.bincount(owner, minlength=n).double()
        picks = torch.randint(n, (resamples, n), generator=g)
        means = sums[picks].sum(dim=1) / counts[picks].sum(dim=1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return [float(lo), float(hi)]


def method(groups: str | None = None) -> str:
    """How the intervals were made, for ``metrics.json``."""
    unit = f"groups ({groups})" if groups else "items"
    return f"{LEVEL:.0%} percentile bootstrap over {unit}, {RESAMPLES} resamples, seed 0"
