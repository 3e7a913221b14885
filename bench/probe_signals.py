"""Where does the next item's signal live on a dataset, and can the index carry it?

Count-based scorers, fitted on the training parts of the leave-one-out split in a second, each
ranking the whole catalogue for every test user from the last ``--max_his_len`` history items
(seen items stay rankable unless the row says otherwise, as in the main protocol):

  popularity                  training counts
  popularity, history removed the same, minus the items in the history window
  content                     popularity + cosine between an item's text embedding (centred) and the
                              history's mean one (--embedding; the RQ-VAE's input)
  era                         popularity reweighted by P(next is a late release | share of late releases
                              among the last 5 items), late = the dataset's newest two years (items
                              need a "year" field)
  code co-occurrence, level l popularity x how much more often the next item's level-l code follows
                              the codes of the last 5 items than chance: what an index that groups
                              items by that code can carry about the next item; for the dataset's
                              index, and for each of --index_files (e.g. a text and a collaborative
                              index, compared on the same users)
  item co-occurrence          how often each item followed the last 5 items within 5 steps, from all
                              training parts, and from a budget of ``--windows`` random windows
                              (LC-Rec's training examples at a CPU profile's budget)
  start vectors               cosine between an item's vector and the mean one of the last 5 items, for
                              the vectors that start the index-token rows (item_vectors.py): the
                              items' collab vectors, and the rows the collab start gives (an item
                              read as the mean of its codes' vectors); with --base_model, the same
                              for the title start. What each start hands the model about the next
                              item before any training

Each prints HR@10 and NDCG@10 with standard errors on all test users. A signal that the index's
codes do not carry (code co-occurrence near popularity) has to be learned item by item by the
LLM, from its index tokens, at the rate its training budget allows.

    python bench/probe_signals.py --data_path runs/ml-100k-SmolLM2-135M-Instruct-cpu/data --dataset ml-100k \
        --embedding runs/ml-100k-SmolLM2-135M-Instruct-cpu/data/ml-100k/ml-100k.emb-smollm2-135m-instruct-td.npy \
        --base_model ~/.cache/lcrec/SmolLM2-135M-Instruct \
        --index_files text.index.json collab.index.json
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import sparse

import data
from dataset_files import load_indices, parse_index_token, test_item, train_part
from item_vectors import COLLAB_RANK, code_vectors, collab_vectors, follow_counts, title_vectors
from metrics import compute_metrics, mean_and_stderr, metric_value, standard_errors, target_rank
from utils import DataError, exit_on_data_error

METRICS = ["hit@10", "ndcg@10"]
RECENT = 5  # items of the history the co-occurrence and era scorers read, and the window they count in

Scorer = Callable[[list[int]], np.ndarray]  # history (item numbers) -> [N] scores


def user_ranks(score: Scorer, histories: list[list[int]], targets: list[int], remove_history: bool = False) -> list[int]:
    """Each test user's target rank in the top 10 of ``score`` (0: not in it)."""
    ranks = []
    for history, target in zip(histories, targets):
        scores = score(history).astype(np.float64, copy=True)  # [N]
        if remove_history:
            scores[history] = -np.inf
        top = np.argpartition(-scores, 10)[:10]
        ranks.append(target_rank(top[np.argsort(-scores[top])].tolist(), target))
    return ranks


def evaluate(score: Scorer, histories: list[list[int]], targets: list[int], remove_history: bool = False) -> dict:
    """HR@10, NDCG@10 and their standard errors of ``score`` over the test users."""
    ranks = user_ranks(score, histories, targets, remove_history)
    values, errors = compute_metrics(ranks, METRICS), standard_errors(ranks, METRICS)
    return {m: (values[m], errors[m]) for m in METRICS}


def paired(ranks_a: list[int], ranks_b: list[int]) -> dict:
    """Mean of a - b over the same users, and its standard error, per metric."""
    return {m: mean_and_stderr([metric_value(m, a) - metric_value(m, b) for a, b in zip(ranks_a, ranks_b)])
            for m in METRICS}


