"""The co-occurrence teacher of --teacher_weight (item_teacher.py) and its place in the trie loss."""
import pytest
import torch

from index_loss import IGNORE_INDEX, IndexSoftmax
from item_teacher import CooccurrenceTeacher
from item_trie import IndexTrie

EOS = 0
# 6 items, 2 levels: a-codes 1..3, b-codes 11..13 (token ids); item n is ITEMS[n]
ITEMS = [[1, 11], [1, 12], [2, 11], [2, 12], [2, 13], [3, 11]]
TEXT = 50  # a text token (level -1)


def teacher(inters, context=2, smoothing=0.0):
    trie = IndexTrie(ITEMS, EOS)
    names = [str(n) for n in range(len(ITEMS))]
    return CooccurrenceTeacher.build(inters, names, trie, ITEMS, context=context, window=context,
                                     smoothing=smoothing), trie


def level_of():
    table = torch.full((60,), -1, dtype=torch.long)
    table[[1, 2, 3]] = 0
    table[[11, 12, 13]] = 1
    return table


def row(*items):
    return [TEXT, TEXT] + [tok for n in items for tok in ITEMS[n]] + [EOS]


def test_teacher_reads_what_followed_the_context_and_leaves_out_the_rows_own_pairs():
    # training parts (the last two items of each user are held out): 0 -> 1 twice, 0 -> 4 once
    inters = {"u1": [0, 1, 9, 9], "u2": [0, 1, 9, 9], "u3": [0, 4, 9, 9]}
    inters = {u: [i for i in s if i != 9] + [5, 5] for u, s in inters.items()}
    t, _ = teacher(inters, context=1)
    ids = torch.tensor([row(0, 1)])  # this row holds one of the 0 -> 1 pairs itself
    teacher_of, q = t.targets(ids, level_of())
    assert teacher_of[0, 2] == -1  # the first item has no context: no teacher
    k = int(teacher_of[0, 4])
    assert k == 0 and q.shape == (1, len(ITEMS))
    # after 0: item 1 once more (its own pair taken out), item 4 once; item 0 is in the history
    assert q[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0, 0.5, 0.0])
    assert float(q.sum()) == pytest.approx(1.0)


def test_teacher_falls_back_to_popularity_and_never_proposes_the_history():
    inters = {"u1": [2, 3, 5, 5], "u2": [2, 3, 5, 5]}
    t, _ = teacher(inters, context=2, smoothing=0.0)
    ids = torch.tensor([row(0, 1, 2)])  # 0 and 1 never came before anything in training
    teacher_of, q = t.targets(ids, level_of())
    k = int(teacher_of[0, 6])
    assert q[k, [0, 1]].tolist() == [0.0, 0.0]  # the row's earlier items
    pop = torch.tensor([1.0, 1.0, 3.0, 3.0, 1.0, 1.0])  # training counts + 1
    pop[[0, 1]] = 0
    assert q[k].tolist() == pytest.approx((pop / pop.sum()).tolist())


def test_children_add_up_the_teacher_mass_below_each_child_of_the_prefix():
    t, trie = teacher({"u": [0, 1, 2, 3, 4, 5, 5, 5]})
    q = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.2, 0.1]])
    root = torch.tensor([trie.ROOT])
    first = t.children(q, root, 0)  # children of the root in the trie's order: a-codes 1, 2, 3
    order = trie.allowed[trie.ROOT, :3].tolist()
    mass = {1: 0.3, 2: 0.6, 3: 0.1}
    assert first[0, :3].tolist() == pytest.approx([mass[a] for a in order])
    after_2 = trie.step(root, torch.tensor([2]))
    second = t.children(q, after_2, 1)  # b-codes after a = 2: items 2, 3, 4 -> 0.3, 0.1, 0.2 of 0.6
    kids = trie.allowed[after_2[0], :3].tolist()
    want = {11: 0.5, 12: 1 / 6, 13: 1 / 3}
    assert second[0, :3].tolist() == pytest.approx([want[b] for b in kids])
    assert float(second[0].sum()) == pytest.approx(1.0)


