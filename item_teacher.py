"""The item co-occurrence count of the training parts, in three uses: a ranker on its own
(``baseline.py --ranker cooccurrence``), a term added to the beam scores (``--fusion_weight``,
``CooccurrenceRanker`` mapped onto the trie by ``CooccurrenceTeacher.state_log_mass``) and soft
next-item targets in training (``--teacher_weight``, below).

A training example shows the LLM one next item per history position; on ml-100k the `cpu` profile
sees each of the training parts' transitions about twice in its 1,350 steps, while a count of which
items followed which (``bench/probe_signals.py``, "item co-occurrence") reads all of them at once and
ranks the test items above every learned model. The teacher hands that count to every target: for
the next item after the last ``context`` items of a row, the items that followed those within
``window`` steps in the training parts (each context item's counts normalised over its row),
smoothed with popularity, never an item already in the row before the target. The loss of each
index token is then (1 - w) x the cross-entropy of the true token plus w x the cross-entropy of the
teacher's distribution over the same children (the trie softmax's choices: the teacher's item mass
below each child of the true prefix).

The counts are of the training parts only (``s[:-2]``); each row's own pairs (its items within
``window`` steps of each other, which the counts include) are taken out of the teacher of that row,
so the teacher does not hand the row its own answer. Off by default; needs ``--index_softmax trie``.
At a row's end (``next_item``: the ranker and fusion) nothing is taken out and nothing is masked.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from arguments import COOCCURRENCE_DEFAULTS
from dataset_files import train_part
from item_prior import popularity_prior
from item_trie import IndexTrie
from item_vectors import follow_counts


# The ranker's settings where it ranks or fuses: the defaults of --fusion_context, --fusion_window,
# --fusion_decay and --fusion_damping; the teacher keeps its own (--teacher_context, equal weights, no damping).
CONTEXT, WINDOW, DECAY, DAMPING = COOCCURRENCE_DEFAULTS


class CooccurrenceRanker:
    """The item co-occurrence count model: a distribution over the next item after a history (the
    items that followed its last ``context`` items within ``window`` steps in the training parts, each
    item's counts normalised over its row, the k-th most recent item weighed ``decay`` ** k, each
    candidate's sum divided by its popularity ** ``damping``, smoothed with popularity). It ranks on its
    own (``baseline.py --ranker cooccurrence``), fuses with the LLM's beam scores (``--fusion_weight``)
    and, as ``CooccurrenceTeacher``, gives the soft targets of ``--teacher_weight``."""

    tensors = ("follow", "increment", "popularity", "recency", "damper")  # what ``to`` moves

    def __init__(self, counts: torch.Tensor, popularity: torch.Tensor, context: int = CONTEXT, window: int = WINDOW,
                 smoothing: float = 0.1, decay: float = DECAY, damping: float = DAMPING):
        """``counts`` [N, N]: how often item j came within ``window`` steps after item i in the training
        parts; ``popularity`` [N] training counts (any positive scale); ``smoothing``: the popularity share;
        ``decay`` in (0, 1]: the weight of each older context item relative to the next newer one;
        ``damping`` >= 0: how much a popular candidate's follow mass is discounted (0: not at all)."""
        if not 0 <= smoothing <= 1:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        row = counts.sum(1)  # [N]
        self.follow = counts / (row[:, None] + 1)  # [N, N] P(j follows | i), with one pseudo-count of "nothing"
        self.increment = 1 / (row + 1)  # [N] what one pair adds to its row of ``follow``
        self.popularity = popularity / popularity.sum()  # [N]
        self.recency = decay ** torch.arange(int(context), dtype=torch.float32)  # [R] newest context item first
        # popular items follow everything; dividing by a power of popularity ranks the specific followers up
        self.damper = self.popularity.pow(-damping) if damping else torch.ones_like(self.popularity)  # [N]
        self.context, self.window, self.smoothing = int(context), int(window), float(smoothing)
        self.decay, self.damping = float(decay), float(damping)

    @staticmethod
    def count(inters: dict[str, list], items: Sequence[str], window: int = WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
        """The interactions (user -> item ids, oldest first) and the items -> (follow counts [N, N],
        popularity [N]) of the training parts, in the order of ``items``."""
        pos = {str(item): k for k, item in enumerate(items)}
        seqs = [[pos[str(i)] for i in train_part(seq) if str(i) in pos] for seq in inters.values()]
        n = len(items)
        counts = torch.from_numpy(follow_counts(seqs, np.arange(n), n, window).toarray()).float()
        prior = popularity_prior(inters, items)  # training counts + 1, as --index_prior popularity
        return counts, torch.tensor([prior[str(item)] for item in items], dtype=torch.float32)

    @classmethod
    def build(cls, inters: dict[str, list], items: Sequence[str], context: int = CONTEXT, window: int = WINDOW,
              smoothing: float = 0.1, decay: float = DECAY, damping: float = DAMPING) -> "CooccurrenceRanker":
        """From the interactions and the items (the order of the distributions' columns)."""
        return cls(*cls.count(inters, items, window), context, window, smoothing, decay, damping)

    def to(self, device: torch.device) -> "CooccurrenceRanker":
        for name in self.tensors:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def smoothed(self, scores: torch.Tensor) -> torch.Tensor:
        """Summed follow rows [K, N] -> distributions [K, N]: their share ``1 - smoothing`` (after the
        popularity damping), popularity the rest (popularity alone where a row has no count)."""
        scores = scores * self.damper
        total = scores.sum(1, keepdim=True)
        return torch.where(total > 0, (1 - self.smoothing) * scores / total.clamp(min=1e-12)
                           + self.smoothing * self.popularity, self.popularity.expand_as(scores))

    def next_item(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Histories (positions of items in the columns' order, oldest first) -> the distribution over
        the item after each [B, N]. No own pair is taken out (the next item is in no count) and no item
        is masked (the ranking protocol ranks every item)."""
        ctx = torch.full((len(histories), self.context), -1, dtype=torch.long)  # [B, R] the last items
        for row, history in enumerate(histories):
            last = list(history)[-self.context:]
            ctx[row, :len(last)] = torch.as_tensor(last[::-1], dtype=torch.long)
        ctx = ctx.to(self.follow.device)
        weight = (ctx >= 0) * self.recency  # [B, R]
        scores = (self.follow[ctx.clamp(min=0)] * weight[..., None]).sum(1)  # [B, N]
        return self.smoothed(scores)


class CooccurrenceTeacher(CooccurrenceRanker):
    """The ranker's distributions for the item targets of a batch (``targets``), over the trie's
    children for each index token of those targets (``children``) and over its states (``state_log_mass``)."""

    tensors = CooccurrenceRanker.tensors + ("paths", "leaf_item")

    def __init__(self, counts: torch.Tensor, popularity: torch.Tensor, trie: IndexTrie,
                 item_tokens: Sequence[Sequence[int]], context: int = 5, window: int = 5, smoothing: float = 0.1,
                 decay: float = 1.0, damping: float = 0.0):
        """``counts`` and the settings as the ranker's (the teacher's defaults: equal weights, no damping);
        ``item_tokens``: the token ids of item n, in the order ``trie`` was built in."""
        super().__init__(counts, popularity, context, window, smoothing, decay, damping)
        self.trie = trie
        tokens = torch.as_tensor([list(t) for t in item_tokens], dtype=torch.long)  # [N, L]
        self.paths = trie.paths(tokens)  # [N, L] the state after each token of each item
        self.leaf_item = torch.full((len(trie.items_below),), -1, dtype=torch.long)  # [S] item at a leaf
        self.leaf_item[self.paths[:, -1]] = torch.arange(counts.shape[0])

    @classmethod
    def build(cls, inters: dict[str, list], items: Sequence[str], trie: IndexTrie,
              item_tokens: Sequence[Sequence[int]], context: int = 5, window: int = 5,
              smoothing: float = 0.1, decay: float = 1.0, damping: float = 0.0) -> "CooccurrenceTeacher":
        """From the interactions (user -> item ids, oldest first) and the items in the trie's order."""
        counts, popularity = cls.count(inters, items, window)
        return cls(counts, popularity, trie, item_tokens, context, window, smoothing, decay, damping)

    def targets(self, input_ids: torch.LongTensor, level_of: torch.LongTensor) -> tuple[torch.LongTensor, torch.Tensor]:
        """Rows of token ids [B, T] (``level_of`` [V]: each token's index level, -1 for text) ->
        (the teacher row of the item that starts at each position [B, T], -1 where none: not an item
        start, or no item before it in the row; teacher distributions over the items [K, N])."""
        self.to(input_ids.device)
        B, T = input_ids.shape
        L = self.paths.shape[1]
        level = level_of[input_ids]  # [B, T]
        first = level == 0
        ordinal = first.long().cumsum(1) - 1  # [B, T] the item count before each position
        b, p = (first & (torch.arange(T, device=input_ids.device) <= T - L)).nonzero(as_tuple=True)
        teacher_of = torch.full((B, T), -1, dtype=torch.long, device=input_ids.device)
        if len(b) == 0:
            return teacher_of, self.follow.new_zeros((0, self.follow.shape[1]))
        spelled = input_ids[b[:, None], p[:, None] + torch.arange(L, device=input_ids.device)]  # [n, L]
        item = self.leaf_item[self.trie.states(spelled)]  # [n], -1: not a whole item
        m = ordinal[b, p]  # [n]
        item_at = torch.full((B, int(m.max()) + 1), -1, dtype=torch.long, device=input_ids.device)
        item_at[b, m] = item
        width = item_at.shape[1]

        def at(rows, ords):  # items at ordinals [k, j] of rows [k] (-1 outside the row)
            inside = (ords >= 0) & (ords < width)
            return torch.where(inside, item_at[rows[:, None], ords.clamp(0, width - 1)], -1)

        back = torch.arange(1, self.context + 1, device=input_ids.device)  # [R]
        ctx = at(b, m[:, None] - back)  # [n, R] the last items before each target
        keep = (item >= 0) & (ctx >= 0).any(1)
        b, p, m, ctx, item = b[keep], p[keep], m[keep], ctx[keep], item[keep]
        teacher_of[b, p] = torch.arange(len(b), device=input_ids.device)
        weight = (ctx >= 0) * self.recency  # [K, R]
        scores = (self.follow[ctx.clamp(min=0)] * weight[..., None]).sum(1)  # [K, N]
        for r in range(1, self.context + 1):  # the row's own pairs, counted in ``follow``, taken out
            earlier = at(b, m[:, None] - r)[:, 0]  # [K]
            later = at(b, m[:, None] - r + torch.arange(1, self.window + 1, device=input_ids.device))  # [K, W]
            both = (earlier[:, None] >= 0) & (later >= 0)
            drop = torch.where(both, -self.recency[r - 1] * self.increment[earlier.clamp(min=0)][:, None],
                               0.0).to(scores.dtype)
            scores.scatter_add_(1, later.clamp(min=0), drop)
        q = self.smoothed(scores.clamp(min=0))
        history = at(b, torch.arange(width, device=input_ids.device).expand(len(b), -1))  # [K, width]
        history = history.masked_fill(torch.arange(width, device=input_ids.device) >= m[:, None], -1)
        shown = torch.zeros_like(q, dtype=torch.long).scatter_add_(1, history.clamp(min=0), (history >= 0).long())
        q = q.masked_fill(shown > 0, 0.0)
        return teacher_of, q / q.sum(1, keepdim=True).clamp(min=1e-12)

    def state_log_mass(self, q: torch.Tensor) -> torch.Tensor:
        """Distributions over the items [B, N] -> the log of each trie state's mass (its items') [B, S];
        a floor of 1e-30 keeps dead ends and unreachable states finite."""
        mass = q.new_zeros((q.shape[0], len(self.leaf_item)))  # [B, S]
        for level in range(self.paths.shape[1]):
            mass.index_add_(1, self.paths[:, level], q)
        mass[:, self.trie.ROOT] = q.sum(1)
        return mass.clamp(min=1e-30).log()

    def children(self, q: torch.Tensor, state: torch.LongTensor, level: int) -> torch.Tensor:
        """Teacher distributions over items [n, N], the prefix states [n] of level-``level`` tokens ->
        the teacher's probability of each allowed child of the prefix [n, max_children] (trie order)."""
        mass = q.new_zeros((q.shape[0], len(self.leaf_item))).index_add_(1, self.paths[:, level], q)  # [n, S]
        kids = mass.gather(1, self.trie.child_state[state])  # [n, C]; padding slots lead to DEAD (mass 0)
        real = torch.arange(kids.shape[1], device=kids.device) < self.trie.num_children[state][:, None]
        kids = kids * real
        return kids / kids.sum(1, keepdim=True).clamp(min=1e-12)
