"""What every learned baseline shares: flags, the training loop with early stopping on validation
NDCG@10, full-ranking evaluation, several seeds, and the results file (baseline.py's format).

A family module (sasrec, gru4rec, tiger) gives ``NAME``, ``DEFAULTS`` (its flag defaults) and
``build(args, split) -> model``; the model has ``loss(his, tgt) -> scalar`` and
``rank(his, tgt) -> (ranks [B], top [B, 10])``: 1-based ranks of the targets (0 = not ranked) and
each user's top 10 items (for the personalisation figures). ``his`` is ``[B, L]``
item + 1, right-padded with 0 (see split.py).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
from types import ModuleType

import torch
from torch import nn
from tqdm import tqdm

from arguments import DEFAULT_METRICS
from baselines.split import Split, load_split
from item_vectors import save_item_matrix
from metrics import (aggregate, format_table, mean_and_stderr, metric_value, parse_metrics, per_user_values,
                     personalisation)
from utils import DataError, check_writable, cpu_autocast_bf16, exit_on_data_error, set_seed, write_results

# flags whose default depends on the family (None on the command line = the family's DEFAULTS)
FAMILY_FLAGS = ("epochs", "patience", "hidden_size", "inner_size", "num_layers", "num_heads", "dropout", "lr",
                "eval_batch_size", "train_stride", "cpu_bf16")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="dataset name: reads <data_path>/<D>/<D>.inter.json")
    g.add_argument("--data_path", default="./data", help="folder holding <dataset>/")
    g.add_argument("--index_file", default=".index.json", help="TIGER only: <D>/<D><index_file>")
    g.add_argument("--max_his_len", type=int, default=20, help="history items kept (the last ones), as LC-Rec")
    g.add_argument("--sample_num", type=int, default=-1,
                   help="test users (-1 = all); the same seeded subset as test.py with the same --seed")
    g.add_argument("--valid_sample_num", type=int, default=0, help="validation users for early stopping (0 = all)")
    g = p.add_argument_group("output")
    g.add_argument("--results_file", default="results/{model}.json", help="results JSON ({model} = family name)")
    g.add_argument("--metrics", default=DEFAULT_METRICS, help="comma-separated hit@K / ndcg@K")
    g.add_argument("--exclude_history", action="store_true",
                   help="NOT this repository's protocol (nor RecBole's for sequential models): score each test "
                        "user's earlier items -inf (SASRec, GRU4Rec; test ranking only, early stopping unchanged)")
    g.add_argument("--save_item_emb", default=None, metavar="PATH",
                   help="SASRec, GRU4Rec: save the first run's trained item embeddings as an .npy [items, hidden], "
                        "row i = item i ({model} = family name), e.g. for index/main.py --collab_emb")
    g = p.add_argument_group("training")
    g.add_argument("--seed", type=int, default=42, help="first run's seed; also picks the --sample_num test users")
    g.add_argument("--seeds", type=int, default=1, help="runs with seeds seed, seed+1, ...; mean and std reported")
    g.add_argument("--epochs", type=int, help="most epochs (one pass over the training examples each)")
    g.add_argument("--patience", type=int, help="stop after this many epochs without a better validation NDCG@10")
    g.add_argument("--max_train_minutes", type=float, default=0, help="also stop a run after this long (0 = no limit)")
    g.add_argument("--train_stride", type=int,
                   help="training windows end every S targets (1 = one row per example with its exact history; "
                        "0 or max_his_len = non-overlapping windows, a loss at every position); TIGER needs 1")
    g.add_argument("--batch_size", type=int, default=256, help="training rows per step")
    g.add_argument("--eval_batch_size", type=int, help="users per evaluation batch")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    g.add_argument("--cpu_bf16", choices=["auto", "on", "off"],
                   help="train and decode under bf16 autocast on a CPU (auto: where the CPU has native bf16); "
                        "TIGER's default is auto (about 1.5 times the examples a second on an avx512_bf16 CPU), "
                        "SASRec's and GRU4Rec's off (small models, their published runs are fp32)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = every core this process may use: a baseline runs alone, after "
                        "LC-Rec, while run.sh's OMP_NUM_THREADS=1 is meant for its two training processes)")
    g = p.add_argument_group("model (defaults depend on the family)")
    g.add_argument("--hidden_size", type=int, help="embedding / model width")
    g.add_argument("--inner_size", type=int, help="feed-forward width (SASRec, TIGER)")
    g.add_argument("--num_layers", type=int, help="blocks (SASRec), GRU layers, or encoder and decoder layers (TIGER)")
    g.add_argument("--num_heads", type=int, help="attention heads (SASRec, TIGER)")
    g.add_argument("--dropout", type=float, help="dropout probability")
    g.add_argument("--num_beams", type=int, default=20, help="TIGER: beams of the trie-constrained search")
    return p


def resolve_args(args: argparse.Namespace, family: ModuleType) -> argparse.Namespace:
    """A copy of ``args`` with the family's defaults filled in, checked."""
    args = copy.copy(args)
    stride_given = args.train_stride is not None
    for name in FAMILY_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, family.DEFAULTS[name])
    args.model = family.NAME
    if args.train_stride == 0:  # 0 = non-overlapping windows
        args.train_stride = args.max_his_len
    if not stride_given:  # a family's default stride fits any history length
        args.train_stride = min(args.train_stride, args.max_his_len)
    args.results_file = args.results_file.replace("{model}", family.NAME)
    if args.save_item_emb:
        args.save_item_emb = args.save_item_emb.replace("{model}", family.NAME)
    for flag, low in (("max_his_len", 1), ("seeds", 1), ("epochs", 1), ("patience", 1), ("batch_size", 1),
                      ("eval_batch_size", 1), ("hidden_size", 1), ("num_layers", 1), ("num_heads", 1),
                      ("num_beams", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise DataError(f"--{flag}: {getattr(args, flag)}; expected an integer >= {low}")
    if not 0 <= args.dropout < 1:
        raise DataError(f"--dropout: {args.dropout}; expected 0 <= p < 1")
    if args.lr <= 0 or args.max_train_minutes < 0 or args.valid_sample_num < 0 or args.threads < 0:
        raise DataError("--lr must be > 0 and --max_train_minutes, --valid_sample_num, --threads >= 0")
    args.metric_list = parse_metrics(args.metrics)
    return args


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_of(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as e:
        raise DataError(f"--device: {spec!r} is not a device ({e})") from e


# --------------------------------------------------------------------------- models that score every item
class ScoreAllItems(nn.Module):
    """Base of SASRec and GRU4Rec: causal states after every position score every item; full
    softmax cross-entropy and full ranking (no seen item removed)."""

    def encode(self, his: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, H] causal states; row i of ``item_weights()`` [n_items, H] scores item i."""
        raise NotImplementedError

    def item_weights(self) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, his: torch.Tensor) -> torch.Tensor:
        """[B, n_items] after each row's last real item."""
        return last_position(self.encode(his), his) @ self.item_weights().T

    def loss(self, his: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """his [B, L], tgt [B, L] (-100 = no loss): full softmax at every labelled position."""
        keep = tgt >= 0  # score only labelled positions: with --train_stride 1 that is one in max_his_len
        logits = self.encode(his)[keep] @ self.item_weights().T           # [labelled, I]
        return nn.functional.cross_entropy(logits, tgt[keep])

    def rank(self, his: torch.Tensor, tgt: torch.Tensor,
             exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``exclude`` [B, I]: items scored -inf (--exclude_history), so they rank below every other."""
        s = self.scores(his)                                   # [B, I]
        if exclude is not None:
            s = s.masked_fill(exclude, -math.inf)
        ranks = 1 + (s > s.gather(1, tgt[:, None])).sum(1)     # items scored strictly higher than the target
        return ranks, s.topk(min(10, s.shape[1]), dim=1).indices


def last_position(out: torch.Tensor, his: torch.Tensor) -> torch.Tensor:
    """out [B, L, H] of right-padded histories -> [B, H] at each row's last real item."""
    last = (his > 0).sum(1).clamp(min=1) - 1
    return out[torch.arange(out.shape[0], device=out.device), last]


# --------------------------------------------------------------------------- training and evaluation
@torch.no_grad()
def ranks_of(model: nn.Module, his: torch.Tensor, tgt: torch.Tensor, batch: int, device: torch.device,
             desc: str, autocast: bool = False,
             exclude: list[list[int]] | None = None) -> tuple[list[int], list[list[int]]]:
    """(target ranks, top-10 items) of every row; ``autocast``: under CPU bf16 autocast; ``exclude``:
    per row, item ids left out of its ranking (a ``ScoreAllItems`` model only)."""
    model.eval()
    ranks, tops = [], []
    for b in tqdm(range(0, len(tgt), batch), desc=desc, leave=False, mininterval=2):
        extra = {}
        if exclude is not None:
            rows = exclude[b:b + batch]
            mask = torch.zeros(len(rows), model.item_weights().shape[0], dtype=torch.bool)
            for row, items in enumerate(rows):
                mask[row, torch.as_tensor(items, dtype=torch.long)] = True
            extra["exclude"] = mask.to(device)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            r, top = model.rank(his[b:b + batch].to(device), tgt[b:b + batch].to(device), **extra)
        ranks, tops = ranks + r.tolist(), tops + [[i for i in row if i >= 0] for row in top.tolist()]
    return ranks, tops


def ndcg10(ranks: list[int]) -> float:
    return sum(metric_value("ndcg@10", r) for r in ranks) / len(ranks)


def fit(model: nn.Module, split: Split, args: argparse.Namespace, seed: int, device: torch.device) -> dict:
    """Train with early stopping; ``model`` ends with its best-validation weights."""
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    v_his, v_tgt = split.valid_his, split.valid_tgt
    if 0 < args.valid_sample_num < len(v_tgt):  # a fixed subset, the same for every epoch
        keep = torch.randperm(len(v_tgt), generator=torch.Generator().manual_seed(seed))[:args.valid_sample_num]
        v_his, v_tgt = v_his[keep], v_tgt[keep]
    best, best_epoch, best_state, epoch, stopped, done_steps = -1.0, 0, None, 0, "epochs", 0
    start = time.time()

    def out_of_time() -> bool:
        return bool(args.max_train_minutes) and time.time() - start > 60 * args.max_train_minutes

    bar = tqdm(range(1, args.epochs + 1), desc=f"{args.model} seed {seed}", mininterval=2)
    for epoch in bar:
        model.train()
        total, steps = 0.0, 0
        for idx in tqdm(torch.randperm(len(split.train_tgt), generator=gen).split(args.batch_size),
                        desc=f"epoch {epoch}", leave=False, mininterval=2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
                loss = model.loss(split.train_his[idx].to(device), split.train_tgt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps, done_steps = total + loss.item(), steps + 1, done_steps + 1
            if out_of_time():  # mid-epoch too: one epoch of a large model can outlast the cap (TIGER on a CPU)
                break
        score = ndcg10(ranks_of(model, v_his, v_tgt, args.eval_batch_size, device, "validation", args.autocast)[0])
        if score > best:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{total / steps:.3f}", valid_ndcg10=f"{score:.4f}", best=f"{best:.4f}@{best_epoch}")
        if epoch - best_epoch >= args.patience:
            stopped = "patience"
            break
        if out_of_time():
            stopped = "time"
            break
    model.load_state_dict(best_state)
    return {"epochs": epoch, "best_epoch": best_epoch, "best_valid_ndcg@10": best, "stopped": stopped,
            "train_steps": done_steps, "train_time_s": round(time.time() - start, 1)}


def save_item_embeddings(model: nn.Module, path: str) -> None:
    """The model's item embeddings [n_items, H], row i = item i, as an .npy (written atomically)."""
    save_item_matrix(path, model.item_weights().detach().float().cpu().numpy())
    print(f"item embeddings {tuple(model.item_weights().shape)} -> {path}")


def summarize(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def run(args: argparse.Namespace, family: ModuleType) -> dict:
    """Train ``args.seeds`` runs of one family, test each, write and return the results."""
    args = resolve_args(args, family)
    check_writable(args.results_file, "--results_file")
    if args.save_item_emb:
        check_writable(args.save_item_emb, "--save_item_emb")
    device = device_of(args.device)
    args.autocast = cpu_autocast_bf16(device, args.cpu_bf16)
    if args.autocast:
        print(f"{args.model}: training and decoding under bf16 autocast on the CPU (--cpu_bf16 {args.cpu_bf16})")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or usable_cores())
    metrics = args.metric_list
    split = load_split(args.data_path, args.dataset, args.max_his_len, args.sample_num, args.seed, args.train_stride)
    runs, rank_lists = [], []  # rank_lists: per seed, the target rank of every test user
    for r in range(args.seeds):
        seed = args.seed + r
        set_seed(seed)
        model = family.build(args, split).to(device)
        if args.save_item_emb and not isinstance(model, ScoreAllItems):
            raise DataError(f"--save_item_emb: {args.model} has no item embedding table (SASRec and GRU4Rec do)")
        if args.exclude_history and not isinstance(model, ScoreAllItems):
            raise DataError(f"--exclude_history: {args.model} decodes by beam search; only SASRec and GRU4Rec "
                            "score every item and can leave the history out")
        info = fit(model, split, args, seed, device)
        if args.save_item_emb and r == 0:
            save_item_embeddings(model, args.save_item_emb)
        t0 = time.time()
        ranks, tops = ranks_of(model, split.test_his, split.test_tgt, args.eval_batch_size, device, "test",
                               args.autocast, split.test_seen if args.exclude_history else None)
        info["personalisation"] = personalisation(tops)
        info["test_time_s"] = round(time.time() - t0, 1)
        info["metrics"] = {m: sum(metric_value(m, k) for k in ranks) / len(ranks) for m in metrics}
        runs.append({"seed": seed, **info})
        rank_lists.append(ranks)
        print(f"{args.model} seed {seed}: {info['epochs']} epochs (best {info['best_epoch']}, valid NDCG@10 "
              f"{info['best_valid_ndcg@10']:.4f}, stopped by {info['stopped']}), training time "
              f"{info['train_time_s']:.1f}s, test time {info['test_time_s']:.1f}s", flush=True)
    mean = {m: summarize([run_["metrics"][m] for run_ in runs])[0] for m in metrics}
    std = {m: summarize([run_["metrics"][m] for run_ in runs])[1] for m in metrics}
    n = len(split.test_users)
    per_user = per_user_values(split.test_users, rank_lists, metrics)  # each user's mean over the seeds
    stderr = {m: mean_and_stderr(per_user[m])[1] for m in metrics}  # over users
    per_prompt, stderr = {"0": mean}, {"0": stderr}  # one "prompt" (0), as baseline.py's files have
    personal = {"0": {k: sum(x["personalisation"][k] for x in runs) / len(runs) for k in runs[0]["personalisation"]}}
    summary = aggregate(per_prompt, metrics)
    results = {"dataset": args.dataset, "test_task": "seqrec", "model": args.model, "sample_num": args.sample_num,
               "exclude_history": bool(args.exclude_history),
               "metrics": metrics, "prompt_ids": [0], "num_examples": n, "per_prompt": per_prompt, **summary,
               "stderr": stderr, "personalisation": personal, "per_user": per_user, "std_over_seeds": std,
               "seeds": [x["seed"] for x in runs],
               "epochs": [x["epochs"] for x in runs], "best_epochs": [x["best_epoch"] for x in runs],
               "best_valid_ndcg@10": [x["best_valid_ndcg@10"] for x in runs],
               "train_time_s": [x["train_time_s"] for x in runs], "runs": runs, "device": str(device),
               "num_items": split.n_items, "num_train_rows": len(split.train_tgt),
               "num_train_targets": int((split.train_tgt >= 0).sum()),
               "args": {k: v for k, v in vars(args).items() if k != "metric_list"}}
    table = format_table(per_prompt, summary, metrics, stderr, personal)  # ± = standard error over test users
    if args.seeds > 1:
        table += "\n" + f"{'std':>8} " + " ".join(f"{std[m]:>18.4f}" for m in metrics) + f"   (over {args.seeds} seeds)"
    print(f"{args.model}: total training time {sum(results['train_time_s']):.1f}s over {args.seeds} run(s)")
    write_results(results, args.results_file, table)
    return results


def main(family: ModuleType, argv: list[str] | None = None) -> None:
    """Entry point of one family: ``python -m baselines.<family> ...``."""
    args = build_parser(family.__doc__.split("\n")[0]).parse_args(argv)
    with exit_on_data_error():
        run(args, family)
