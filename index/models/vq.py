"""One level of residual quantization: a codebook, nearest-code (or Sinkhorn) assignment,
the VQ-VAE losses and the straight-through estimator."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from index.models.layers import kmeans, sinkhorn_assign


class VectorQuantizer(nn.Module):
    def __init__(self, n_codes: int, e_dim: int, beta: float = 0.25, kmeans_init: bool = True,
                 kmeans_iters: int = 100, sk_epsilon: float = 0.0, sk_iters: int = 50):
        super().__init__()
        self.n_codes, self.e_dim, self.beta = n_codes, e_dim, beta
        self.kmeans_iters, self.sk_epsilon, self.sk_iters = kmeans_iters, sk_epsilon, sk_iters
        self.codebook = nn.Embedding(n_codes, e_dim)  # (K, e_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / n_codes, 1.0 / n_codes)
        # Saved with the weights, so a reloaded model is never re-initialised.
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @torch.no_grad()
    def init_codebook(self, x: torch.Tensor) -> None:  # x: (B, e_dim), the first batch's residuals
        self.codebook.weight.copy_(kmeans(x, self.n_codes, self.kmeans_iters))
        self.initted.fill_(True)

    def distances(self, x: torch.Tensor) -> torch.Tensor:  # (B, e_dim) -> (B, K) squared L2
        c = self.codebook.weight
        return x.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1)[None, :] - 2 * x @ c.t()

    def assign(self, x: torch.Tensor, use_sk: bool = False) -> torch.Tensor:  # (B, e_dim) -> (B,) codes
        d = self.distances(x)
        if use_sk and self.sk_epsilon > 0:
            return sinkhorn_assign(d, self.sk_epsilon, self.sk_iters)
        return d.argmin(dim=1)

    def forward(self, x: torch.Tensor, use_sk: bool = True):
        """x (B, e_dim) -> (x_q with straight-through gradient (B, e_dim), loss (), codes (B,))."""
        if self.training and not bool(self.initted):
            self.init_codebook(x)
        codes = self.assign(x, use_sk)
        x_q = self.codebook(codes)  # (B, e_dim)
        codebook_loss = F.mse_loss(x_q, x.detach())  # pulls codes towards the encoder outputs
        commitment_loss = F.mse_loss(x_q.detach(), x)  # keeps the encoder close to its codes
        loss = codebook_loss + self.beta * commitment_loss
        x_q = x + (x_q - x).detach()  # straight-through: the decoder's gradient reaches the encoder
        return x_q, loss, codes
