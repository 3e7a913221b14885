"""The popularity prior over items: how often each item occurs in the training parts of the users'
sequences (all but the last two items, so neither validation nor test items are counted).

It weighs the trie softmax of ``--index_prior popularity`` in training (finetune.py, index_loss.py),
the beam scores of a model trained with it (``--score_prior``: evaluation, the learning curve, the
recommender), and ranks items for the popularity baseline (baseline.py).
"""
from __future__ import annotations

import argparse
from collections import Counter

import data
from dataset_files import train_part
from utils import DataError


def training_item_counts(inters: dict[str, list[int]]) -> Counter:
    """How often each item (an item-id string) occurs in the training parts."""
    return Counter(str(item) for seq in inters.values() for item in train_part(seq))


def popularity_ranking(inters: dict[str, list[int]]) -> list[str]:
    """Every item that occurs in a training part, most frequent first, as item-id strings."""
    counts = training_item_counts(inters)
    return [item for item, _ in sorted(counts.items(), key=lambda kv: (-kv[1], int(kv[0])))]  # ties: by id


def popularity_prior(inters: dict[str, list[int]], items, smoothing: float = 1.0) -> dict[str, float]:
    """item -> training count + ``smoothing``, for every item of ``items``: the weights of
    ``--index_prior popularity`` (smoothed so that an item never seen in training keeps a chance)."""
    if smoothing <= 0:
        raise DataError(f"the prior's smoothing must be positive, got {smoothing}")
    counts = training_item_counts(inters)
    return {str(item): counts.get(str(item), 0) + smoothing for item in items}


def item_prior(name: str, args: argparse.Namespace, items, inters: dict[str, list[int]] | None = None
               ) -> dict[str, float] | None:
    """The weights of a prior by name (``--index_prior``, ``--score_prior`` or a checkpoint's
    ``index_prior``): None for "none", ``popularity_prior`` for "popularity". ``inters`` are the
    interactions of ``args``' dataset when the caller has them already; else they are read."""
    if name == "none":
        return None
    if name != "popularity":
        raise DataError(f"unknown prior {name!r} (--index_prior, --score_prior or index_prior in a checkpoint's "
                        "config.json); expected none or popularity")
    return popularity_prior(data.load_files(args).inters if inters is None else inters, items)