def random_windows(seqs: Sequence[Sequence[int]], count: int, length: int, seed: int = 0) -> list[list[int]]:
    """``count`` windows of ``length`` consecutive items, each from a random training part."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        seq = rng.choice(seqs)
        start = rng.randrange(max(1, len(seq) - length + 1))
        out.append(list(seq[start:start + length]))
    return out


def item_codes(indices: dict[str, list[str]], n: int) -> np.ndarray:
    """[N, L] each item's code at each level."""
    codes = np.zeros((n, len(next(iter(indices.values())))), dtype=np.int64)
    for item, tokens in indices.items():
        codes[int(item)] = [parse_index_token(t)[1] for t in tokens]
    return codes


def cooccurrence_rows(codes: np.ndarray, train: list[list[int]], counts: np.ndarray, log_pop: np.ndarray,
              label: str = "") -> list[tuple[str, Scorer, bool]]:
    """The code co-occurrence scorers of every level of codes [N, L]."""
    rows = []
    for level in range(codes.shape[1]):
        size = int(codes[:, level].max()) + 1
        follows = follow_counts(train, codes[:, level], size, RECENT).toarray() + 1  # [C, C], add-one smoothed
        lift = follows / follows.sum(1, keepdims=True)
        lift /= np.bincount(codes[:, level], weights=counts, minlength=size)[None] / counts.sum() + 1e-12
        rows.append((f"code co-occurrence, level {level}{label}",
                     lambda h, lv=level, lift=lift: log_pop + np.log(lift[codes[h[-RECENT:], lv]].mean(0))[codes[:, lv]],
                     True))
    return rows


def years(items: dict[str, dict], n: int) -> np.ndarray | None:
    """[N] release years, or None when the items have no usable "year" field."""
    out = np.full(n, np.nan)
    for item, feat in items.items():
        try:
            out[int(item)] = float(str(feat.get("year", "")).strip()[:4])
        except ValueError:
            pass
    return None if np.isnan(out).mean() > 0.5 else np.nan_to_num(out, nan=np.nanmedian(out))


