"""Steps shared by the dataset builders (movielens.py, amazon18.py): text cleaning, time
ordering, id remapping, k-core filtering, statistics and the atomic writing of the files in
SPEC section 4."""
from __future__ import annotations

import html
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

from dataset_files import MIN_INTERACTIONS, dataset_file
from utils import DataError, write_json_atomic

# One interaction before remapping: (raw user id, raw item id, timestamp, ...); builders may
# append fields (amazon18.py appends the line number) that these steps carry along.
Record = tuple

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def clean_text(value: Any) -> str:
    """HTML-unescaped, tag-free, whitespace-collapsed text. Lists are joined with spaces
    (the 2018 meta files store descriptions as lists of paragraphs); None gives ""."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v) for v in value)
    text = str(value)
    # Some dumps escape twice ("&amp;quot;"); unescape until nothing changes.
    for _ in range(3):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def id_order_key(raw_id: Hashable) -> tuple:
    """Sort key for raw ids: integers numerically ("2" before "10"), then everything else as text."""
    s = str(raw_id)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def dedup_first(records: Sequence[Record]) -> list[Record]:
    """Keep the earliest (user, item) interaction; on equal times the one first in the file."""
    first: dict[tuple[Hashable, Hashable], int] = {}
    for pos, (user, item, ts, *_) in enumerate(records):
        key = (user, item)
        if key not in first or ts < records[first[key]][2]:
            first[key] = pos
    keep = set(first.values())
    return [r for pos, r in enumerate(records) if pos in keep]


def k_core(records: list[Record], user_k: int, item_k: int) -> list[Record]:
    """Drop users with < user_k and items with < item_k interactions, repeatedly, until stable."""
    while True:
        users = Counter(r[0] for r in records)
        items = Counter(r[1] for r in records)
        kept = [r for r in records if users[r[0]] >= user_k and items[r[1]] >= item_k]
        if len(kept) == len(records):
            return kept
        records = kept


def build_sequences(records: Iterable[Record]) -> tuple[dict[str, list[int]], dict[Hashable, str], dict[Hashable, int]]:
    """Remap ids and order each history by time.

    Users become "0".."U-1" and items 0..I-1, both in the order of their raw ids
    (``id_order_key``), so the result does not depend on the file's row order. Each history
    is sorted by timestamp with a stable sort: ties keep the order of the source file.
    Returns (inters, user_map raw->new, item_map raw->new).
    """
    by_user: dict[Hashable, list[tuple[float, Hashable]]] = defaultdict(list)
    for user, item, ts, *_ in records:  # source order is kept within each user's list
        by_user[user].append((ts, item))
    user_map = {u: str(n) for n, u in enumerate(sorted(by_user, key=id_order_key))}
    raw_items = {item for events in by_user.values() for _, item in events}
    item_map = {i: n for n, i in enumerate(sorted(raw_items, key=id_order_key))}
    inters: dict[str, list[int]] = {}
    for user, new_user in user_map.items():
        events = sorted(by_user[user], key=lambda e: e[0])  # Python's sort is stable
        inters[new_user] = [item_map[item] for _, item in events]
    return inters, user_map, item_map


def check_not_empty(records: Sequence[Record], what: str) -> None:
    if not records:
        raise DataError(f"{what}: no interactions are left after filtering; nothing to write "
                        "(check the input files and the filtering thresholds)")


def dataset_stats(inters: dict[str, list[int]], n_items: int) -> dict[str, float]:
    n_users = len(inters)
    n_inters = sum(len(v) for v in inters.values())
    density = n_inters / (n_users * n_items) if n_users and n_items else 0.0
    return {
        "users": n_users,
        "items": n_items,
        "interactions": n_inters,
        "avg_len": n_inters / n_users if n_users else 0.0,
        "sparsity": 1.0 - density,
    }


def print_stats(name: str, stats: dict[str, float]) -> None:
    print(f"[{name}] users: {stats['users']}  items: {stats['items']}  interactions: {stats['interactions']}  "
          f"avg. length: {stats['avg_len']:.2f}  sparsity: {100 * stats['sparsity']:.4f}%", flush=True)


def write_dataset(data_path: str | Path, dataset: str, inters: dict[str, list[int]],
                  items: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> list[Path]:
    """Validate, then write ``<D>.inter.json``, ``<D>.item.json`` and any ``extra`` files
    ({suffix: object}), each atomically. Returns the written paths."""
    n_items = len(items)
    if set(items) != {str(i) for i in range(n_items)}:
        raise DataError(f"{dataset}: item ids must be 0..{n_items - 1}")
    for user, seq in inters.items():
        if len(seq) < MIN_INTERACTIONS:
            raise DataError(f"{dataset}: user {user} has {len(seq)} interactions; at least {MIN_INTERACTIONS} are needed")
        if any(not 0 <= i < n_items for i in seq):
            raise DataError(f"{dataset}: user {user} has an item outside 0..{n_items - 1}")
    outputs = {".inter.json": inters, ".item.json": items, **(extra or {})}
    paths = []
    for suffix, obj in outputs.items():
        path = dataset_file(data_path, dataset, suffix)
        write_json_atomic(obj, path, what="the dataset file")
        paths.append(path)
    return paths


def write_and_report(data_path: str | Path, dataset: str, inters: dict[str, list[int]],
                     items: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, float]:
    """``write_dataset``, then print the statistics and the written files; returns the statistics."""
    paths = write_dataset(data_path, dataset, inters, items, extra)
    stats = dataset_stats(inters, len(items))
    print_stats(dataset, stats)
    for path in paths:
        print(f"Wrote {path}")
    return stats
