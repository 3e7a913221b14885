"""LETTER's two regularisers of a collaborative index (Wang et al., CIKM 2024), added to the
RQ-VAE's loss:

- alignment: InfoNCE over the batch between each item's quantised latent (the sum of its codes'
  vectors) and its collaborative embedding (item vectors from who watched what: SASRec's item
  embeddings, or item_vectors.py's PPMI-SVD vectors), so that items watched together get near
  latents and therefore shared codes;
- diversity: per level, the codes are clustered (k-means on the codebook, redone every epoch); the
  code an item was given is pushed to score another code of its cluster above every other code,
  against codes piling up on a few popular entries.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from index.models.rq import ResidualQuantizer

DIVERSITY_CLUSTERS = 10  # LETTER's clusters per codebook


def alignment_loss(z_q: torch.Tensor, collab: torch.Tensor, temperature: float = 1.0,
                   cosine: bool = False) -> torch.Tensor:
    """InfoNCE: z_q (B, e), collab (B, e) -> (); row i's positive is collab[i], the other rows of the
    batch are its negatives. Scores are inner products (LETTER: no normalisation, temperature 1) or,
    with ``cosine``, cosines: then the loss cannot be lowered by scaling the latents up."""
    if cosine:
        z_q, collab = F.normalize(z_q, dim=1), F.normalize(collab, dim=1)
    logits = z_q @ collab.t() / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(z_q), device=z_q.device))


@torch.no_grad()
def code_clusters(codebook: torch.Tensor, n_clusters: int = DIVERSITY_CLUSTERS, seed: int = 0) -> torch.Tensor:
    """codebook (K, e) -> (K,) cluster of each code, by k-means (LETTER: size-constrained k-means;
    plain k-means here, without the extra dependency)."""
    from sklearn.cluster import KMeans

    data = codebook.detach().cpu().double().numpy()
    k = min(n_clusters, len(np.unique(data, axis=0)))
    labels = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed).fit_predict(data)
    return torch.as_tensor(labels, dtype=torch.long, device=codebook.device)


def diversity_loss(codebook: torch.Tensor, codes: torch.Tensor, clusters: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """codebook (K, e), codes (B,) given to the batch's items, clusters (K,) -> ().

    For each item, a positive is drawn among the other codes of its code's cluster; the loss is the
    cross-entropy of the scores codebook[code] . codebook[k] over all codes k but the item's own,
    towards that positive. Items whose code is alone in its cluster are left out."""
    n_codes = len(codebook)
    own = F.one_hot(codes, n_codes).bool()  # (B, K)
    same_cluster = (clusters[None, :] == clusters[codes][:, None]) & ~own  # (B, K) candidate positives
    keep = same_cluster.any(dim=1)  # (B,)
    if not keep.any():
        return codebook.sum() * 0.0  # no positive anywhere: a zero that keeps the graph
    # drawn on the CPU, where the generator lives
    positives = torch.multinomial(same_cluster[keep].float().cpu(), 1, generator=generator).squeeze(1)  # (B',)
    positives = positives.to(codebook.device)
    logits = codebook[codes[keep]] @ codebook.t()  # (B', K)
    logits = logits.masked_fill(own[keep], float("-inf"))  # an item's own code is never a candidate
    return F.cross_entropy(logits, positives)


class CollabRegularisers(nn.Module):
    """The weighted sum of both regularisers for a batch. ``collab`` (N, c) holds one row per item,
    in item-id order; all-zero rows (items with no collaborative signal) sit out of the alignment.
    When c differs from the code dimension, a learned linear map (no bias) takes the collaborative
    embeddings to it (LETTER's 32-d SASRec embeddings match its 32-d codes and need none)."""

    def __init__(self, collab: torch.Tensor, e_dim: int, align_weight: float, diversity_weight: float,
                 n_clusters: int = DIVERSITY_CLUSTERS, temperature: float = 1.0, cosine: bool = False, seed: int = 0):
        super().__init__()
        self.align_weight, self.diversity_weight = align_weight, diversity_weight
        self.n_clusters, self.temperature, self.cosine, self.seed = n_clusters, temperature, cosine, seed
        self.register_buffer("collab", collab.float())  # (N, c)
        self.register_buffer("has_collab", collab.abs().sum(dim=1) > 0)  # (N,)
        c_dim = collab.shape[1]
        self.project = nn.Identity() if c_dim == e_dim else nn.Linear(c_dim, e_dim, bias=False)  # (c) -> (e)
        self.clusters: list[torch.Tensor] = []  # per level (K_l,), set by recluster()
        self.generator = torch.Generator().manual_seed(seed)

    def recluster(self, rq: ResidualQuantizer) -> None:
        """Cluster every level's codebook afresh (LETTER: once per epoch); before the k-means start
        of the codebooks (the first batch) there is nothing to cluster yet."""
        if self.diversity_weight > 0 and all(bool(vq.initted) for vq in rq.levels):
            self.clusters = [code_clusters(vq.codebook.weight, self.n_clusters, self.seed) for vq in rq.levels]

    def forward(self, z_q: torch.Tensor, items: torch.Tensor, codes: torch.Tensor,
                rq: ResidualQuantizer) -> tuple[torch.Tensor, dict[str, float]]:
        """z_q (B, e) quantised latents of items (B,) with codes (B, L) -> (weighted loss (), the
        unweighted parts {"align": ..., "diversity": ...})."""
        total, parts = z_q.new_zeros(()), {}
        if self.align_weight > 0:
            keep = self.has_collab[items]  # (B,)
            if keep.sum() >= 2:
                align = alignment_loss(z_q[keep], self.project(self.collab[items[keep]]), self.temperature,
                                       self.cosine)
                total = total + self.align_weight * align
                parts["align"] = align.item()
        if self.diversity_weight > 0:
            if not self.clusters:
                self.recluster(rq)
            levels = [diversity_loss(vq.codebook.weight, codes[:, lvl].to(vq.codebook.weight.device),
                                     self.clusters[lvl], self.generator)
                      for lvl, vq in enumerate(rq.levels)]
            diversity = torch.stack(levels).mean()  # LETTER weighs it inside each level's loss, then averages
            total = total + self.diversity_weight * diversity
            parts["diversity"] = diversity.item()
        return total, parts
