"""GRU4Rec: a GRU over the history; its last hidden state scores every item.

    python -m baselines.gru4rec --dataset ml-100k --data_path data --results_file results/gru4rec.json

Sizes: embedding 64, one GRU layer of width 128 projected back to 64, dropout 0.3 on the
embeddings, Adam lr 1e-3, batch 256. Item embeddings are shared with the output layer; the loss
is a full softmax over all items. Training windows end every 5 targets (--train_stride 5), so
each target is predicted from at least 16 history items where it has them: with non-overlapping
windows the GRU restarts every max_his_len items and about half of the targets were predicted
from fewer than 10 (docs/baselines.md has the comparison).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from baselines.runner import ScoreAllItems, main
from baselines.split import Split

NAME = "gru4rec"
DEFAULTS = {"epochs": 200, "patience": 10, "hidden_size": 64, "inner_size": 128, "num_layers": 1, "num_heads": 1,
            "dropout": 0.3, "lr": 1e-3, "eval_batch_size": 1024, "train_stride": 5,
            "cpu_bf16": "off"}


class GRU4Rec(ScoreAllItems):
    def __init__(self, n_items: int, hidden: int, gru_size: int, layers: int, dropout: float):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)  # row 0 = padding
        self.drop = nn.Dropout(dropout)
        # RecBole's GRU has no biases and Xavier initialisation: measured no better here (docs/baselines.md)
        self.gru = nn.GRU(hidden, gru_size, layers, batch_first=True)
        self.proj = nn.Linear(gru_size, hidden)
        nn.init.normal_(self.item.weight, std=0.02)

    def encode(self, his: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.drop(self.item(his)))                   # [B, L, G]; right pads come after
        return self.proj(out)                                           # [B, L, H]

    def item_weights(self) -> torch.Tensor:
        return self.item.weight[1:]                                     # [I, H], shared with the input


def build(args: argparse.Namespace, split: Split) -> GRU4Rec:
    # --inner_size is the GRU width here
    return GRU4Rec(split.n_items, args.hidden_size, args.inner_size, args.num_layers, args.dropout)


if __name__ == "__main__":
    import sys

    main(sys.modules[__name__])
