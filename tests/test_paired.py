"""The paired bootstrap interval of two runs' per-user NDCG@10 difference."""

import numpy as np
import pytest

from diffgrm_dist.evaluate.paired import ndcg_at, paired_interval


def test_ndcg_of_one_true_item_by_hand():
    np.testing.assert_allclose(ndcg_at(np.array([1, 2, 10, 11, 0])), [1.0, 1 / np.log2(3), 1 / np.log2(11), 0, 0])


def test_the_interval_holds_the_true_difference_and_tightens_with_pairing():
    rng = np.random.default_rng(0)
    users = 20_000
    a = np.where(rng.random(users) < 0.08, rng.integers(1, 11, users), 0)
    b = a.copy()
    lost = np.nonzero(a)[0][::4]  # b misses a quarter of a's hits: a known, positive difference
    b[lost] = 0
    true_diff = ndcg_at(a).mean() - ndcg_at(b).mean()
    diff, lo, hi = paired_interval(a, b)
    assert diff == pytest.approx(true_diff) and lo < true_diff < hi and lo > 0
    # Unpaired (b's users shuffled) the same difference has a wider interval.
    _, lo_u, hi_u = paired_interval(a, rng.permutation(b))
    assert hi_u - lo_u > 1.5 * (hi - lo)
    assert paired_interval(a, b, seed=1) != (diff, lo, hi) and paired_interval(a, b) == (diff, lo, hi)  # seeded
    with pytest.raises(ValueError, match="same users"):
        paired_interval(a, b[:-1])
