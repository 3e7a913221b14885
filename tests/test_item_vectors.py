"""item_vectors.py: the item vectors that start the index-token rows."""
import torch

from item_vectors import collab_vectors

ITEMS = [str(i) for i in range(1, 13)]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def two_groups(users: int = 30) -> dict[str, list[int]]:
    """Users who watch items 1-6 in some order, others 7-12; each sequence ends in two held-out items."""
    g = torch.Generator().manual_seed(0)
    inters = {}
    for u in range(users):
        group = [1, 2, 3, 4, 5, 6] if u % 2 == 0 else [7, 8, 9, 10, 11, 12]
        order = [group[k] for k in torch.randperm(6, generator=g).tolist()]
        inters[str(u)] = order + [1 if u % 2 else 7, 2 if u % 2 else 8]  # held out: from the other group
    return inters


def test_items_watched_together_get_similar_vectors():
    vectors = collab_vectors(two_groups(), ITEMS, dim=32, rank=4)
    assert set(vectors) == set(ITEMS) and all(v.shape == (32,) for v in vectors.values())
    group = {i: int(i) <= 6 for i in ITEMS}
    within = [cosine(vectors[a], vectors[b]) for a in ITEMS for b in ITEMS if a < b and group[a] == group[b]]
    across = [cosine(vectors[a], vectors[b]) for a in ITEMS for b in ITEMS if group[a] != group[b]]
    # rank 4 is more than two groups need: how the SVD splits the spare, nearly tied directions moves
    # single pairs from one CPU to another, so the margin is asked of the means, not of the extremes
    assert min(within) > max(across)
    assert sum(within) / len(within) > sum(across) / len(across) + 0.5
    for a in ITEMS:  # every item's nearest neighbour was watched with it
        nearest = max((b for b in ITEMS if b != a), key=lambda b: cosine(vectors[a], vectors[b]))
        assert group[nearest] == group[a]


def test_held_out_items_are_never_read():
    """The last two items of every sequence (validation, test) cross the groups; they must not link them."""
    vectors = collab_vectors(two_groups(), ITEMS, dim=32, rank=4)
    assert max(cosine(vectors["1"], vectors[b]) for b in ("7", "8", "9")) < 0.5


def test_items_without_co_occurrence_get_no_vector_and_the_map_keeps_inner_products():
    inters = {**two_groups(), "lonely": [99, 1, 2]}  # 99: only a training item that occurs alone
    vectors = collab_vectors(inters, ITEMS + ["99"], dim=32, rank=4)
    assert "99" not in vectors
    small = collab_vectors(inters, ITEMS + ["99"], dim=4, rank=4)  # the same reduction, a square (rotation) map
    big = torch.stack([vectors[i] for i in ITEMS])
    low = torch.stack([small[i] for i in ITEMS])
    assert torch.allclose(big @ big.T, low @ low.T, atol=1e-4)
    assert collab_vectors({"u": [1, 2, 3]}, ITEMS, dim=8) == {}  # one training item: nothing co-occurs
