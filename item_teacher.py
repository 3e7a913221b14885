"""--teacher_weight: soft next-item targets from the item co-occurrence of the training parts.

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
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dataset_files import train_part
from item_prior import popularity_prior
from item_trie import IndexTrie
from item_vectors import follow_counts


class CooccurrenceTeacher:
    """Teacher distributions over items for the item targets of a batch, and over the trie's children
    for each index token of those targets (``children``)."""

    def __init__(self, counts: torch.Tensor, popularity: torch.Tensor, trie: IndexTrie,
                 item_tokens: Sequence[Sequence[int]], context: int = 5, window: int = 5, smoothing: float = 0.1):
        """``counts`` [N, N]: how often item j came within ``window`` steps after item i in the training
        parts; ``popularity`` [N] training counts (any positive scale); ``item_tokens``: the token ids
        of item n, in the order ``trie`` was built in; ``smoothing``: the popularity share of a teacher."""
        if not 0 <= smoothing <= 1:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
        n = counts.shape[0]
        row = counts.sum(1)  # [N]
        self.follow = counts / (row[:, None] + 1)  # [N, N] P(j follows | i), with one pseudo-count of "nothing"
        self.increment = 1 / (row + 1)  # [N] what one pair adds to its row of ``follow``
        self.popularity = popularity / popularity.sum()  # [N]
        self.trie, self.context, self.window, self.smoothing = trie, int(context), int(window), float(smoothing)
        tokens = torch.as_tensor([list(t) for t in item_tokens], dtype=torch.long)  # [N, L]
        self.paths = trie.paths(tokens)  # [N, L] the state after each token of each item
        self.leaf_item = torch.full((len(trie.items_below),), -1, dtype=torch.long)  # [S] item at a leaf
        self.leaf_item[self.paths[:, -1]] = torch.arange(n)

    @classmethod
    def build(cls, inters: dict[str, list], items: Sequence[str], trie: IndexTrie,
              item_tokens: Sequence[Sequence[int]], context: int = 5, window: int = 5,
              smoothing: float = 0.1) -> "CooccurrenceTeacher":
        """From the interactions (user -> item ids, oldest first) and the items in the trie's order."""
        pos = {str(item): k for k, item in enumerate(items)}
        seqs = [[pos[str(i)] for i in train_part(seq) if str(i) in pos] for seq in inters.values()]
        n = len(items)
        counts = torch.from_numpy(follow_counts(seqs, np.arange(n), n, window).toarray())
        prior = popularity_prior(inters, items)  # training counts + 1, as --index_prior popularity
        popularity = torch.tensor([prior[str(item)] for item in items], dtype=torch.float32)
        return cls(counts.float(), popularity, trie, item_tokens, context, window, smoothing)

    def to(self, device: torch.device) -> "CooccurrenceTeacher":
        for name in ("follow", "increment", "popularity", "paths", "leaf_item"):
            setattr(self, name, getattr(self, name).to(device))
        return self

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
        seen = ctx >= 0
        scores = (self.follow[ctx.clamp(min=0)] * seen[..., None]).sum(1)  # [K, N]
        for r in range(1, self.context + 1):  # the row's own pairs, counted in ``follow``, taken out
            earlier = at(b, m[:, None] - r)[:, 0]  # [K]
            later = at(b, m[:, None] - r + torch.arange(1, self.window + 1, device=input_ids.device))  # [K, W]
            both = (earlier[:, None] >= 0) & (later >= 0)
            drop = torch.where(both, -self.increment[earlier.clamp(min=0)][:, None], 0.0).to(scores.dtype)
            scores.scatter_add_(1, later.clamp(min=0), drop)
        scores = scores.clamp(min=0)
        total = scores.sum(1, keepdim=True)
        q = torch.where(total > 0, (1 - self.smoothing) * scores / total.clamp(min=1e-12)
                        + self.smoothing * self.popularity, self.popularity.expand_as(scores))
        history = at(b, torch.arange(width, device=input_ids.device).expand(len(b), -1))  # [K, width]
        history = history.masked_fill(torch.arange(width, device=input_ids.device) >= m[:, None], -1)
        shown = torch.zeros_like(q, dtype=torch.long).scatter_add_(1, history.clamp(min=0), (history >= 0).long())
        q = q.masked_fill(shown > 0, 0.0)
        return teacher_of, q / q.sum(1, keepdim=True).clamp(min=1e-12)

    def children(self, q: torch.Tensor, state: torch.LongTensor, level: int) -> torch.Tensor:
        """Teacher distributions over items [n, N], the prefix states [n] of level-``level`` tokens ->
        the teacher's probability of each allowed child of the prefix [n, max_children] (trie order)."""
        mass = q.new_zeros((q.shape[0], len(self.leaf_item))).index_add_(1, self.paths[:, level], q)  # [n, S]
        kids = mass.gather(1, self.trie.child_state[state])  # [n, C]; padding slots lead to DEAD (mass 0)
        real = torch.arange(kids.shape[1], device=kids.device) < self.trie.num_children[state][:, None]
        kids = kids * real
        return kids / kids.sum(1, keepdim=True).clamp(min=1e-12)
