"""Item embeddings (<D>.emb-<plm>-td.npy, float [I, d], row i = item i) as a torch Dataset."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import DataError

# Text embeddings are of order 1 to 100 (a few LLM dimensions reach thousands). Far beyond this the
# squared errors overflow float32 (|x| near 1e19) and distances lose all precision long before, so
# such a file is refused up front rather than failing as NaN losses or an infeasible assignment.
MAX_ABS_VALUE = 1e6


def load_embeddings(path: str | os.PathLike) -> np.ndarray:
    """Read and check an embedding matrix: a 2-D, non-empty, finite float array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: embedding file not found (expected a .npy array [items, dim])")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from e
    if not isinstance(emb, np.ndarray) or emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise DataError(f"{path}: expected a non-empty 2-D array [items, dim], got shape {getattr(emb, 'shape', None)}")
    if not np.issubdtype(emb.dtype, np.number) or np.issubdtype(emb.dtype, np.complexfloating):
        raise DataError(f"{path}: expected a real numeric array, got dtype {emb.dtype}")
    emb = emb.astype(np.float32, copy=False)
    if not np.isfinite(emb).all():
        bad = np.unique(np.nonzero(~np.isfinite(emb))[0])
        raise DataError(f"{path}: {len(bad)} rows contain NaN/inf (first rows: {bad[:5].tolist()})")
    check_scale(emb, path)
    return emb


def check_scale(emb: np.ndarray, path: str | os.PathLike) -> None:
    """Refuse embeddings whose values are absurdly large for a float32 RQ-VAE."""
    peak = float(np.abs(emb).max())
    if peak > MAX_ABS_VALUE:
        row, col = np.unravel_index(int(np.abs(emb).argmax()), emb.shape)
        raise DataError(
            f"{path}: values are too large: max |x| = {peak:.3g} (row {row}, column {col}); text embeddings are "
            f"expected within about +-1e3, and at most {MAX_ABS_VALUE:.0e} is accepted. Check that the file holds "
            "embeddings, or rescale them (e.g. divide by their standard deviation)")


class EmbDataset(Dataset):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.embeddings = torch.from_numpy(load_embeddings(self.path))  # (I, d)
        self.dim = self.embeddings.shape[1]

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.embeddings[idx], idx
