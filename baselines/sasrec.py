"""SASRec: a causal self-attention encoder over the history; the last position scores every item.

    python -m baselines.sasrec --dataset ml-100k --data_path data --results_file results/sasrec.json

Standard small sizes: width 64, 2 blocks, 1 head, dropout 0.2, Adam lr 1e-3, batch 256. Item
embeddings are shared with the output layer; the loss is a full softmax over all items.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from baselines.runner import ScoreAllItems, main
from baselines.split import Split

NAME = "sasrec"
DEFAULTS = {"epochs": 200, "patience": 10, "hidden_size": 64, "inner_size": 256, "num_layers": 2, "num_heads": 1,
            "dropout": 0.2, "lr": 1e-3, "eval_batch_size": 1024, "train_stride": 0,
            "cpu_bf16": "off"}


class SASRec(ScoreAllItems):
    def __init__(self, n_items: int, max_len: int, hidden: int, inner: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)  # row 0 = padding
        self.pos = nn.Embedding(max_len, hidden)
        self.drop, self.norm = nn.Dropout(dropout), nn.LayerNorm(hidden)
        block = nn.TransformerEncoderLayer(hidden, heads, inner, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(hidden)
        # causal mask: position t sees 0..t only; with right padding no real item ever sees a pad
        self.register_buffer("causal", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1))
        nn.init.normal_(self.item.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def encode(self, his: torch.Tensor) -> torch.Tensor:
        L = his.shape[1]
        x = self.item(his) + self.pos.weight[:L]                       # [B, L, H]; position = offset in the window
        x = self.blocks(self.drop(self.norm(x)), mask=self.causal[:L, :L])
        return self.out_norm(x)                                         # [B, L, H]

    def item_weights(self) -> torch.Tensor:
        return self.item.weight[1:]                                     # [I, H], shared with the input


def build(args: argparse.Namespace, split: Split) -> SASRec:
    return SASRec(split.n_items, args.max_his_len, args.hidden_size, args.inner_size, args.num_layers,
                  args.num_heads, args.dropout)


if __name__ == "__main__":
    import sys

    main(sys.modules[__name__])
