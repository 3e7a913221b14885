import math

import pytest

from metrics import aggregate, compute_metrics, format_table, metric_value, parse_metrics, target_rank
from utils import DataError


def test_parse_metrics():
    assert parse_metrics("hit@1,HR@5, ndcg@10,hit@5") == ["hit@1", "hit@5", "ndcg@10"]
    for bad in ("recall@5", "ndcg@0", "hit", ""):
        with pytest.raises(DataError, match="--metrics"):
            parse_metrics(bad)


def test_hit_and_ndcg_by_hand():
    rankings = [["a", "b", "c", "d", "e", "f"], ["c", "a", "b", "x", "y", "z"], ["q", "w", "e", "r", "t", "y"],
                ["z", "y", "x", "w", "v", "u"]]
    targets = ["a", "b", "y", "nope"]
    ranks = [target_rank(r, t) for r, t in zip(rankings, targets)]
    assert ranks == [1, 3, 6, 0]
    res = compute_metrics(ranks, ["hit@1", "hit@3", "hit@5", "hit@10", "ndcg@3", "ndcg@10"])
    assert res["hit@1"] == pytest.approx(1 / 4)
    assert res["hit@3"] == pytest.approx(2 / 4)
    assert res["hit@5"] == pytest.approx(2 / 4)
    assert res["hit@10"] == pytest.approx(3 / 4)
    # DCG with one relevant item: 1/log2(rank+1); ideal DCG = 1
    assert res["ndcg@3"] == pytest.approx((1.0 + 0.5) / 4)  # log2(4) = 2
    assert res["ndcg@10"] == pytest.approx((1.0 + 0.5 + 1 / math.log2(7)) / 4)
    assert metric_value("ndcg@5", 0) == 0.0 and metric_value("hit@5", 6) == 0.0
    with pytest.raises(DataError, match="empty"):
        compute_metrics([], ["hit@1"])


def test_per_prompt_aggregation():
    per_prompt = {"0": {"hit@1": 0.2, "ndcg@5": 0.3}, "3": {"hit@1": 0.4, "ndcg@5": 0.1},
                  "7": {"hit@1": 0.0, "ndcg@5": 0.2}}
    agg = aggregate(per_prompt, ["hit@1", "ndcg@5"])
    assert agg["mean"] == pytest.approx({"hit@1": 0.2, "ndcg@5": 0.2})
    assert agg["min"] == {"hit@1": 0.0, "ndcg@5": 0.1}
    assert agg["max"] == {"hit@1": 0.4, "ndcg@5": 0.3}
    table = format_table(per_prompt, agg, ["hit@1", "ndcg@5"])
    assert "mean" in table and "0.4000" in table and len(table.splitlines()) == 2 + 3 + 1 + 3


def test_standard_errors_match_the_formula():
    from metrics import standard_errors

    ranks = [1, 0, 3, 12, 1, 0]
    hits = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # hit@10
    mean = sum(hits) / 6
    expected = (sum((h - mean) ** 2 for h in hits) / 5 / 6) ** 0.5
    assert standard_errors(ranks, ["hit@10"])["hit@10"] == pytest.approx(expected)
    assert standard_errors([2], ["hit@1"]) == {"hit@1": 0.0}


def test_personalisation_sees_a_collapsed_model():
    from metrics import personalisation

    same = [list("abcdefghij")] * 5
    assert personalisation(same) == {"distinct_top1": 1, "top10_differs_share": 0.0}
    varied = same[:3] + [list("bacdefghij"), list("cabdefghij")]
    assert personalisation(varied) == {"distinct_top1": 3, "top10_differs_share": pytest.approx(0.4)}


def test_per_user_values_average_the_rank_lists():
    from metrics import per_user_values

    # two prompt templates over three users: ranks 1 and 3 for u1, missing and 2 for u2, 12 and 0 for u3
    values = per_user_values(["u1", "u2", "u3"], [[1, 0, 12], [3, 2, 0]], ["hit@1", "hit@10", "ndcg@10"])
    assert values["users"] == ["u1", "u2", "u3"]
    assert values["hit@1"] == [0.5, 0.0, 0.0]
    assert values["hit@10"] == [1.0, 0.5, 0.0]
    assert values["ndcg@10"] == pytest.approx([(1 + 0.5) / 2, 1 / math.log2(3) / 2, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="one rank per user"):
        per_user_values(["u1", "u2"], [[1, 2, 3]], ["hit@1"])


def test_paired_difference_matches_the_formula_and_pairs_by_user():
    from metrics import paired_difference, per_user_values

    users = [f"u{i}" for i in range(8)]
    a = per_user_values(users, [[1, 2, 0, 5, 1, 0, 0, 3]], ["hit@1", "hit@10"])
    b = per_user_values(users, [[1, 0, 0, 5, 2, 0, 0, 4]], ["hit@1", "hit@10"])
    diffs = [x - y for x, y in zip(a["hit@10"], b["hit@10"])]  # 0, 1, 0, 0, 0, 0, 0, 0
    mean = sum(diffs) / 8
    se = (sum((d - mean) ** 2 for d in diffs) / 7 / 8) ** 0.5
    got = paired_difference(a, b, ["hit@1", "hit@10"])
    assert got["hit@10"] == pytest.approx((mean, se))
    assert got["hit@1"][0] == pytest.approx(1 / 8)
    # the same users in another order pair the same way
    order = [3, 7, 0, 5, 1, 6, 2, 4]
    shuffled = {k: [v[i] for i in order] for k, v in b.items()}
    assert paired_difference(a, shuffled, ["hit@10"])["hit@10"] == pytest.approx((mean, se))
    assert paired_difference(a, a, ["hit@10"])["hit@10"] == (0.0, 0.0)
    # both models hit the same users but one: the paired error is far below the two errors combined
    separate = (standard_errors_of(a["hit@10"]) ** 2 + standard_errors_of(b["hit@10"]) ** 2) ** 0.5
    assert se < 0.6 * separate


def test_paired_difference_refuses_different_users():
    from metrics import paired_difference, per_user_values

    a = per_user_values(["u1", "u2"], [[1, 0]], ["hit@1"])
    b = per_user_values(["u1", "u3"], [[1, 0]], ["hit@1"])
    with pytest.raises(DataError, match="different test users"):
        paired_difference(a, b, ["hit@1"], ("lcrec.json", "popularity.json"))
    with pytest.raises(DataError, match="no per-user values of hit@5"):
        paired_difference(a, a, ["hit@5"])


def test_paired_difference_with_several_examples_of_a_user_pairs_by_position():
    from metrics import paired_difference, per_user_values

    users = ["u1", "u1", "u2"]  # e.g. two item searches of one user
    a = per_user_values(users, [[1, 0, 1]], ["hit@1"])
    b = per_user_values(users, [[0, 0, 1]], ["hit@1"])
    assert paired_difference(a, b, ["hit@1"])["hit@1"][0] == pytest.approx(1 / 3)
    reordered = per_user_values(["u1", "u2", "u1"], [[0, 1, 0]], ["hit@1"])
    with pytest.raises(DataError, match="several examples of one user in different orders"):
        paired_difference(a, reordered, ["hit@1"])


def standard_errors_of(values):
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5
