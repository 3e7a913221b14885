"""Ranking metrics for next-item recommendation with one relevant item per example.

Every example is reduced to the 1-based ``rank`` of its target in the ranked list the model
produced (0 when the target is absent). With one relevant item and binary relevance:

    HR@K   = 1                      if 1 <= rank <= K else 0
    NDCG@K = 1 / log2(rank + 1)     if 1 <= rank <= K else 0   (the ideal DCG is 1)

Metrics of a prompt template are means over its examples; across templates we report the mean,
min and max of each metric (the paper's per-prompt aggregation).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

from arguments import parse_list
from utils import DataError

_METRIC_RE = re.compile(r"^(hit|hr|ndcg)@(\d+)$")


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"hit@1,hit@5,ndcg@10"`` -> canonical names. ``hr@K`` is read as ``hit@K``."""
    parts = parse_list(spec, str, "--metrics") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        m = _METRIC_RE.match(part.strip().lower())
        if m is None or int(m.group(2)) < 1:
            raise DataError(f"--metrics: {part!r} is not a metric; expected hit@K or ndcg@K with K >= 1")
        name = f"{'hit' if m.group(1) in ('hit', 'hr') else 'ndcg'}@{int(m.group(2))}"
        if name not in out:
            out.append(name)
    if not out:
        raise DataError("--metrics: no metric given; expected e.g. hit@1,hit@5,hit@10,ndcg@5,ndcg@10")
    return out


def max_k(metrics: Sequence[str]) -> int:
    return max(int(m.split("@")[1]) for m in metrics)


def target_rank(ranked_items: Sequence, target) -> int:
    """1-based position of ``target`` in ``ranked_items``; 0 when it is not there."""
    for pos, item in enumerate(ranked_items, start=1):
        if item == target:
            return pos
    return 0


def metric_value(metric: str, rank: int) -> float:
    """Value of one metric for one example whose target sits at ``rank`` (0 = missing)."""
    name, k = metric.split("@")
    k = int(k)
    if rank < 1 or rank > k:
        return 0.0
    return 1.0 if name == "hit" else 1.0 / math.log2(rank + 1)


