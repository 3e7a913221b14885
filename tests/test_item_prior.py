"""item_prior.py: the popularity prior's counts, ranking and weights."""
import pytest

from item_prior import item_prior, popularity_prior, popularity_ranking
from utils import DataError


def test_popularity_counts_training_part_only():
    # the last two items of each user (validation, test) must not count
    inters = {"0": [5, 5, 1, 9, 9], "1": [1, 2, 9, 9], "2": [2, 1, 7, 8]}
    # training parts: [5,5,1] [1,2] [2,1] -> 1:3, 5:2, 2:2 ; ties by item id
    assert popularity_ranking(inters) == ["1", "2", "5"]


def test_popularity_prior_smooths_counts_and_refuses_bad_names():
    """The prior's weights: training counts + 1 for every item asked for (unseen items too); an
    unknown prior name (from a checkpoint's config.json) and a non-positive smoothing are refused."""
    inters = {"u1": [1, 2, 3, 9, 9], "u2": [2, 3, 2, 8, 8]}  # training parts: [1, 2, 3] and [2, 3, 2]
    assert popularity_prior(inters, ["1", "2", "3", "7"]) == {"1": 2.0, "2": 4.0, "3": 3.0, "7": 1.0}
    assert item_prior("none", None, ["1"]) is None
    assert item_prior("popularity", None, ["2"], inters) == {"2": 4.0}
    with pytest.raises(DataError, match="unknown prior 'zipf'"):
        item_prior("zipf", None, ["1"], inters)
    with pytest.raises(DataError, match="smoothing must be positive"):
        popularity_prior(inters, ["1"], smoothing=0.0)
