"""Bootstrap intervals (evaluation/uncertainty.py) against cases with known answers."""

import math

import pytest
import torch

from imagebind_lite.evaluation.uncertainty import bootstrap_ci, method


def normal_width(p: float, n: int) -> float:
    return 2 * 1.96 * math.sqrt(p * (1 - p) / n)


def test_constant_values_have_no_spread_and_two_items_span_zero_to_one():
    assert bootstrap_ci(torch.ones(50)) == [1.0, 1.0]
    assert bootstrap_ci(torch.full((7,), 0.25)) == [0.25, 0.25]
    # The mean of two resampled items out of {0, 1} is 0, 0.5 or 1 with p = 1/4, 1/2, 1/4:
    # its 2.5th and 97.5th percentiles are 0 and 1.
    assert bootstrap_ci(torch.tensor([0.0, 1.0])) == [0.0, 1.0]


def test_a_binomial_interval_matches_the_normal_approximation():
    hits = torch.zeros(1000)
    hits[:700] = 1  # top-1 of 70% on 1,000 items
    lo, hi = bootstrap_ci(hits)
    assert lo < 0.7 < hi
    assert abs((hi - lo) / normal_width(0.7, 1000) - 1) < 0.2
    assert abs((lo + hi) / 2 - 0.7) < 0.005
    assert bootstrap_ci(hits) == [lo, hi]  # seeded
    assert bootstrap_ci(hits[torch.randperm(1000)]) == [lo, hi]  # whatever the items' order
    assert bootstrap_ci(hits, seed=1) != [lo, hi]
    narrow = bootstrap_ci(hits, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


def test_groups_resample_whole_sources():
    # 100 independent items, each recorded 10 times: the group bootstrap sees 100 draws (the
    # width of 100 items), where treating the copies as independent would be sqrt(10) narrower.
    base = torch.zeros(100)
    base[:60] = 1
    values = base.repeat_interleave(10)
    groups = torch.arange(100).repeat_interleave(10)
    lo, hi = bootstrap_ci(values, groups)
    assert abs((hi - lo) / normal_width(0.6, 100) - 1) < 0.2
    order = torch.randperm(1000)
    assert bootstrap_ci(values[order], groups[order]) == [lo, hi]
    naive = bootstrap_ci(values)
    assert (hi - lo) > 2.5 * (naive[1] - naive[0])
    # Unequal groups: the metric is the resampled items' mean, not the mean of group means.
    assert bootstrap_ci(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 1]))[1] == 1.0


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci(torch.tensor([]))
    with pytest.raises(ValueError, match="3 groups for 4 values"):
        bootstrap_ci(torch.ones(4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_ci(torch.ones(4), level=95)
    assert method() == "95% percentile bootstrap over items, 2000 resamples, seed 0"
