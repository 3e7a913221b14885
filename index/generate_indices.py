"""Turn a trained RQ-VAE into the item index file <D>.index.json, with zero collisions.

    python index/generate_indices.py --ckpt_path ckpt/index/ml-100k/best_collision_model.pth \
        --data_path data/ml-100k/ml-100k.emb-smollm2-td.npy --output_file data/ml-100k/ml-100k.index.json

Without --data_path, the embeddings the checkpoint was trained on (its saved --data_path) are used.

1. Every item takes its nearest code at every level (no Sinkhorn).
2. For up to --max_rounds rounds, each group of items sharing a full code is re-assigned on the
   last level with Sinkhorn (uniform mapping), which spreads the group over the codes.
3. Groups the rounds could not separate (identical embeddings, for example) are finished
   deterministically: within each prefix, the colliding items get distinct last-level codes
   not used by the prefix's other items, nearest first, as an optimal assignment.
A prefix holding more items than the last level has codes cannot be separated: that is an error.
Also writes a plot of code usage per level (default <output without .json>.codes.png).
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset_files import LEVEL_PREFIXES, index_token  # noqa: E402
from index.codes import code_stats, code_tokens, format_stats  # noqa: E402
from index.embedding_data import load_embeddings  # noqa: E402
from index.main import resolve_device  # noqa: E402
from index.models.layers import sinkhorn_assign  # noqa: E402
from index.models.rqvae import RQVAE  # noqa: E402
from index.trainer import encode_all, load_checkpoint  # noqa: E402
from utils import DataError, atomic_path, exit_on_data_error, write_json_atomic  # noqa: E402

DEFAULT_SK_EPSILON = 0.003  # the paper's last-level epsilon, used when the checkpoint has none


def colliding_groups(codes: np.ndarray) -> list[np.ndarray]:
    """Row indices of each set of >= 2 items sharing a full code."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(map(tuple, codes.tolist())):
        groups[row].append(i)
    return [np.array(g) for g in groups.values() if len(g) > 1]


def check_prefix_capacity(codes: np.ndarray, n_last: int) -> None:
    prefixes: dict[tuple, int] = defaultdict(int)
    for row in map(tuple, codes[:, :-1].tolist()):
        prefixes[row] += 1
    prefix, count = max(prefixes.items(), key=lambda kv: kv[1])
    if count > n_last:
        spelled = "".join(index_token(lvl, c) for lvl, c in enumerate(prefix))
        raise DataError(
            f"{count} items share the prefix {spelled or '(none)'} but the last level has only {n_last} codes, "
            "so they cannot all get distinct indices. An undertrained or collapsed RQ-VAE does this (see the collision "
            "rate and code usage it printed while training): train longer, or with more codes or levels (--num_emb_list)")


def finite_costs(cost: np.ndarray) -> np.ndarray:
    """cost with NaN/inf replaced by a finite value above every finite entry (all 0 if none is finite).

    linear_sum_assignment refuses non-finite costs ("cost matrix is infeasible"); overflowing
    distances make those, and such entries should simply be the last choice.
    """
    cost = np.asarray(cost, dtype=np.float64)
    finite = np.isfinite(cost)
    if finite.all():
        return cost
    worst = float(np.abs(cost[finite]).max()) if finite.any() else 0.0
    return np.where(finite, cost, 2 * worst + 1)


def finish_collisions(codes: np.ndarray, last_dist: np.ndarray) -> int:
    """Give colliding items distinct free last-level codes within their prefix (optimal assignment,
    least total distance; non-finite distances count as the farthest). Edits codes in place;
    returns the number of items moved."""
    members: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(map(tuple, codes[:, :-1].tolist())):
        members[row].append(i)
    colliding = {int(i) for g in colliding_groups(codes) for i in g}
    moved = 0
    for prefix in sorted({tuple(codes[i, :-1].tolist()) for i in colliding}):
        items = np.array(members[prefix])
        stuck = np.array([i for i in items if i in colliding])
        taken = {int(codes[i, -1]) for i in items if i not in colliding}
        free = np.array([c for c in range(last_dist.shape[1]) if c not in taken])
        cost = finite_costs(last_dist[np.ix_(stuck, free)])
        rows, cols = linear_sum_assignment(cost)  # each stuck item gets a free code
        new = free[cols]
        moved += int((codes[stuck[rows], -1] != new).sum())
        codes[stuck[rows], -1] = new
    return moved


