"""RQ-VAE training loop: the chosen optimiser (AdamW by default) with a per-step learning-rate
schedule (linear warm-up, then constant, linear decay, cosine, ...) and gradients clipped to norm
1.0; collision-rate evaluation every ``eval_step`` epochs; the best-loss / best-collision-rate
checkpoints (model state + args), written atomically, plus optionally the latest epoch checkpoints.
With collaborative regularisers (index/models/collab.py) their weighted losses join the total."""
from __future__ import annotations

import argparse
import math
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from index.codes import code_stats, format_stats
from index.models.collab import CollabRegularisers
from index.models.rqvae import RQVAE
from utils import DataError, atomic_path

BEST_LOSS_CKPT = "best_loss_model.pth"
BEST_COLLISION_CKPT = "best_collision_model.pth"
EPOCH_CKPT = "epoch_{epoch}_model.pth"  # kept only with --save_limit > 0
MAX_GRAD_NORM = 1.0

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
              "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}
# transformers.get_scheduler names that need nothing beyond warm-up and total steps. "constant"
# means constant after the warm-up, as the warm-up flag applies to every schedule.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


def build_model(in_dim: int, args: dict) -> RQVAE:
    return RQVAE(in_dim=in_dim, num_emb_list=args["num_emb_list"], e_dim=args["e_dim"], layers=args["layers"],
                 dropout_prob=args["dropout_prob"], bn=args["bn"], quant_loss_weight=args["quant_loss_weight"],
                 beta=args["beta"], kmeans_init=args["kmeans_init"], kmeans_iters=args["kmeans_iters"],
                 sk_epsilons=args["sk_epsilons"], sk_iters=args["sk_iters"],
                 loss_type=args.get("loss_type", "mse"))  # checkpoints older than --loss_type: mse


def build_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """--learner (case-insensitive) with --lr and --weight_decay."""
    name = args.learner.lower()
    if name not in OPTIMIZERS:
        raise DataError(f"--learner {args.learner}: expected one of {', '.join(OPTIMIZERS)} (any case)")
    return OPTIMIZERS[name](params, lr=args.lr, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int):
    """Per-step schedule: linear warm-up over --warmup_epochs epochs, then --lr_scheduler_type
    until the last step of the last epoch (where "linear" reaches 0)."""
    from transformers import get_scheduler

    name = args.lr_scheduler_type.lower()
    if name not in LR_SCHEDULERS:
        raise DataError(f"--lr_scheduler_type {args.lr_scheduler_type}: expected one of {', '.join(LR_SCHEDULERS)}")
    name = "constant_with_warmup" if name == "constant" else name  # transformers' "constant" skips the warm-up
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_epochs * steps_per_epoch,
                         num_training_steps=args.epochs * steps_per_epoch)


def save_checkpoint(path: str | os.PathLike, model: RQVAE, args: dict, **info) -> None:
    state = {"args": args, "in_dim": model.in_dim, "state_dict": model.state_dict(), **info}
    with atomic_path(path, what="the RQ-VAE checkpoint") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[RQVAE, dict]:
    """(model in eval mode on device, the checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: RQ-VAE checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged files fail in many ways (EOFError, OSError, KeyError, ...)
        raise DataError(unreadable_checkpoint_message(path, e)) from e
    try:
        model = build_model(ckpt["in_dim"], ckpt["args"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not an RQ-VAE checkpoint written by index/main.py ({describe(e)})") from e
    return model.to(device).eval(), ckpt


def unreadable_checkpoint_message(path: Path, error: Exception) -> str:
    """Why torch.load failed, in words: torch.save writes a zip archive whose directory is at the
    end, so a file that starts like one but has no readable directory was cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return (f"{path}: the checkpoint file is truncated or corrupt: it starts as a torch.save archive but its end "
                f"is missing ({size} bytes); copy it again or retrain")
    return (f"{path}: the checkpoint file is truncated or corrupt, or not a PyTorch checkpoint "
            f"({size} bytes; torch.load: {describe(error)}); expected a .pth written by index/main.py")


def describe(error: Exception) -> str:
    """'KeyError: first line of the message', short enough for a one-line error."""
    text = str(error).strip()
    return type(error).__name__ + (f": {text.splitlines()[0][:200]}" if text else "")


@torch.no_grad()
def encode_all(model: RQVAE, embeddings: torch.Tensor, batch_size: int = 4096, use_sk: bool = False) -> np.ndarray:
    """Codes (N, L) of every item, without Sinkhorn unless asked."""
    was_training = model.training
    model.eval()
    codes = torch.cat([model.get_indices(b, use_sk=use_sk) for b in embeddings.split(batch_size)])
    model.train(was_training)
    return codes.cpu().numpy()


