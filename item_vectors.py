"""Item vectors that start the new index-token rows (``--index_token_init``): from the items' titles
in the base model's own embedding space, or from which items the training sequences hold close
together (``collab``). modeling.init_index_tokens turns them into one row per code.

The collab vectors also serve as the collaborative embedding of a collaborative index
(``index/main.py --collab_emb``); saved one row per item, in item-id order:

    python item_vectors.py --data_path data --dataset ml-100k --output data/ml-100k/ml-100k.collab-ppmi.npy
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from dataset_files import dataset_file, load_inters, load_items, train_part
from utils import DataError, atomic_path, exit_on_data_error

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix

COLLAB_WINDOW = 5  # items within this many steps of each other count as watched together
COLLAB_RANK = 64  # dimensions the co-occurrence is reduced to before it is placed in the model's space
SAVED_DIM = 32  # the saved file's width: the RQ-VAE's code dimension (--e_dim), as LETTER's 32-d embeddings


def title_vectors(embeddings: torch.Tensor, tokenizer, titles: dict[str, str]) -> dict[str, torch.Tensor]:
    """{item: [H]} the mean input embedding of each title's tokens (items without a title are left out)."""
    out = {}
    for item, title in titles.items():
        ids = tokenizer(title or "", add_special_tokens=False)["input_ids"]
        if ids:
            out[item] = embeddings[ids].float().mean(0)  # [H]
    return out


def follow_counts(seqs: Sequence[Sequence[int]], key: np.ndarray, size: int, window: int) -> csr_matrix:
    """[size, size] sparse: how often key[j] came within ``window`` steps after key[i] in ``seqs``."""
    from scipy.sparse import csr_matrix

    rows, cols = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for seq in seqs:
        seq = key[np.asarray(seq, dtype=np.int64)]
        for step in range(1, window + 1):
            rows.append(seq[:-step])
            cols.append(seq[step:])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(size, size))


def collab_vectors(inters: dict[str, list[int]], items: list[str], dim: int, window: int = COLLAB_WINDOW,
                   rank: int = COLLAB_RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """{item: [dim]} vectors whose inner products follow how often two items occur within ``window``
    steps of each other in the training parts (``s[:-2]``; the validation and test items are never read).

    Positive pointwise mutual information of the symmetric co-occurrence counts, reduced to ``rank``
    dimensions by truncated SVD (scaled by the square root of the singular values), then placed in
    ``dim`` dimensions by a seeded random orthonormal map, which keeps every inner product. Items
    that never co-occur with another get no vector."""
    from scipy.sparse import coo_matrix
    from sklearn.decomposition import TruncatedSVD

    pos = {item: k for k, item in enumerate(items)}
    seqs = [[pos[str(i)] for i in train_part(seq) if str(i) in pos] for seq in inters.values()]
    n = len(items)
    counts = follow_counts(seqs, np.arange(n), n, window).astype(np.float64)  # whole counts: exact in float32
    counts = (counts + counts.T).tocoo()  # [N, N] symmetric
    marginal = np.asarray(counts.sum(axis=1)).ravel()  # [N]
    pmi = np.log(counts.data * counts.sum() / (marginal[counts.row] * marginal[counts.col]))
    keep = pmi > 0
    ppmi = coo_matrix((pmi[keep], (counts.row[keep], counts.col[keep])), shape=(n, n)).tocsr()
    rank = min(rank, dim, n - 1)
    if rank < 1 or ppmi.nnz == 0:
        return {}
    svd = TruncatedSVD(n_components=rank, random_state=seed)
    reduced = svd.fit_transform(ppmi) / np.sqrt(np.maximum(svd.singular_values_, 1e-12))  # [N, r]: U sqrt(S)
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator))  # [dim, r], orthonormal columns
    vectors = torch.from_numpy(reduced).float() @ basis.T  # [N, dim]
    return {item: vectors[k] for k, item in enumerate(items) if marginal[k] > 0}


def code_vectors(indices: dict[str, list[str]], item_vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{index token: [D]} the mean over the items under each code of their vectors minus the mean item
    vector. Without the centring every code would point along the direction all items share (for
    titles, cosine ~0.8 between codes). Codes none of whose items has a vector are left out."""
    if not item_vectors:
        return {}
    item_mean = torch.stack(list(item_vectors.values())).mean(0)  # [D]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for item, vec in item_vectors.items():
        for token in indices.get(item, []):
            sums[token] = sums.get(token, 0) + (vec - item_mean)
            counts[token] = counts.get(token, 0) + 1
    return {token: sums[token] / counts[token] for token in sums}


def item_matrix(vectors: dict[str, torch.Tensor], n_items: int) -> np.ndarray:
    """float32 [n_items, D]: row i is item i's vector; items without one get a zero row."""
    dim = len(next(iter(vectors.values())))
    out = np.zeros((n_items, dim), dtype=np.float32)
    for item, vec in vectors.items():
        out[int(item)] = np.asarray(vec, dtype=np.float32)
    return out


def save_item_matrix(path: str | os.PathLike, matrix: np.ndarray) -> None:
    """Write an [items, D] float32 .npy atomically (never a half-written file)."""
    with atomic_path(path) as tmp:
        np.save(tmp, np.asarray(matrix, dtype=np.float32))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Save the items' collab (PPMI-SVD co-occurrence) vectors as an "
                                            ".npy, one row per item in item-id order (zero rows: never co-occurs).")
    p.add_argument("--data_path", required=True, help="folder holding <dataset>/<dataset>.inter.json and .item.json")
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True, help=".npy to write [items, dim]")
    p.add_argument("--dim", type=int, default=SAVED_DIM, help="vector width (the SVD keeps min(dim, 64) dimensions)")
    p.add_argument("--window", type=int, default=COLLAB_WINDOW, help="steps within which items count as co-occurring")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dim < 1 or args.window < 1:
        raise DataError("--dim and --window must be positive")
    inters = load_inters(dataset_file(args.data_path, args.dataset, ".inter.json"))
    item_file = dataset_file(args.data_path, args.dataset, ".item.json")
    items = [str(i) for i in range(len(load_items(item_file)))]
    if set(items) != set(load_items(item_file)):
        raise DataError(f"{item_file}: item ids must be the strings '0'..'{len(items) - 1}' (one row per item)")
    vectors = collab_vectors(inters, items, args.dim, args.window, rank=min(COLLAB_RANK, args.dim), seed=args.seed)
    if not vectors:
        raise DataError(f"{args.data_path}/{args.dataset}: no two items co-occur in the training parts; "
                        "nothing to save")
    save_item_matrix(args.output, item_matrix(vectors, len(items)))
    print(f"{len(vectors)} of {len(items)} items have a vector ({args.dim}-d) -> {args.output}")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
