"""The project's leave-one-out split as tensors for the learned baselines.

For a user with items ``s`` (SPEC section 4, as in data.py):
    training examples: every prefix of ``s[:-2]`` with at least one history item -> the next item
    validation:        history ``s[:-2]`` -> ``s[-2]``
    test:              history ``s[:-1]`` -> ``s[-1]``
Histories keep their last ``max_his_len`` items. Test users are those LC-Rec is scored on:
with ``--sample_num N`` the subset data.py draws (``data.seeded_subset`` with ``data.test_subset_key``).

Histories are stored right-padded as item id + 1 (0 = padding) in ``[n, max_his_len]`` tensors,
so a model can embed them with ``padding_idx=0``; evaluation targets are plain item ids ``[n]``.

Training rows are windows of a user's training part with a target at every position (``-100`` =
no loss there). With ``stride`` S, windows end every S targets and only their last S positions
carry a loss, so every training example is used exactly once per epoch: S = 1 gives one row per
example with exactly its history (last position only), S = max_his_len gives non-overlapping
windows where a target's history can be shorter than max_his_len (SASRec's usual training, about
max_his_len times fewer rows). Histories never reach past ``s[:-2]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from data import seeded_subset, test_subset_key
from dataset_files import dataset_file, held_out, load_inters, train_part
from utils import DataError


@dataclass
class Split:
    n_items: int               # items are 0 .. n_items - 1
    train_his: torch.Tensor    # [n_rows, max_his_len] item + 1, right-padded with 0
    train_tgt: torch.Tensor    # [n_rows, max_his_len] target after each position, -100 = no loss
    valid_his: torch.Tensor    # [n_users, max_his_len]
    valid_tgt: torch.Tensor    # [n_users]
    test_his: torch.Tensor     # [n_test, max_his_len]
    test_tgt: torch.Tensor     # [n_test]
    test_users: list[str]
    seen_items: frozenset[int]  # items that occur in some sequence
    test_seen: list[list[int]] = field(default_factory=list)  # each test user's whole history s[:-1] (--exclude_history)


def train_examples(inters: dict[str, list[int]], max_his_len: int) -> list[tuple[list[int], int]]:
    """(history, target) pairs from the training part ``s[:-2]`` only: the seqrec training examples."""
    out = []
    for seq in inters.values():
        train = train_part(seq)
        out += [(train[max(0, i - max_his_len):i], train[i]) for i in range(1, len(train))]
    return out


def eval_examples(inters: dict[str, list[int]], max_his_len: int, mode: str) -> list[tuple[list[int], int]]:
    """One (history, target) per user: ``mode`` "valid" (s[:-2] -> s[-2]) or "test" (s[:-1] -> s[-1])."""
    return [(history[-max_his_len:], target) for history, target in (held_out(seq, mode) for seq in inters.values())]


def train_windows(inters: dict[str, list[int]], max_his_len: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows over each training part; targets are -100 where no loss is taken."""
    if not 1 <= stride <= max_his_len:  # a window holds max_his_len targets: a longer stride would skip some
        raise DataError(f"--train_stride: {stride}; expected 1 <= stride <= --max_his_len ({max_his_len})")
    rows = []
    for seq in inters.values():
        train = train_part(seq)
        for end in range(len(train) - 1, 0, -stride):  # end = index of the window's last target
            start = max(0, end - max_his_len)
            inputs = train[start:end]
            targets = [t if start + j + 1 > end - stride else -100 for j, t in enumerate(train[start + 1:end + 1])]
            rows.append((inputs, targets))
    return rows


def held_out_positions(n_users: int, sample_num: int, seed: int) -> list[int]:
    """Positions (in inters order) of the test users: all, or data.py's seeded subset of ``sample_num``."""
    return seeded_subset(n_users, sample_num, test_subset_key(seed))


def to_tensors(examples: list[tuple[list[int], int | list[int]]], max_his_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories [n, max_his_len] (item + 1, right-padded); targets [n], or [n, max_his_len] for windows."""
    his = torch.zeros(len(examples), max_his_len, dtype=torch.long)
    for row, (h, _) in enumerate(examples):
        his[row, :len(h)] = torch.tensor(h, dtype=torch.long) + 1
    if examples and isinstance(examples[0][1], list):
        tgt = torch.full((len(examples), max_his_len), -100, dtype=torch.long)
        for row, (_, t) in enumerate(examples):
            tgt[row, :len(t)] = torch.tensor(t, dtype=torch.long)
        return his, tgt
    return his, torch.tensor([t for _, t in examples], dtype=torch.long)


def load_split(data_path: str | Path, dataset: str, max_his_len: int, sample_num: int = -1, seed: int = 42,
               stride: int = 1) -> Split:
    if max_his_len < 1:
        raise DataError(f"--max_his_len: {max_his_len}; expected a history length >= 1")
    path = dataset_file(data_path, dataset, ".inter.json")
    inters = load_inters(path)
    items = {i for seq in inters.values() for i in seq}
    if min(items) < 0:
        raise DataError(f"{path}: item ids must be >= 0, found {min(items)}")
    n_items = max(items) + 1
    train = train_windows(inters, max_his_len, stride)
    if not train:
        raise DataError(f"{path}: no training example (every user has only 3 interactions)")
    users = list(inters)
    keep = held_out_positions(len(users), sample_num, seed)
    test = eval_examples(inters, max_his_len, "test")
    return Split(n_items, *to_tensors(train, max_his_len), *to_tensors(eval_examples(inters, max_his_len, "valid"),
                                                                        max_his_len),
                 *to_tensors([test[i] for i in keep], max_his_len), [users[i] for i in keep], frozenset(items),
                 [held_out(inters[users[i]], "test")[0] for i in keep])
