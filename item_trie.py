"""The prefix trie of the items' index token sequences, compiled into tensors.

One structure answers "which tokens may follow this prefix so that it still spells a real item":
constrained decoding walks every beam of every prompt through it with a few gathers
(generation.py), the level and trie softmaxes of the training loss read their code subsets from
it (index_loss.py, finetune.py ``--index_softmax``), and it carries the popularity prior as
log p(child | state) (``--index_prior``). TIGER's decoding uses it too (baselines/tiger.py).
"""
from __future__ import annotations

from typing import Sequence

import torch

from utils import DataError


class IndexTrie:
    """Prefix trie of item token sequences, compiled into dense tensors.

    States: 0 = dead (an invalid path; only EOS allowed so the beam ends), 1 = done (after EOS;
    EOS/pad allowed), 2 = root, then one state per trie node. A leaf (a full index) allows EOS.

    ``symbols``    [S] sorted token ids that appear in some transition (index tokens, eos, pad)
    ``next_state`` [num_states, S] state reached by each symbol (0 = dead)
    ``allowed``    [num_states, max_children] token ids allowed in each state, padded by
                   repeating the first one (so a scatter writes the same value twice)
    ``log_prior``  [num_states, max_children] log p(child | state) from item ``weights`` (the
                   children's summed weights over their parent's), or None: the popularity prior
                   of ``--index_prior`` (see ``prior_table``)
    ``items_below`` [num_states] how many items each state leads to (1 at a leaf, 0 when dead or
                   done): what ``excluded_states`` compares against
    """

    DEAD, DONE, ROOT = 0, 1, 2

    def __init__(self, sequences: Sequence[Sequence[int]], eos_token_id: int, pad_token_id: int | None = None,
                 weights: Sequence[float] | None = None):
        if not sequences:
            raise DataError("the index is empty: no item to decode")
        lengths = {len(s) for s in sequences}
        if len(lengths) != 1:
            raise DataError(f"item token sequences have different lengths {sorted(lengths)}")
        self.index_len = lengths.pop()
        end_tokens = [eos_token_id] + ([pad_token_id] if pad_token_id not in (None, eos_token_id) else [])

        children: list[dict[int, int]] = [{}, {}, {}]  # per state: token id -> next state
        items_below = [0, 0, len(sequences)]
        for seq in sequences:
            state = self.ROOT
            for tok in seq:
                if tok in end_tokens:
                    raise DataError(f"index token id {tok} is the EOS/pad token")
                nxt = children[state].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[state][tok] = nxt
                    children.append({})
                    items_below.append(0)
                state = nxt
                items_below[state] += 1
            if children[state]:
                raise DataError(f"two items share the index token ids {list(seq)}; indices must be distinct")
            children[state][eos_token_id] = self.DONE  # a full index: only EOS follows
        children[self.DEAD] = {eos_token_id: self.DEAD}
        children[self.DONE] = {t: self.DONE for t in end_tokens}

        symbols = sorted({t for ch in children for t in ch})
        sym_of = {t: i for i, t in enumerate(symbols)}
        num_states, max_children = len(children), max(len(ch) for ch in children)
        next_state = torch.zeros(num_states, len(symbols), dtype=torch.long)
        allowed = torch.zeros(num_states, max_children, dtype=torch.long)
        for s, ch in enumerate(children):
            toks = list(ch)
            allowed[s] = torch.tensor(toks + [toks[0]] * (max_children - len(toks)))
            for t, nxt in ch.items():
                next_state[s, sym_of[t]] = nxt
        self.symbols, self.next_state, self.allowed = torch.tensor(symbols), next_state, allowed
        # for the trie-native beam search: how many slots of ``allowed`` are real, and the state each one leads to
        self.num_children = torch.tensor([len(ch) for ch in children])  # [num_states]
        self.child_state = torch.tensor([list(ch.values()) + [0] * (max_children - len(ch)) for ch in children])
        self.num_items = len(sequences)
        self.items_below = torch.tensor(items_below)
        # the token ids each level uses, for scoring with the level softmax (see --index_softmax)
        self.level_tokens = [torch.tensor(sorted({seq[t] for seq in sequences})) for t in range(self.index_len)]
        self.log_prior = None if weights is None else self.prior_table(sequences, weights)

    def prior_table(self, sequences: Sequence[Sequence[int]], weights: Sequence[float]) -> torch.Tensor:
        """Item weights (one per sequence, > 0) -> [num_states, max_children] log p(child | state).

        A node's weight is the sum of its items' weights; a child's log-prior is its weight over its
        parent's, so the L + 1 log-priors along an item's path (EOS: 0) add up to log(w_item / w_all):
        the prior alone ranks items exactly as their weights do. Padding slots and the dead/done
        states hold 0 (their scores are masked or fixed anyway)."""
        if len(weights) != len(sequences):
            raise DataError(f"{len(weights)} prior weights for {len(sequences)} items")
        weight = torch.as_tensor(weights, dtype=torch.float64)
        if not bool((weight > 0).all()) or not bool(torch.isfinite(weight).all()):
            raise DataError("prior weights must be positive and finite (smooth zero counts)")
        child_of = [dict(zip(toks[:n], nxt[:n])) for toks, nxt, n in  # per state: token id -> next state
                    zip(self.allowed.tolist(), self.child_state.tolist(), self.num_children.tolist())]
        node = [0.0] * len(child_of)  # summed weight below each state
        node[self.ROOT] = float(weight.sum())
        for seq, w in zip(sequences, weight.tolist()):
            state = self.ROOT
            for tok in seq:
                state = child_of[state][tok]
                node[state] += w
        node = torch.tensor(node, dtype=torch.float64)  # [num_states]
        real = torch.arange(self.allowed.shape[1]) < self.num_children[:, None]
        child = node[self.child_state]  # [num_states, max_children]
        prior = (child.log() - node[:, None].log()).where(real & (child > 0), torch.zeros((), dtype=torch.float64))
        prior[: self.ROOT] = 0.0  # dead and done: no choice to weigh
        return prior.float()

    def to(self, device: torch.device) -> "IndexTrie":
        self.symbols, self.next_state, self.allowed, self.num_children, self.child_state, self.items_below = (
            t.to(device) for t in (self.symbols, self.next_state, self.allowed, self.num_children, self.child_state,
                                   self.items_below))
        self.level_tokens = [t.to(device) for t in self.level_tokens]  # once here, not at every decoding step
        if self.log_prior is not None:
            self.log_prior = self.log_prior.to(device)
        return self

    def step(self, state: torch.LongTensor, tok: torch.LongTensor) -> torch.LongTensor:
        """The state [rows] reached from ``state`` [rows] by token ids ``tok`` [rows] (DEAD if not allowed)."""
        tok = tok.contiguous()
        sym = torch.searchsorted(self.symbols, tok).clamp_(max=len(self.symbols) - 1)
        known = self.symbols[sym] == tok
        return torch.where(known, self.next_state[state, sym], self.DEAD)

    def states(self, generated: torch.LongTensor) -> torch.LongTensor:
        """generated [rows, t] token ids after the prompt -> trie state [rows]."""
        state = torch.full((generated.shape[0],), self.ROOT, dtype=torch.long, device=generated.device)
        for j in range(generated.shape[1]):  # t <= index length + 1 steps, each over all rows at once
            state = self.step(state, generated[:, j])
        return state

    def paths(self, tokens: torch.LongTensor) -> torch.LongTensor:
        """Token ids [rows, t] -> the state after each of them [rows, t] (DEAD from a token on that no
        item allows)."""
        path = [torch.full((tokens.shape[0],), self.ROOT, dtype=torch.long, device=tokens.device)]
        for j in range(tokens.shape[1]):
            path.append(self.step(path[-1], tokens[:, j]))
        return torch.stack(path[1:], 1)

    def excluded_states(self, excluded: Sequence[Sequence[Sequence[int]]]) -> torch.BoolTensor:
        """Per row, the token sequences of items to leave out -> [rows, num_states], True at the
        states all of whose items are left out: a beam entering one could reach no other item, so
        the searches never enter them. Sequences that are not items are ignored (nothing to leave out)."""
        device = self.items_below.device
        out = torch.zeros(len(excluded), len(self.items_below), dtype=torch.bool, device=device)
        for row, seqs in enumerate(excluded):
            seqs = sorted({tuple(s) for s in seqs if len(s) == self.index_len})
            if not seqs:
                continue
            path = self.paths(torch.tensor(seqs, dtype=torch.long, device=device))  # [n, L] the states along each path
            path = path[path[:, -1] != self.DEAD]  # real items only: a dead end counts nowhere
            left_out = torch.zeros(len(self.items_below), dtype=torch.long, device=device)
            left_out.index_add_(0, path.flatten(), torch.ones(path.numel(), dtype=torch.long, device=device))
            out[row] = (left_out == self.items_below) & (self.items_below > 0)
        return out

    def allowed_tokens(self, generated: torch.LongTensor) -> torch.LongTensor:
        """[rows, max_children] allowed next token ids (with repeats) for each row."""
        return self.allowed[self.states(generated)]
