"""RQ-VAE training loop: AdamW, collision-rate evaluation every ``eval_step`` epochs, and the
best-loss / best-collision-rate checkpoints (model state + args), written atomically."""
from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from index.codes import code_stats, format_stats  # noqa: E402
from index.models.rqvae import RQVAE  # noqa: E402
from utils import DataError, atomic_path  # noqa: E402

BEST_LOSS_CKPT = "best_loss_model.pth"
BEST_COLLISION_CKPT = "best_collision_model.pth"


def build_model(in_dim: int, args: dict) -> RQVAE:
    return RQVAE(in_dim=in_dim, num_emb_list=args["num_emb_list"], e_dim=args["e_dim"], layers=args["layers"],
                 dropout_prob=args["dropout_prob"], bn=args["bn"], quant_loss_weight=args["quant_loss_weight"],
                 beta=args["beta"], kmeans_init=args["kmeans_init"], kmeans_iters=args["kmeans_iters"],
                 sk_epsilons=args["sk_epsilons"], sk_iters=args["sk_iters"])


def save_checkpoint(path: str | os.PathLike, model: RQVAE, args: dict, **info) -> None:
    state = {"args": args, "in_dim": model.in_dim, "state_dict": model.state_dict(), **info}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[RQVAE, dict]:
    """(model in eval mode on device, the checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: RQ-VAE checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = build_model(ckpt["in_dim"], ckpt["args"])
        model.load_state_dict(ckpt["state_dict"])
    except (pickle.UnpicklingError, KeyError, RuntimeError, TypeError, ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not an RQ-VAE checkpoint written by index/main.py ({type(e).__name__})") from e
    return model.to(device).eval(), ckpt


@torch.no_grad()
def encode_all(model: RQVAE, embeddings: torch.Tensor, batch_size: int = 4096, use_sk: bool = False) -> np.ndarray:
    """Codes (N, L) of every item, without Sinkhorn unless asked."""
    was_training = model.training
    model.eval()
    codes = torch.cat([model.get_indices(b, use_sk=use_sk) for b in embeddings.split(batch_size)])
    model.train(was_training)
    return codes.cpu().numpy()


class Trainer:
    def __init__(self, model: RQVAE, args: argparse.Namespace, device: torch.device):
        self.model, self.args, self.device = model.to(device), args, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        self.ckpt_dir = Path(args.ckpt_dir)
        self.best_loss = math.inf
        self.best_collision = (math.inf, math.inf)  # (collision rate, loss): ties go to the lower loss
        self.epoch_seconds: list[float] = []

    def train_epoch(self, embeddings: torch.Tensor) -> tuple[float, float]:
        """One pass in shuffled batches; (mean total loss, mean reconstruction loss)."""
        self.model.train()
        total, recon, n = 0.0, 0.0, 0
        for idx in torch.randperm(len(embeddings), device=embeddings.device).split(self.args.batch_size):
            x = embeddings[idx]
            out, quant_loss, _ = self.model(x, use_sk=True)
            loss, recon_loss = self.model.compute_loss(out, quant_loss, x)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"RQ-VAE loss became {loss.item()}; try a lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, recon, n = total + loss.item() * len(x), recon + recon_loss.item() * len(x), n + len(x)
        return total / n, recon / n

    def evaluate(self, embeddings: torch.Tensor) -> dict:
        return code_stats(encode_all(self.model, embeddings), self.args.num_emb_list)

    def fit(self, embeddings: torch.Tensor) -> dict:
        """Train for args.epochs; return the best figures and checkpoint paths."""
        args, cfg = self.args, vars(self.args)
        embeddings = embeddings.to(self.device)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(range(args.epochs), desc="RQ-VAE", unit="epoch", dynamic_ncols=True)
        for epoch in bar:
            start = time.perf_counter()
            loss, recon = self.train_epoch(embeddings)
            self.epoch_seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.4f}", recon=f"{recon:.4f}")
            if (epoch + 1) % args.eval_step == 0 or epoch + 1 == args.epochs:
                stats = self.evaluate(embeddings)
                info = {"epoch": epoch + 1, "loss": loss, "recon_loss": recon, "collision_rate": stats["collision_rate"]}
                if loss < self.best_loss:
                    self.best_loss = loss
                    save_checkpoint(self.ckpt_dir / BEST_LOSS_CKPT, self.model, cfg, **info)
                if (stats["collision_rate"], loss) < self.best_collision:
                    self.best_collision = (stats["collision_rate"], loss)
                    save_checkpoint(self.ckpt_dir / BEST_COLLISION_CKPT, self.model, cfg, **info)
                tqdm.write(f"epoch {epoch + 1}: loss {loss:.4f} recon {recon:.4f}; "
                           f"{format_stats(stats, args.num_emb_list)}")
        return {
            "best_loss": self.best_loss,
            "best_collision_rate": self.best_collision[0],
            "seconds_per_epoch": float(np.median(self.epoch_seconds)) if self.epoch_seconds else 0.0,
            "best_loss_ckpt": str(self.ckpt_dir / BEST_LOSS_CKPT),
            "best_collision_ckpt": str(self.ckpt_dir / BEST_COLLISION_CKPT),
        }