def _loss_inputs(seed=0):
    ids = torch.tensor([row(0, 1, 3), row(2, 4, 5)])
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    head = torch.nn.Linear(8, 60, bias=False)
    torch.manual_seed(seed)
    torch.nn.init.normal_(head.weight)
    hidden = torch.randn(ids.shape[0], ids.shape[1], 8, requires_grad=True)
    return ids, labels, head, hidden


def test_trie_loss_with_the_teacher_at_weight_0_is_the_plain_loss_and_the_teacher_moves_it():
    inters = {"u1": [0, 1, 3, 5, 4, 2], "u2": [2, 4, 5, 1, 0, 3], "u3": [1, 3, 5, 0, 2, 4]}
    t, trie = teacher(inters, context=2, smoothing=0.1)
    ids, labels, head, hidden = _loss_inputs()
    plain = IndexSoftmax(trie, 60, "trie")(hidden, labels, head, ids)
    zero = IndexSoftmax(trie, 60, "trie", teacher=t, teacher_weight=0.0)(hidden, labels, head, ids)
    half = IndexSoftmax(trie, 60, "trie", teacher=t, teacher_weight=0.5)(hidden, labels, head, ids)
    assert float(zero.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    assert abs(float(half.detach()) - float(plain.detach())) > 1e-3
    half.backward()  # the soft targets are constants; the gradient reaches the hidden states
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) > 0


def test_the_teacher_alone_is_minimised_by_its_own_distribution():
    """At weight 1 a target's loss is the teacher's cross-entropy over the children: lowest when the
    model's children probabilities equal the teacher's (Gibbs)."""
    inters = {"u1": [0, 1, 3, 5, 4, 2], "u2": [2, 4, 5, 1, 0, 3], "u3": [1, 3, 5, 0, 2, 4]}
    t, trie = teacher(inters, context=2, smoothing=0.1)
    ids, labels, head, _ = _loss_inputs()
    loss = IndexSoftmax(trie, 60, "trie", teacher=t, teacher_weight=1.0)
    teacher_of, q = t.targets(ids, level_of())
    # one target: the b-token of the third item of row 0 (item 3 = [2, 12]), prefix a = 2
    k = int(teacher_of[0, 6])
    state = trie.step(torch.tensor([trie.ROOT]), torch.tensor([2]))
    p = t.children(q[k:k + 1], state, 1)[0, :3]
    only = labels.clone().fill_(IGNORE_INDEX)
    only[0, 7] = ids[0, 7]
    kids = trie.allowed[state[0], :3]
    with torch.no_grad():
        head.weight.zero_()
        hidden = torch.zeros(1, ids.shape[1], 8)
        hidden[0, 6, :3] = 1.0
        head.weight[kids, torch.arange(3)] = p.clamp(min=1e-6).log()  # the logits of the teacher's distribution
        best = float(loss(hidden, only[:1], head, ids[:1]))
        entropy = float(-(p * p.clamp(min=1e-12).log()).sum())
        assert best == pytest.approx(entropy, rel=1e-4)
        head.weight[kids, torch.arange(3)] = torch.tensor([1.0, 0.0, -1.0])  # any other logits score higher
        assert float(loss(hidden, only[:1], head, ids[:1])) > best


def test_teacher_flags_are_checked(capsys):
    from arguments import parse_args

    for flags, message in ((["--teacher_weight", "0.5"], "--teacher_weight needs --index_softmax trie"),
                           (["--teacher_weight", "1.5", "--index_softmax", "trie"], "--teacher_weight: 1.5"),
                           (["--teacher_context", "0"], "--teacher_context: 0")):
        with pytest.raises(SystemExit) as e:
            parse_args("train", flags)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert parse_args("train", ["--teacher_weight", "0.5", "--index_softmax", "trie"]).teacher_weight == 0.5