def compute_metrics(ranks: Iterable[int], metrics: Sequence[str]) -> dict[str, float]:
    """Mean of each metric over examples given by their target ranks."""
    ranks = list(ranks)
    if not ranks:
        raise DataError("no test examples to score: the test set is empty")
    return {m: sum(metric_value(m, r) for r in ranks) / len(ranks) for m in metrics}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error, sqrt(sample variance / n) (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def standard_errors(ranks: Iterable[int], metrics: Sequence[str]) -> dict[str, float]:
    """Standard error of each metric's mean over examples: sqrt(sample variance / n)."""
    ranks = list(ranks)
    return {m: mean_and_stderr([metric_value(m, r) for r in ranks])[1] for m in metrics}


def personalisation(ranked: Sequence[Sequence], k: int = 10) -> dict[str, float]:
    """How much rankings depend on the user: distinct top-1 items across examples, and the share
    of examples whose top-k differs from the most common top-k (0 for a model that ranks alike
    for everyone, as popularity does)."""
    if not ranked:
        return {"distinct_top1": 0, f"top{k}_differs_share": 0.0}
    tops = [tuple(r[:k]) for r in ranked]
    most_common = Counter(tops).most_common(1)[0][0]
    return {"distinct_top1": len({r[0] for r in ranked if len(r)}),
            f"top{k}_differs_share": sum(t != most_common for t in tops) / len(tops)}


def per_user_values(users: Sequence[str], rank_lists: Sequence[Sequence[int]], metrics: Sequence[str]
                    ) -> dict[str, list]:
    """Each user's value of each metric, averaged over ``rank_lists`` (one list of target ranks per
    prompt template or seed, each aligned with ``users``): ``{"users": [...], metric: [...]}``. Two
    results files that hold these can be compared user by user (``paired_difference``)."""
    if any(len(ranks) != len(users) for ranks in rank_lists):
        raise ValueError(f"every rank list must have one rank per user ({len(users)})")
    out: dict[str, list] = {"users": [str(u) for u in users]}
    for m in metrics:
        out[m] = [round(sum(metric_value(m, ranks[i]) for ranks in rank_lists) / len(rank_lists), 6)
                  for i in range(len(users))]
    return out


def paired_difference(a: dict[str, list], b: dict[str, list], metrics: Sequence[str],
                      names: tuple[str, str] = ("a", "b")) -> dict[str, tuple[float, float]]:
    """Mean of ``a - b`` over the same users and the standard error of that mean, per metric, from
    two ``per_user_values``. Pairing removes what both models share (the users whose target is
    easy for both), so this standard error is the one that says whether ``a`` beats ``b``; it is
    smaller than the two separate standard errors combined when their hits overlap."""
    if set(a["users"]) != set(b["users"]) or len(a["users"]) != len(b["users"]):
        raise DataError(f"{names[0]} and {names[1]} were scored on different test users "
                        f"({len(a['users'])} and {len(b['users'])}); compare results of the same users")
    if len(set(a["users"])) == len(a["users"]):
        where = {u: i for i, u in enumerate(b["users"])}
        order = [where[u] for u in a["users"]]
    elif a["users"] == b["users"]:  # a user with several examples: only the same order pairs them
        order = list(range(len(a["users"])))
    else:
        raise DataError(f"{names[0]} and {names[1]} hold several examples of one user in different orders; "
                        "compare results of the same test set")
    out = {}
    for m in metrics:
        if m not in a or m not in b:
            raise DataError(f"{names[0] if m not in a else names[1]}: no per-user values of {m}")
        out[m] = mean_and_stderr([x - b[m][j] for j, x in zip(order, a[m])])
    return out


def metric_label(metric: str) -> str:
    """``hit@10`` -> ``HR@10``, ``ndcg@10`` -> ``NDCG@10``: the names tables print."""
    return metric.replace("hit", "HR").replace("ndcg", "NDCG")


def aggregate(per_prompt: dict[str, dict[str, float]], metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{"mean": {...}, "min": {...}, "max": {...}}`` of each metric over prompt templates."""
    if not per_prompt:
        raise DataError("no prompt results to aggregate")
    values = {m: [res[m] for res in per_prompt.values()] for m in metrics}
    return {
        "mean": {m: sum(v) / len(v) for m, v in values.items()},
        "min": {m: min(v) for m, v in values.items()},
        "max": {m: max(v) for m, v in values.items()},
    }


def format_table(per_prompt: dict[str, dict[str, float]], summary: dict[str, dict[str, float]],
                 metrics: Sequence[str], stderr: dict[str, dict[str, float]] | None = None,
                 personal: dict[str, dict[str, float]] | None = None) -> str:
    """A plain-text table: one row per prompt template (with each metric's standard error over
    examples, and how personal the rankings are, when given), then mean/min/max."""
    width = 18 if stderr else 9
    extra = personal and next(iter(personal.values()))
    head = f"{'prompt':>8} " + " ".join(f"{m:>{width}}" for m in metrics)
    head += "".join(f" {k:>20}" for k in extra) if extra else ""
    rows = [head, "-" * len(head)]
    for pid, res in per_prompt.items():
        cells = [f"{res[m]:.4f} ± {stderr[pid][m]:.4f}" if stderr else f"{res[m]:.4f}" for m in metrics]
        row = f"{pid:>8} " + " ".join(f"{c:>{width}}" for c in cells)
        if extra:
            row += "".join(f" {personal[pid][k]:>20.4g}" for k in extra)
        rows.append(row)
    rows.append("-" * len(head))
    for name in ("mean", "min", "max"):
        rows.append(f"{name:>8} " + " ".join(f"{summary[name][m]:>{width}.4f}" for m in metrics))
    return "\n".join(rows)