@torch.no_grad()
def generate_codes(model: RQVAE, embeddings: torch.Tensor, max_rounds: int = 20) -> tuple[np.ndarray, dict]:
    """Collision-free codes (N, L) and a report of the figures before and after."""
    model.eval()
    num_emb_list = model.rq.num_emb_list
    codes = encode_all(model, embeddings, use_sk=False)
    report = {"before": code_stats(codes, num_emb_list)}
    check_prefix_capacity(codes, num_emb_list[-1])

    last = model.rq.levels[-1]
    epsilon = last.sk_epsilon if last.sk_epsilon > 0 else DEFAULT_SK_EPSILON
    last_inputs = torch.cat([model.rq.last_level_inputs(model.encode(b)) for b in embeddings.split(4096)])
    rounds = 0
    for _ in tqdm(range(max_rounds), desc="Sinkhorn rounds", leave=False):
        groups = colliding_groups(codes)
        if not groups:
            break
        rounds += 1
        previous = codes[:, -1].copy()
        for g in groups:  # only the colliding items move; the others keep their codes
            group_dist = last.distances(last_inputs[torch.as_tensor(g, device=last_inputs.device)])
            codes[g, -1] = sinkhorn_assign(group_dist, epsilon, last.sk_iters).cpu().numpy()
        if (codes[:, -1] == previous).all():  # deterministic: every further round would repeat this one
            break
    report["rounds"] = rounds
    report["after_rounds"] = code_stats(codes, num_emb_list)

    last_dist = last.distances(last_inputs).cpu().numpy()  # (N, K_last)
    report["finished_items"] = finish_collisions(codes, last_dist)
    report["after"] = code_stats(codes, num_emb_list)
    if report["after"]["collision_rate"] != 0:  # cannot happen once the capacity check passed
        raise RuntimeError(f"index still has collisions: {format_stats(report['after'], num_emb_list)}")
    return codes, report


def plot_usage(codes: np.ndarray, num_emb_list: list[int], path: str | os.PathLike) -> None:
    """Bar chart per level: how many items take each code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_levels = len(num_emb_list)
    fig, axes = plt.subplots(n_levels, 1, figsize=(10, 2.2 * n_levels), squeeze=False)
    for lvl, (ax, k) in enumerate(zip(axes[:, 0], num_emb_list)):
        counts = np.bincount(codes[:, lvl], minlength=k)
        ax.bar(np.arange(k), counts, width=1.0, color="tab:blue")
        ax.set_title(f"level {LEVEL_PREFIXES[lvl]}: {int((counts > 0).sum())}/{k} codes used, "
                     f"at most {int(counts.max())} items per code", fontsize=9)
        ax.set_xlim(-0.5, k - 0.5)
        ax.set_ylabel("items")
    axes[-1, 0].set_xlabel("code")
    fig.tight_layout()
    with atomic_path(path, what="the code-usage plot") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def default_plot_path(output_file: str | os.PathLike) -> Path:
    out = Path(output_file)
    stem = out.name[:-len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(f"{stem}.codes.png")


def embedding_path_of(ckpt: dict, ckpt_path: str | os.PathLike) -> str:
    """The embeddings a checkpoint was trained on (its saved --data_path), which must still exist."""
    saved = (ckpt.get("args") or {}).get("data_path")
    if not saved:
        raise DataError(f"no --data_path given and the checkpoint {ckpt_path} does not record its embeddings: "
                        "pass --data_path <item embeddings .npy>")
    if not Path(saved).is_file():
        raise DataError(f"no --data_path given and the embeddings the checkpoint {ckpt_path} was trained on, "
                        f"{saved}, do not exist (from {Path.cwd()}): pass --data_path <item embeddings .npy>")
    print(f"embeddings: {saved} (the checkpoint's training data)")
    return str(saved)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write the collision-free item index of a trained RQ-VAE.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by index/main.py")
    p.add_argument("--data_path", default=None,
                   help="item embeddings .npy [items, dim] (default: the checkpoint's training data_path)")
    p.add_argument("--output_file", required=True, help="index JSON to write, e.g. data/<D>/<D>.index.json")
    p.add_argument("--max_rounds", type=int, default=20, help="Sinkhorn re-assignment rounds before the final assignment")
    p.add_argument("--plot", default=None, help="PNG of code usage per level (default <output>.codes.png)")
    p.add_argument("--no_plot", action="store_true", help="do not write the plot")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.max_rounds < 0:
        raise SystemExit("--max_rounds must be >= 0")
    start = time.perf_counter()
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.ckpt_path, device)
    args.data_path = args.data_path or embedding_path_of(ckpt, args.ckpt_path)
    embeddings = load_embeddings(args.data_path)
    if embeddings.shape[1] != model.in_dim:
        raise DataError(f"{args.data_path}: embeddings have dimension {embeddings.shape[1]} but the checkpoint "
                        f"{args.ckpt_path} was trained on dimension {model.in_dim}")
    num_emb_list = model.rq.num_emb_list
    codes, report = generate_codes(model, torch.from_numpy(embeddings).to(device), args.max_rounds)

    write_json_atomic(code_tokens(codes), args.output_file, what="the index file")
    plot = None if args.no_plot else Path(args.plot) if args.plot else default_plot_path(args.output_file)
    if plot is not None:
        plot_usage(codes, num_emb_list, plot)
    report["seconds"] = time.perf_counter() - start

    print(f"checkpoint {args.ckpt_path} (epoch {ckpt.get('epoch')}), {len(codes)} items")
    print(f"before:               {format_stats(report['before'], num_emb_list)}")
    print(f"after {report['rounds']} Sinkhorn rounds: collision rate {report['after_rounds']['collision_rate']:.4f}")
    print(f"final assignment moved {report['finished_items']} items")
    print(f"after:                {format_stats(report['after'], num_emb_list)}")
    print(f"wrote {args.output_file}" + (f" and {plot}" if plot else "") + f" in {report['seconds']:.1f}s")
    return report


if __name__ == "__main__":
    with exit_on_data_error():
        main()
