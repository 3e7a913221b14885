"""TIGER: an encoder-decoder reads the history's index tokens and generates the next item's index.

    python -m baselines.tiger --dataset ml-100k --data_path data --results_file results/tiger.json

It uses the project's own item index (<D>.index.json, the one LC-Rec is trained with). The model
is a T5ForConditionalGeneration built from a small config and trained from scratch; its
vocabulary is pad, eos and the index tokens. Decoding is a beam search (--num_beams 20) over the
prefix trie of the real indices (item_trie.IndexTrie), so every returned item exists; items are
ranked by the summed log-probability of their tokens and the final EOS. Default sizes follow the
TIGER paper (4 + 4 layers, width 128, 6 heads of 64, feed-forward 1024, dropout 0.1). On a CPU
with native bf16 it trains and decodes under bf16 autocast (--cpu_bf16 auto), about 1.5 times the
examples a second of fp32.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from baselines.runner import main
from baselines.split import Split
from dataset_files import dataset_file, index_tokens, load_indices
from item_trie import IndexTrie
from metrics import max_k
from utils import DataError

NAME = "tiger"
DEFAULTS = {"epochs": 200, "patience": 10, "hidden_size": 128, "inner_size": 1024, "num_layers": 4, "num_heads": 6,
            "dropout": 0.1, "lr": 1e-3, "eval_batch_size": 64, "train_stride": 1,
            "cpu_bf16": "auto"}
PAD, EOS = 0, 1


def item_token_table(indices: dict[str, list[str]], n_items: int) -> tuple[torch.Tensor, int]:
    """[n + 1, index length] token ids of item + 1 (row 0 = padding), and the vocabulary size."""
    vocab = {tok: i + 2 for i, tok in enumerate(index_tokens(indices))}  # 0 = pad, 1 = eos
    length = len(next(iter(indices.values())))
    table = torch.zeros(n_items + 1, length, dtype=torch.long)
    for item, toks in indices.items():
        table[int(item) + 1] = torch.tensor([vocab[t] for t in toks])
    return table, len(vocab) + 2


class TIGER(nn.Module):
    def __init__(self, table: torch.Tensor, vocab_size: int, indexed: list[int], max_len: int, hidden: int,
                 inner: int, layers: int, heads: int, dropout: float, num_beams: int):
        super().__init__()
        config = T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=64, d_ff=inner, num_layers=layers,
                          num_decoder_layers=layers, num_heads=heads, dropout_rate=dropout, feed_forward_proj="relu",
                          pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, tie_word_embeddings=True)
        self.t5 = T5ForConditionalGeneration(config)
        self.recency = nn.Embedding(max_len, hidden)                # item distance from the end of the history
        nn.init.normal_(self.recency.weight, std=0.02)
        self.register_buffer("table", table)                    # [items + 1, Lc]
        self.num_beams = num_beams
        self.trie = IndexTrie([table[i + 1].tolist() for i in indexed], EOS, PAD)
        leaf = self.trie.states(torch.stack([table[i + 1] for i in indexed]))  # [n_indexed] leaf state of each item
        state_item = torch.full((self.trie.next_state.shape[0],), -1, dtype=torch.long)
        state_item[leaf] = torch.tensor(indexed)
        self.register_buffer("state_item", state_item)           # trie state -> item (-1 = not a leaf)

    def encode_inputs(self, his: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> encoder input embeddings [B, L * Lc, D] and attention mask [B, L * Lc].

        T5 has only relative position biases, and its cross-attention none, so nothing would tell
        the decoder which item is the most recent; each token also gets a learned embedding of its
        item's distance from the end of the history (0 = the last item)."""
        ids = self.table[his].flatten(1)                           # [B, L * Lc], right-padded with 0
        lc = self.table.shape[1]
        n = (his > 0).sum(1, keepdim=True)                          # [B, 1] history lengths
        back = (n - 1 - torch.arange(his.shape[1], device=his.device)).clamp(min=0)  # [B, L]
        emb = self.t5.shared(ids) + self.recency(back.repeat_interleave(lc, 1))
        return emb, (ids != PAD).long()

    def loss(self, his: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """his [B, L]; tgt [B, L] with one labelled position per row (--train_stride 1), or [B]."""
        tgt = tgt.max(1).values if tgt.dim() == 2 else tgt             # the row's one target (others are -100)
        ids, mask = self.encode_inputs(his)
        labels = torch.cat([self.table[tgt + 1], torch.full_like(tgt[:, None], EOS)], 1)  # [B, Lc + 1]
        return self.t5(inputs_embeds=ids, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def beam_search(self, his: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> items [B, K] best first (-1 where fewer than K items are reachable), scores [B, K]."""
        trie, K = self.trie.to(his.device), self.num_beams
        ids, mask = self.encode_inputs(his)
        B = ids.shape[0]  # ids: input embeddings [B, S, D]
        enc = self.t5.encoder(inputs_embeds=ids, attention_mask=mask).last_hidden_state.repeat_interleave(K, 0)
        mask = mask.repeat_interleave(K, 0)                              # [B * K, S]
        dec = torch.full((B * K, 1), PAD, dtype=torch.long, device=his.device)
        state = torch.full((B, K), IndexTrie.ROOT, dtype=torch.long, device=his.device)
        score = torch.full((B, K), -torch.inf, device=his.device)
        score[:, 0] = 0.0                                                # one live beam at the root
        for _ in range(self.table.shape[1] + 1):                         # Lc index tokens, then EOS (leaf -> done)
            logits = self.t5(encoder_outputs=(enc,), attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            logp = torch.log_softmax(logits.float(), -1).view(B, K, -1)  # normalised over the full vocabulary
            allowed = trie.allowed[state]                                # [B, K, C]
            real = torch.arange(allowed.shape[-1], device=his.device) < trie.num_children[state][..., None]
            cand = (score[..., None] + logp.gather(2, allowed)).masked_fill(~real, -torch.inf).flatten(1)
            score, flat = cand.topk(K, dim=1)                            # [B, K] over K * C candidates
            beam = flat // allowed.shape[-1]
            prev_state = state.gather(1, beam)
            state = trie.child_state[state].flatten(1).gather(1, flat)   # [B, K] state after each kept candidate
            tok = allowed.flatten(1).gather(1, flat)
            dec = torch.cat([dec.view(B, K, -1).gather(1, beam[..., None].expand(-1, -1, dec.shape[-1])),
                             tok[..., None]], 2).view(B * K, -1)
        # prev_state is now the state before the EOS: a leaf (a full index) for every finite beam
        items = self.state_item[prev_state].masked_fill(~torch.isfinite(score), -1)
        return items, score

    def rank(self, his: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items, _ = self.beam_search(his)                                 # [B, K]
        hit = items == tgt[:, None]
        return torch.where(hit.any(1), hit.float().argmax(1) + 1, 0), items[:, :10]


def build(args: argparse.Namespace, split: Split) -> TIGER:
    if args.train_stride != 1:
        raise DataError(f"--train_stride {args.train_stride}: TIGER generates one target per example; use 1")
    path = dataset_file(args.data_path, args.dataset, args.index_file)
    indices = load_indices(path, required_items=split.seen_items)  # every item of the sequences needs an index
    bad = [k for k in indices if not k.isdigit()]
    if bad:
        raise DataError(f"{path}: item keys must be item ids 0, 1, ...; found {bad[:3]}")
    n = max(split.n_items, 1 + max(int(k) for k in indices))
    table, vocab_size = item_token_table(indices, n)
    if args.num_beams < max_k(args.metric_list):
        raise DataError(f"--num_beams {args.num_beams}: the metrics rank to {max_k(args.metric_list)}, "
                        "which needs at least that many beams")
    return TIGER(table, vocab_size, sorted(int(k) for k in indices), args.max_his_len, args.hidden_size, args.inner_size,
                 args.num_layers, args.num_heads, args.dropout, args.num_beams)


if __name__ == "__main__":
    import sys

    main(sys.modules[__name__])
