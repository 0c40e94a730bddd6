"""The popularity score (docs/popularity.md)."""

from __future__ import annotations

import numpy as np
import pytest

from apex_reward.popularity import (
    POPULARITY_EXPONENT,
    PopularityReference,
    percentile_ranks,
    popularity_scores,
    score_from_percentile,
)


def test_exponent_maps_80th_percentile_to_50():
    assert POPULARITY_EXPONENT == pytest.approx(3.1063, abs=1e-4)
    assert score_from_percentile(0.8) == pytest.approx(50.0)
    assert score_from_percentile(1.0) == pytest.approx(100.0)
    assert score_from_percentile(0.0) == 0.0


def test_scores_monotone_in_range_and_ties_share_rank():
    rng = np.random.default_rng(0)
    counts = rng.lognormal(5, 2, size=1000).round()
    s = popularity_scores(counts)
    assert ((s > 0) & (s <= 100)).all()
    order = np.argsort(counts)
    assert (np.diff(s[order]) >= 0).all()
    ties = popularity_scores([1, 5, 5, 9])
    assert ties[1] == ties[2]
    np.testing.assert_allclose(percentile_ranks([1, 5, 5, 9]), [0.25, 0.625, 0.625, 1.0])
    # the 80th percentile of 1..100 scores 50
    assert popularity_scores(np.arange(1, 101))[79] == pytest.approx(50.0)


def test_reference_scores_new_counts_consistently():
    rng = np.random.default_rng(1)
    streams = rng.lognormal(6, 2, size=20000).round()
    likes = rng.lognormal(3, 1.5, size=20000).round()
    ref = PopularityReference.from_counts({"streams": streams, "likes": likes})
    # scoring the reference set against itself approximates the in-set score
    approx = ref.score(streams, "streams")
    exact = popularity_scores(streams)
    assert np.abs(approx - exact).max() < 1.5
    assert (np.diff(ref.score(np.sort(likes), "likes")) >= -1e-9).all()
    assert ref.score([0], "streams")[0] < 1 and ref.score([1e12], "streams")[0] == 100.0
    again = PopularityReference.from_config(ref.to_config())
    np.testing.assert_array_equal(
        again.score(streams[:50], "streams"), ref.score(streams[:50], "streams")
    )