def test_ranker_reads_the_last_items_of_a_history_and_ranks_every_item():
    """--fusion_weight and baseline.py --ranker cooccurrence: what followed the history's last
    ``context`` items, each item's row normalised with one pseudo-count, smoothed with popularity;
    the history's own items are not masked (the protocol ranks every item)."""
    from item_teacher import CooccurrenceRanker

    # training parts: 0 -> 1 twice, 0 -> 4 once, 2 -> 3 once
    inters = {"u1": [0, 1, 5, 5], "u2": [0, 1, 5, 5], "u3": [0, 4, 5, 5], "u4": [2, 3, 5, 5]}
    names = [str(n) for n in range(len(ITEMS))]
    ranker = CooccurrenceRanker.build(inters, names, context=1, window=1, smoothing=0.0, decay=1.0, damping=0.0)
    q = ranker.next_item([[3, 0], [0, 2], [5]])  # context 1: only the last item counts
    assert q[0].tolist() == pytest.approx([0.0, 2 / 3, 0.0, 0.0, 1 / 3, 0.0])
    assert q[1].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    popularity = torch.tensor([3.0, 2, 1, 1, 1, 0]) + 1  # item 5 is never in a training part
    assert q[2].tolist() == pytest.approx((popularity / popularity.sum()).tolist())  # no count: popularity
    smooth = CooccurrenceRanker.build(inters, names, context=2, window=1, smoothing=0.5, decay=1.0,
                                      damping=0.0).next_item([[2, 0], []])
    # rows: 0 -> (1: 2/4, 4: 1/4), 2 -> (3: 1/2); summed 1.25, then half of it and half popularity
    counted = torch.tensor([0.0, 0.5, 0, 0.5, 0.25, 0]) / 1.25
    assert smooth[0].tolist() == pytest.approx((0.5 * counted + 0.5 * popularity / popularity.sum()).tolist())
    assert smooth[1].tolist() == pytest.approx((popularity / popularity.sum()).tolist())


def test_ranker_weighs_recent_context_items_and_damps_popular_followers():
    """``decay``: the k-th newest context item's follow row is weighed decay ** k; ``damping``: each
    candidate's summed follow mass is divided by its popularity share ** damping before normalising."""
    from item_teacher import CooccurrenceRanker

    # training parts: 0 -> 1 twice, 0 -> 4 once, 2 -> 3 once (item 1 is the more popular follower)
    inters = {"u1": [0, 1, 5, 5], "u2": [0, 1, 5, 5], "u3": [0, 4, 5, 5], "u4": [2, 3, 5, 5]}
    names = [str(n) for n in range(len(ITEMS))]
    popularity = torch.tensor([3.0, 2, 1, 1, 1, 0]) + 1
    share = popularity / popularity.sum()
    rows = {0: torch.tensor([0.0, 2 / 4, 0, 0, 1 / 4, 0]), 2: torch.tensor([0.0, 0, 0, 1 / 2, 0, 0])}
    recent = CooccurrenceRanker.build(inters, names, context=2, window=1, smoothing=0.0, decay=0.25, damping=0.0)
    q = recent.next_item([[2, 0]])[0]  # 0 is the newest (weight 1), 2 the older (weight 0.25)
    expected = rows[0] + 0.25 * rows[2]
    assert q.tolist() == pytest.approx((expected / expected.sum()).tolist())
    assert q[1] / q[3] == pytest.approx((2 / 4) / (0.25 * 1 / 2))  # equal weights would give 1
    damped = CooccurrenceRanker.build(inters, names, context=1, window=1, smoothing=0.0, decay=1.0, damping=1.0)
    q = damped.next_item([[0]])[0]
    expected = rows[0] / share
    assert q.tolist() == pytest.approx((expected / expected.sum()).tolist())
    assert q[1] / q[4] == pytest.approx((2 / 4 / share[1]) / (1 / 4 / share[4]))  # 1 stays ahead, by less
    with pytest.raises(ValueError, match="decay"):
        CooccurrenceRanker.build(inters, names, decay=0.0)
    with pytest.raises(ValueError, match="damping"):
        CooccurrenceRanker.build(inters, names, damping=-0.5)


def test_state_log_mass_sums_the_items_below_each_state():
    t, trie = teacher({"u1": [0, 1, 5, 5]})
    q = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.1, 0.3]])
    mass = t.state_log_mass(q).exp()[0]
    assert float(mass[IndexTrie.ROOT]) == pytest.approx(1.0)
    prefix_a2 = int(trie.paths(torch.tensor([[2, 11]]))[0, 0])
    assert float(mass[prefix_a2]) == pytest.approx(0.4)  # items 2, 3, 4
    leaves = t.paths[:, -1]
    assert mass[leaves].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.0, 0.1, 0.3], rel=1e-5, abs=1e-12)
    assert torch.isfinite(t.state_log_mass(q)).all()  # dead ends and empty states: a finite floor
