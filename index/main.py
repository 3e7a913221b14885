"""Train the RQ-VAE item indexer on item text embeddings.

    python index/main.py --data_path data/ml-100k/ml-100k.emb-smollm2-td.npy --ckpt_dir ckpt/index/ml-100k \
        --num_emb_list 256 256 256 256 --sk_epsilons 0 0 0 0.003 --epochs 10000

A collaborative index (LETTER's regularisers, index/models/collab.py) adds --collab_emb, one row per
item in item-id order (item_vectors.py --output, or python -m baselines sasrec --save_item_emb):

    python index/main.py --data_path ... --collab_emb data/ml-100k/ml-100k.collab-ppmi.npy \
        --align_weight 0.01 --diversity_weight 1e-4

Writes <ckpt_dir>/best_loss_model.pth and <ckpt_dir>/best_collision_model.pth (and, with
--save_limit N, the N latest epoch_<E>_model.pth of the evaluation epochs).

The original's command-line flags are accepted. Unlike there, --bn reads its value: `--bn false`
turns batchnorm off, `--bn true` or a bare `--bn` turns it on (the original's `--bn False` meant on).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # faster and steadier on small CPUs; override freely

import torch  # noqa: E402

from index.embedding_data import EmbDataset, load_embeddings  # noqa: E402
from index.models.collab import DIVERSITY_CLUSTERS, CollabRegularisers  # noqa: E402
from index.models.rqvae import RECON_LOSSES  # noqa: E402
from index.trainer import LR_SCHEDULERS, OPTIMIZERS, Trainer, build_model  # noqa: E402
from utils import DataError, exit_on_data_error, get_device, set_seed  # noqa: E402


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return get_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
    return device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the RQ-VAE item indexer.")
    p.add_argument("--data_path", required=True, help="item embeddings .npy [items, dim]")
    p.add_argument("--ckpt_dir", default="./ckpt/index", help="where the best checkpoints go")
    p.add_argument("--num_emb_list", type=int, nargs="+", default=[256, 256, 256, 256], help="codes per level")
    p.add_argument("--e_dim", type=int, default=32, help="code dimension")
    p.add_argument("--layers", type=int, nargs="+", default=[2048, 1024, 512, 256, 128, 64], help="encoder hidden sizes")
    p.add_argument("--sk_epsilons", type=float, nargs="+", default=[0.0, 0.0, 0.0, 0.003],
                   help="Sinkhorn epsilon per level (0 = nearest code)")
    p.add_argument("--sk_iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--learner", default="AdamW", type=str.lower, choices=list(OPTIMIZERS), metavar="LEARNER",
                   help="optimiser: AdamW, Adam, SGD, Adagrad or RMSprop (any case)")
    p.add_argument("--lr_scheduler_type", default="constant", type=str.lower, choices=LR_SCHEDULERS,
                   metavar="TYPE", help=f"schedule after the warm-up, stepped per batch: {', '.join(LR_SCHEDULERS)} "
                                        "(linear decays to 0 at the last step)")
    p.add_argument("--warmup_epochs", type=int, default=50, help="linear learning-rate warm-up, in epochs")
    p.add_argument("--epochs", type=int, default=10000)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--num_workers", type=int, default=0,
                   help="accepted for the original's command line; batches are slices of the in-memory "
                        "embedding tensor, so no loader workers are used")
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--dropout_prob", type=float, default=0.0)
    p.add_argument("--bn", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="batchnorm in the MLPs: true/false (a bare --bn means true)")
    p.add_argument("--loss_type", default="mse", type=str.lower, choices=list(RECON_LOSSES),
                   help="reconstruction loss: mse or l1")
    p.add_argument("--beta", type=float, default=0.25, help="commitment loss weight")
    p.add_argument("--quant_loss_weight", type=float, default=1.0)
    p.add_argument("--kmeans_init", type=str2bool, nargs="?", const=True, default=True,
                   help="initialise codebooks by k-means on the first batch (true/false)")
    p.add_argument("--kmeans_iters", type=int, default=100)
    p.add_argument("--eval_step", type=int, default=50, help="evaluate the collision rate every N epochs")
    p.add_argument("--save_limit", type=int, default=0,
                   help="also keep the N latest epoch checkpoints (epoch_<E>_model.pth, one per evaluation); "
                        "0 keeps only the best-loss and best-collision ones")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=2023)
    collab = p.add_argument_group("collaborative index (LETTER's regularisers; only with --collab_emb)")
    collab.add_argument("--collab_emb", default=None,
                        help="collaborative item embeddings .npy [items, c], row i = item i (zero rows: no signal)")
    collab.add_argument("--align_weight", type=float, default=0.01,
                        help="weight of the InfoNCE alignment of quantised latents with --collab_emb (LETTER: 0.01)")
    collab.add_argument("--align_similarity", default="dot", choices=["dot", "cosine"],
                        help="scores of the alignment: inner products (LETTER) or cosines")
    collab.add_argument("--align_temperature", type=float, default=1.0,
                        help="softmax temperature of the alignment (LETTER: 1)")
    collab.add_argument("--diversity_weight", type=float, default=1e-4,
                        help="weight of the code-diversity loss (LETTER: 1e-4)")
    collab.add_argument("--diversity_clusters", type=int, default=DIVERSITY_CLUSTERS,
                        help="clusters of each codebook the diversity loss draws positives from")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(args.sk_epsilons) != len(args.num_emb_list):
        p.error(f"--sk_epsilons has {len(args.sk_epsilons)} values but --num_emb_list has {len(args.num_emb_list)} levels")
    if any(k < 1 for k in args.num_emb_list) or args.e_dim < 1 or any(d < 1 for d in args.layers):
        p.error("--num_emb_list, --e_dim and --layers must be positive")
    if any(e < 0 for e in args.sk_epsilons):
        p.error("--sk_epsilons must be >= 0")
    for flag in ("epochs", "batch_size", "eval_step", "sk_iters", "kmeans_iters"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    for flag in ("warmup_epochs", "num_workers", "save_limit"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0")
    if args.lr <= 0 or args.weight_decay < 0:
        p.error("--lr must be > 0 and --weight_decay >= 0")
    if args.align_weight < 0 or args.diversity_weight < 0 or args.diversity_clusters < 1 or args.align_temperature <= 0:
        p.error("--align_weight and --diversity_weight must be >= 0, --align_temperature > 0 and "
                "--diversity_clusters at least 1")


def build_regularisers(args: argparse.Namespace, n_items: int) -> CollabRegularisers | None:
    """LETTER's regularisers over --collab_emb, or None (a text-only index, as the original's)."""
    if not args.collab_emb:
        return None
    collab = load_embeddings(args.collab_emb)
    if len(collab) != n_items:
        raise DataError(f"--collab_emb {args.collab_emb}: {len(collab)} rows, expected one per item ({n_items}) "
                        "in item-id order, as the rows of --data_path")
    return CollabRegularisers(torch.from_numpy(collab), args.e_dim, args.align_weight, args.diversity_weight,
                              args.diversity_clusters, args.align_temperature, args.align_similarity == "cosine",
                              seed=args.seed)


def bn_turned_off(args: argparse.Namespace, argv: list[str]) -> bool:
    """Whether the command line itself says --bn false (not the default): the original's own command did."""
    return not args.bn and any(a == "--bn" or a.startswith("--bn=") for a in argv)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    check_args(parser, args)
    if bn_turned_off(args, argv):
        print("note: --bn false trains without BatchNorm; the original code ran BatchNorm whatever --bn said (it "
              "parsed --bn with type=bool), so pass --bn true to reproduce its runs", file=sys.stderr)
    set_seed(args.seed)
    device = resolve_device(args.device)
    data = EmbDataset(args.data_path)
    print(f"{len(data)} items of dimension {data.dim} from {args.data_path}; training on {device}")
    model = build_model(data.dim, vars(args))
    regularisers = build_regularisers(args, len(data))
    if regularisers is not None:
        print(f"collaborative index: {int(regularisers.has_collab.sum())} of {len(data)} items have a collaborative "
              f"embedding ({regularisers.collab.shape[1]}-d) from {args.collab_emb}; align weight {args.align_weight}, "
              f"diversity weight {args.diversity_weight}")
    result = Trainer(model, args, device, regularisers).fit(data.embeddings)
    print(f"best loss {result['best_loss']:.4f} -> {result['best_loss_ckpt']}")
    print(f"best collision rate {result['best_collision_rate']:.4f} -> {result['best_collision_ckpt']}")
    return result


if __name__ == "__main__":
    with exit_on_data_error():
        main()
