"""RQ-VAE: MLP encoder -> residual quantizer -> mirrored MLP decoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from index.models.layers import MLP
from index.models.rq import ResidualQuantizer

RECON_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, num_emb_list: list[int], e_dim: int = 32,
                 layers: list[int] = (2048, 1024, 512, 256, 128, 64), dropout_prob: float = 0.0,
                 bn: bool = False, quant_loss_weight: float = 1.0, beta: float = 0.25,
                 kmeans_init: bool = True, kmeans_iters: int = 100,
                 sk_epsilons: list[float] | None = None, sk_iters: int = 50, loss_type: str = "mse"):
        super().__init__()
        if loss_type not in RECON_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(RECON_LOSSES)}, got {loss_type!r}")
        self.in_dim, self.e_dim, self.quant_loss_weight = in_dim, e_dim, quant_loss_weight
        self.recon_loss = RECON_LOSSES[loss_type]
        dims = [in_dim, *layers, e_dim]
        self.encoder = MLP(dims, dropout_prob, bn)  # (B, in_dim) -> (B, e_dim)
        self.rq = ResidualQuantizer(num_emb_list, e_dim, beta, kmeans_init, kmeans_iters, sk_epsilons, sk_iters)
        self.decoder = MLP(dims[::-1], dropout_prob, bn)  # (B, e_dim) -> (B, in_dim)

    def forward(self, x: torch.Tensor, use_sk: bool = True):
        """x (B, in_dim) -> (reconstruction (B, in_dim), quant loss (), codes (B, L))."""
        z_q, quant_loss, codes = self.quantize(x, use_sk=use_sk)
        return self.decoder(z_q), quant_loss, codes

    def quantize(self, x: torch.Tensor, use_sk: bool = True):
        """x (B, in_dim) -> (quantised latent z_q (B, e_dim), quant loss (), codes (B, L)); z_q passes
        the straight-through gradient to the encoder (what the collaborative alignment trains)."""
        return self.rq(self.encode(x), use_sk=use_sk)

    def compute_loss(self, recon: torch.Tensor, quant_loss: torch.Tensor, x: torch.Tensor):
        """(total loss, reconstruction loss (MSE or L1, as loss_type))."""
        recon_loss = self.recon_loss(recon, x)
        return recon_loss + self.quant_loss_weight * quant_loss, recon_loss

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, e_dim)
        return self.encoder(x)

    @torch.no_grad()
    def get_indices(self, x: torch.Tensor, use_sk: bool = False) -> torch.Tensor:  # (B, in_dim) -> (B, L)
        return self.rq(self.encode(x), use_sk=use_sk)[2]
