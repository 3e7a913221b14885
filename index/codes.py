"""Statistics of item codes and their index tokens (spelled by dataset_files.index_token), shared by
training and index generation."""
from __future__ import annotations

from collections import Counter

import numpy as np

from dataset_files import LEVEL_PREFIXES, index_token


def code_stats(codes: np.ndarray, num_emb_list: list[int]) -> dict:
    """Collision and usage figures of codes (N, L).

    collision_rate: share of items whose full code another item already has, (N - distinct) / N.
    usage: per level, the share of that level's codes used by at least one item.
    max_per_code / max_per_prefix: most items sharing a full code / the first L-1 levels.
    """
    codes = np.asarray(codes)
    n, n_levels = codes.shape
    full = Counter(map(tuple, codes.tolist()))
    prefix = Counter(map(tuple, codes[:, :-1].tolist())) if n_levels > 1 else Counter({(): n})
    return {
        "n_items": n,
        "collision_rate": (n - len(full)) / n if n else 0.0,
        "colliding_items": sum(c for c in full.values() if c > 1),
        "max_per_code": max(full.values(), default=0),
        "max_per_prefix": max(prefix.values(), default=0),
        "usage": [len(np.unique(codes[:, lvl])) / k for lvl, k in enumerate(num_emb_list)],
        "used_codes": [int(len(np.unique(codes[:, lvl]))) for lvl in range(n_levels)],
    }


def format_stats(stats: dict, num_emb_list: list[int]) -> str:
    usage = ", ".join(f"{LEVEL_PREFIXES[i]}: {u}/{k}" for i, (u, k) in enumerate(zip(stats["used_codes"], num_emb_list)))
    return (f"collision rate {stats['collision_rate']:.4f} ({stats['colliding_items']} items in collisions, "
            f"at most {stats['max_per_code']} per code); codes used per level {usage}; "
            f"at most {stats['max_per_prefix']} items share a prefix")


def code_tokens(codes: np.ndarray) -> dict[str, list[str]]:
    """codes (N, L) -> {"<item>": ["<a_12>", "<b_200>", ...]}, item i being row i."""
    codes = np.asarray(codes)
    if codes.shape[1] > len(LEVEL_PREFIXES):
        raise ValueError(f"at most {len(LEVEL_PREFIXES)} levels can be spelled as tokens, got {codes.shape[1]}")
    return {str(i): [index_token(lvl, int(c)) for lvl, c in enumerate(row)] for i, row in enumerate(codes)}