def cosine_scorer(vectors: dict[str, "torch.Tensor"], n: int, log_pop: np.ndarray) -> Scorer:
    """Cosine between each item's vector and the mean one of the last RECENT history items (items
    without a vector score 0); popularity only breaks ties."""
    table = np.zeros((n, len(next(iter(vectors.values())))))
    for item, vec in vectors.items():
        table[int(item)] = vec.numpy()
    table /= np.linalg.norm(table, axis=1, keepdims=True) + 1e-9
    return lambda h: table @ table[h[-RECENT:]].mean(0) + 1e-3 * log_pop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--index_file", default=".index.json")
    p.add_argument("--embedding", default=None, help="[N, D] .npy of item text embeddings (the content row)")
    p.add_argument("--max_his_len", type=int, default=20)
    p.add_argument("--windows", type=int, default=2400, help="training windows of the budgeted co-occurrence row")
    p.add_argument("--base_model", default=None, help="model folder whose input embeddings give the title start's row")
    p.add_argument("--index_files", nargs="+", default=[], metavar="PATH",
                   help="more index files (full paths) whose code co-occurrence rows are added, on the same users")
    args = p.parse_args()
    if args.max_his_len < 1 or args.windows < 1:
        raise DataError("--max_his_len and --windows must be positive")
    files = data.load_files(args)
    n = 1 + max(int(i) for i in files.indices)
    train = [train_part(seq) for seq in files.inters.values()]
    histories = [seq[:-1][-args.max_his_len:] for seq in files.inters.values()]
    targets = [test_item(seq) for seq in files.inters.values()]
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train]), minlength=n).astype(float)
    log_pop = np.log(counts + 1)  # [N]

    rows: list[tuple[str, Scorer, bool]] = [("popularity", lambda h: log_pop, False),
                                              ("popularity, history removed", lambda h: log_pop, True)]
    if args.embedding:
        emb = np.load(args.embedding).astype(np.float64)
        if emb.shape[0] != n:
            raise DataError(f"--embedding {args.embedding}: {emb.shape[0]} rows, expected one per item ({n})")
        emb -= emb.mean(0)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9
        rows.append(("content (text embedding)", lambda h: log_pop + emb @ emb[h].mean(0), True))
    year = years(files.items, n)
    if year is not None and len(np.unique(year)) > 2 and any(len(s) > RECENT for s in train):
        first_late = np.sort(np.unique(year))[-2]
        late = (year >= first_late).astype(int)  # the newest two release years

        def late_bin(recent: Sequence[int]) -> int:
            """0..RECENT: the share of late releases among ``recent``, in fifths."""
            return int(round(late[list(recent)].mean() * RECENT))

        bins = np.array([late_bin(s[k - RECENT:k]) for s in train for k in range(RECENT, len(s))])
        nxt = np.array([late[s[k]] for s in train for k in range(RECENT, len(s))])
        seen = np.bincount(bins, minlength=RECENT + 1)
        p_late = np.where(seen > 0, np.bincount(bins, weights=nxt, minlength=RECENT + 1) / np.maximum(seen, 1),
                          nxt.mean()).clip(1e-6, 1 - 1e-6)  # [RECENT+1]; an empty bin: the overall rate
        mass = np.array([counts[late == 0].sum(), counts[late == 1].sum()]) + 1

        def era(h: list[int]) -> np.ndarray:
            q = p_late[late_bin(h[-RECENT:])]
            return log_pop + np.where(late == 1, np.log(q / mass[1]), np.log((1 - q) / mass[0]))

        rows.append((f"era (late = {int(first_late)}+)", era, True))
    codes = item_codes(files.indices, n)
    rows += cooccurrence_rows(codes, train, counts, log_pop)
    for path in args.index_files:
        other = load_indices(path, files.indices)
        if set(other) != set(files.indices):
            raise DataError(f"--index_files {path}: indexes {len(other)} items, "
                            f"expected the dataset's {len(files.indices)}")
        rows += cooccurrence_rows(item_codes(other, n), train, counts, log_pop, f" [{path}]")
    for name, seqs in (("item co-occurrence, all training", train),
                       (f"item co-occurrence, {args.windows} windows",
                        random_windows(train, args.windows, args.max_his_len + 1))):
        follows = follow_counts(seqs, np.arange(n), n, RECENT)
        follows = sparse.diags(1 / (np.asarray(follows.sum(1)).ravel() + 1)) @ follows  # rows: P(next | item)
        rows.append((name, lambda h, f=follows: np.log(np.asarray(f[h[-RECENT:]].sum(0)).ravel() + 1e-4)
                     + 1e-3 * log_pop, True))  # popularity breaks the ties among unseen pairs

    starts = {"collab": collab_vectors(files.inters, list(files.indices), COLLAB_RANK)}
    if args.base_model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.base_model)
        titles = {item: files.items.get(item, {}).get("title", "") for item in files.indices}
        starts["title"] = title_vectors(model.get_input_embeddings().weight.detach(), AutoTokenizer.from_pretrained(
            args.base_model), titles)
    for start, vectors in starts.items():
        per_code = code_vectors(files.indices, vectors)
        code_rows = {item: torch.stack([per_code[t] for t in tokens if t in per_code]).mean(0)
                     for item, tokens in files.indices.items() if any(t in per_code for t in tokens)}
        for what, table in (("items", vectors), ("code rows", code_rows)):
            if start == "title" and what == "items":
                continue  # the title start is defined by its code rows; the items' title vectors are not rows
            rows.append((f"{start} start, {what}", cosine_scorer(table, n, log_pop), True))

    print(f"{args.dataset}: {n} items, {len(targets)} test users, history {args.max_his_len}; "
          f"codes per level in use: {[len(np.unique(codes[:, lv])) for lv in range(codes.shape[1])]}")
    level_ranks: dict[str, list[int]] = {}  # the code co-occurrence rows of --index_files, for the paired lines
    for name, score, remove in rows:
        ranks = user_ranks(score, histories, targets, remove)
        if name.startswith("code co-occurrence") and name.endswith("]"):
            level_ranks[name] = ranks
        values, errors = compute_metrics(ranks, METRICS), standard_errors(ranks, METRICS)
        print(f"{name:38s} " + "  ".join(f"{m} {values[m]:.4f} ± {errors[m]:.4f}" for m in METRICS))
    for path in args.index_files[1:]:  # each further index against the first, paired over the same users
        for level in range(codes.shape[1]):
            first, other = (level_ranks.get(f"code co-occurrence, level {level} [{p}]")
                            for p in (args.index_files[0], path))
            if first is not None and other is not None:
                diff = paired(other, first)
                print(f"level {level}: {path} minus {args.index_files[0]}, paired: "
                      + "  ".join(f"{m} {v:+.4f} ± {e:.4f}" for m, (v, e) in diff.items()))


if __name__ == "__main__":
    with exit_on_data_error():
        main()
