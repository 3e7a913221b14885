"""Residual quantization: level l quantizes what levels 0..l-1 left unexplained."""
from __future__ import annotations

import torch
import torch.nn as nn

from index.models.vq import VectorQuantizer


class ResidualQuantizer(nn.Module):
    def __init__(self, num_emb_list: list[int], e_dim: int, beta: float = 0.25, kmeans_init: bool = True,
                 kmeans_iters: int = 100, sk_epsilons: list[float] | None = None, sk_iters: int = 50):
        super().__init__()
        sk_epsilons = sk_epsilons if sk_epsilons is not None else [0.0] * len(num_emb_list)
        if len(sk_epsilons) != len(num_emb_list):
            raise ValueError(f"--sk_epsilons has {len(sk_epsilons)} values for {len(num_emb_list)} levels (--num_emb_list)")
        self.num_emb_list = list(num_emb_list)
        self.levels = nn.ModuleList(
            VectorQuantizer(k, e_dim, beta, kmeans_init, kmeans_iters, eps, sk_iters)
            for k, eps in zip(num_emb_list, sk_epsilons)
        )

    def forward(self, z: torch.Tensor, use_sk: bool = True):
        """z (B, e_dim) -> (z_q (B, e_dim), mean level loss (), codes (B, L))."""
        residual, z_q = z, torch.zeros_like(z)
        losses, codes = [], []
        for vq in self.levels:
            r_q, loss, c = vq(residual, use_sk=use_sk)
            residual = residual - r_q
            z_q = z_q + r_q
            losses.append(loss)
            codes.append(c)
        return z_q, torch.stack(losses).mean(), torch.stack(codes, dim=1)

    @torch.no_grad()
    def last_level_inputs(self, z: torch.Tensor) -> torch.Tensor:
        """Residual (B, e_dim) that the last level quantizes, with nearest codes above it."""
        residual = z
        for vq in self.levels[:-1]:
            residual = residual - vq.codebook(vq.assign(residual))
        return residual
