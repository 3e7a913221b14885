"""Building blocks of the RQ-VAE: an MLP, k-means codebook initialisation and the
Sinkhorn-Knopp uniform mapping used to spread items over codes."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn


class MLP(nn.Module):
    """dims[0] -> dims[1] -> ... -> dims[-1]; ReLU (with optional batchnorm and dropout)
    between layers, a plain linear output. Weights are xavier-normal, biases zero."""

    def __init__(self, dims: list[int], dropout: float = 0.0, bn: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:  # hidden layer
                if bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, dims[0]) -> (B, dims[-1])
        return self.net(x)


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 100, seed: int = 0) -> torch.Tensor:
    """Cluster centres of x (N, d) -> (n_clusters, d) with sklearn's KMeans.

    When x has fewer distinct rows than clusters (a small first batch, duplicated items), the
    distinct rows become centres and the remaining centres are data points plus small noise,
    so every code starts near the data.
    """
    from sklearn.cluster import KMeans

    data = x.detach().cpu().double().numpy()
    n_distinct = len(np.unique(data, axis=0))
    k = min(n_clusters, n_distinct)
    km = KMeans(n_clusters=k, max_iter=iters, n_init=1, random_state=seed).fit(data)
    centres = km.cluster_centers_
    if k < n_clusters:
        rng = np.random.default_rng(seed)
        extra = data[rng.integers(0, len(data), n_clusters - k)]
        scale = data.std() if data.std() > 0 else 1.0
        centres = np.concatenate([centres, extra + 1e-3 * scale * rng.standard_normal(extra.shape)])
    return torch.as_tensor(centres, dtype=x.dtype, device=x.device)


def center_distances(d: torch.Tensor) -> torch.Tensor:
    """Shift and scale a distance matrix to [-1, 1] so that one epsilon suits any data scale."""
    lo, hi = d.min(), d.max()
    middle, half_range = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-12)
    return (d - middle) / half_range


def _sinkhorn_plan(d: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp on costs d (B, K) in float64; may contain NaN/inf when epsilon is tiny."""
    B, K = d.shape
    # Subtracting each row's minimum is a per-item scale, which the row normalisation undoes;
    # it keeps exp() from overflowing. Far codes may still underflow to exactly zero.
    q = torch.exp(-(d - d.min(dim=1, keepdim=True).values) / epsilon)  # (B, K)
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / B  # each item carries mass 1/B
        q = q / q.sum(dim=0, keepdim=True) / K  # each code receives mass 1/K
    return q


def sinkhorn(distances: torch.Tensor, epsilon: float, iters: int, max_retries: int = 6) -> torch.Tensor:
    """Transport plan (B, K), float64, from items (mass 1/B each) to codes (mass 1/K each).

    ``distances`` (B, K) are centred and scaled to [-1, 1] first. If the plan turns NaN/inf (an
    epsilon so small that a whole code underflows), retry with 10x the epsilon and warn; if
    even that fails, warn and return the nearest-code assignment as a one-hot plan.
    """
    d = center_distances(distances.detach().double())
    eps = float(epsilon)
    for attempt in range(max_retries + 1):
        q = _sinkhorn_plan(d, eps, iters)
        if torch.isfinite(q).all():
            if attempt:
                warnings.warn(
                    f"Sinkhorn produced NaN/inf with sk_epsilon={epsilon}; used sk_epsilon={eps:g} instead",
                    RuntimeWarning, stacklevel=2)
            return q
        eps *= 10
    warnings.warn(f"Sinkhorn produced NaN/inf for every epsilon from {epsilon} to {eps / 10:g} "
                  "(non-finite distances?); fell back to the nearest code", RuntimeWarning, stacklevel=2)
    nearest = torch.nan_to_num(distances.detach(), nan=float("inf")).argmin(dim=1)
    return nn.functional.one_hot(nearest, distances.shape[1]).double() / distances.shape[0]


def sinkhorn_assign(distances: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """Codes (B,): each item's argmax of the Sinkhorn plan; ties go to the nearest code.

    Ties are common when there are fewer items than codes (re-assigning a small colliding
    group): every code an item owns alone gets exactly mass 1/K, and plain argmax would pick
    the lowest code id instead of a near one.
    """
    q = sinkhorn(distances, epsilon, iters)  # (B, K)
    best = q >= q.max(dim=1, keepdim=True).values * (1 - 1e-9)
    d = torch.nan_to_num(distances.detach().double(), nan=float("inf"))
    return torch.where(best, d, torch.full_like(d, float("inf"))).argmin(dim=1)