class Trainer:
    def __init__(self, model: RQVAE, args: argparse.Namespace, device: torch.device,
                 regularisers: CollabRegularisers | None = None):
        self.model, self.args, self.device = model.to(device), args, device
        self.regularisers = regularisers.to(device) if regularisers is not None else None
        params = list(model.parameters()) + (list(regularisers.parameters()) if regularisers is not None else [])
        self.optimizer = build_optimizer(params, args)
        self.scheduler = None  # built in fit(), once the number of steps per epoch is known
        self.ckpt_dir = Path(args.ckpt_dir)
        self.best_loss = math.inf
        self.best_collision = (math.inf, math.inf)  # (collision rate, loss): ties go to the lower loss
        self.epoch_seconds: list[float] = []
        self.history: list[dict] = []  # one entry per evaluation: epoch, loss, recon_loss, code stats
        self.saved_epochs: list[Path] = []
        self.last_parts: dict[str, float] = {}  # the regularisers' mean unweighted losses in the last epoch

    def train_epoch(self, embeddings: torch.Tensor) -> tuple[float, float]:
        """One pass in shuffled batches; (mean total loss, mean reconstruction loss). The
        regularisers' unweighted losses of the epoch are kept in self.last_parts."""
        self.model.train()
        total, recon, n = 0.0, 0.0, 0
        parts_sum: dict[str, float] = {}
        if self.regularisers is not None:
            self.regularisers.recluster(self.model.rq)
        # The embeddings sit in memory as one tensor, so batches are slices of it (no DataLoader).
        for idx in torch.randperm(len(embeddings), device=embeddings.device).split(self.args.batch_size):
            x = embeddings[idx]
            z_q, quant_loss, codes = self.model.quantize(x, use_sk=True)
            loss, recon_loss = self.model.compute_loss(self.model.decoder(z_q), quant_loss, x)
            if self.regularisers is not None:
                extra, parts = self.regularisers(z_q, idx, codes, self.model.rq)
                loss = loss + extra
                for name, value in parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + value * len(x)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"RQ-VAE loss became {loss.item()}; try a lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            total, recon, n = total + loss.item() * len(x), recon + recon_loss.item() * len(x), n + len(x)
        self.last_parts = {name: value / n for name, value in parts_sum.items()}
        return total / n, recon / n

    def save_epoch(self, epoch: int, cfg: dict, info: dict) -> None:
        """Keep the --save_limit most recent epoch checkpoints (0: none)."""
        if self.args.save_limit <= 0:
            return
        path = self.ckpt_dir / EPOCH_CKPT.format(epoch=epoch)
        save_checkpoint(path, self.model, cfg, **info)
        self.saved_epochs.append(path)
        while len(self.saved_epochs) > self.args.save_limit:
            self.saved_epochs.pop(0).unlink(missing_ok=True)

    def evaluate(self, embeddings: torch.Tensor) -> dict:
        return code_stats(encode_all(self.model, embeddings), self.args.num_emb_list)

    def fit(self, embeddings: torch.Tensor) -> dict:
        """Train for args.epochs; return the best figures and checkpoint paths."""
        args, cfg = self.args, vars(self.args)
        embeddings = embeddings.to(self.device)
        self.scheduler = build_scheduler(self.optimizer, args, math.ceil(len(embeddings) / args.batch_size))
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(range(args.epochs), desc="RQ-VAE", unit="epoch", dynamic_ncols=True)
        for epoch in bar:
            start = time.perf_counter()
            loss, recon = self.train_epoch(embeddings)
            self.epoch_seconds.append(time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.4f}", recon=f"{recon:.4f}",
                            **{name: f"{value:.4f}" for name, value in self.last_parts.items()})
            if (epoch + 1) % args.eval_step == 0 or epoch + 1 == args.epochs:
                stats = self.evaluate(embeddings)
                info = {"epoch": epoch + 1, "loss": loss, "recon_loss": recon,
                        "collision_rate": stats["collision_rate"],
                        **{f"{name}_loss": value for name, value in self.last_parts.items()}}
                self.history.append({**info, "used_codes": stats["used_codes"]})
                if loss < self.best_loss:
                    self.best_loss = loss
                    save_checkpoint(self.ckpt_dir / BEST_LOSS_CKPT, self.model, cfg, **info)
                if (stats["collision_rate"], loss) < self.best_collision:
                    self.best_collision = (stats["collision_rate"], loss)
                    save_checkpoint(self.ckpt_dir / BEST_COLLISION_CKPT, self.model, cfg, **info)
                self.save_epoch(epoch + 1, cfg, info)
                extra = "".join(f" {name} {value:.4f}" for name, value in self.last_parts.items())
                tqdm.write(f"epoch {epoch + 1}: loss {loss:.4f} recon {recon:.4f}{extra}; "
                           f"{format_stats(stats, args.num_emb_list)}")
        return {
            "best_loss": self.best_loss,
            "best_collision_rate": self.best_collision[0],
            "seconds_per_epoch": float(np.median(self.epoch_seconds)) if self.epoch_seconds else 0.0,
            "best_loss_ckpt": str(self.ckpt_dir / BEST_LOSS_CKPT),
            "best_collision_ckpt": str(self.ckpt_dir / BEST_COLLISION_CKPT),
            "history": self.history,
        }
