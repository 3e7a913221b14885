"""Latency of recommend.py's answers: p50 and p90 over --users users of a dataset (10 items from 20
beams by default), in the process or over HTTP (--http, the server of ``recommend.py --serve``).

    python bench/bench_recommend.py --data_path data --dataset ml-100k [--ckpt_path CKPT]
        [--users 50] [--k 10] [--num_beams 20] [--max_his_len 20] [--threads 2] [--http]

Without --ckpt_path a stand-in checkpoint is built once in --work_dir: the embedded
SmolLM2-135M-Instruct with the dataset's index tokens added (untrained rows: a request costs the
same whatever the weights). A dataset without an index file gets random 4-level indices of 256
codes (bench_decode.make_index) in --work_dir as well; the trie then has the shape of a trained
RQ-VAE's. Each user is asked once, after --warmup requests; the figures are one per line: the CPU,
threads, the load average before and after, then p50 / p90 / min / max in ms.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from arguments import parse_args
from dataset_files import dataset_file, load_indices, load_inters
from utils import cpu_description, exit_on_data_error

SMOLLM2 = Path("~/.cache/lcrec/SmolLM2-135M-Instruct").expanduser()


def stand_in_data(data_path: Path, dataset: str, index_file: str, work_dir: Path) -> Path:
    """``data_path`` itself when it has an index file; else a copy of its interaction and item files
    with random indices, under ``work_dir``."""
    if dataset_file(data_path, dataset, index_file).exists():
        return data_path
    from bench_decode import make_index

    out = work_dir / "data"
    folder = out / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".inter.json", ".item.json"):
        shutil.copy(dataset_file(data_path, dataset, suffix), folder / f"{dataset}{suffix}")
    n_items = 1 + max(int(i) for seq in load_inters(folder / f"{dataset}.inter.json").values() for i in seq)
    target = dataset_file(out, dataset, index_file)
    if not target.exists():
        target.write_text(json.dumps(make_index(n_items)))
    return out


def stand_in_checkpoint(base: Path, indices: dict[str, list[str]], work_dir: Path) -> Path:
    """``base`` with the index tokens added, saved once under ``work_dir`` (renamed into place when whole)."""
    from transformers import AutoModelForCausalLM

    from modeling import add_index_tokens, load_tokenizer

    ckpt = work_dir / "ckpt"
    if (ckpt / "config.json").exists():
        return ckpt
    tokenizer = load_tokenizer(str(base))
    add_index_tokens(tokenizer, indices)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    tmp = work_dir / "ckpt.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(ckpt)
    return ckpt


def http_answer(port: int):
    """A function request body -> answer, over HTTP to the server on 127.0.0.1:``port``."""
    def ask(body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/recommend", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())
    return ask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", required=True)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--index_file", default=".index.json")
    p.add_argument("--ckpt_path", default=None, help="a fine-tuned checkpoint; default: a stand-in (see above)")
    p.add_argument("--base_model", default=str(SMOLLM2), help="what the stand-in checkpoint is built from")
    p.add_argument("--work_dir", default="bench_recommend_work", help="where the stand-in checkpoint and data go")
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--num_beams", type=int, default=20)
    p.add_argument("--max_his_len", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="default: every core (recommend.py's default)")
    p.add_argument("--cpu_bf16", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--keep_history", action="store_true", help="do not leave the history's items out")
    p.add_argument("--copy_prompt_cache", action="store_true",
                   help="give every beam its own copy of the prompt cache (the search before tree decoding)")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="run every prompt whole (recommend.py --no_prefix_cache)")
    p.add_argument("--compare_fp32", action="store_true",
                   help="afterwards load the model again in fp32 (--cpu_bf16 off, whole prompts), ask every user "
                        "again and report how many answers keep the same items, order and first item")
    p.add_argument("--no_pack_weights", action="store_true",
                   help="plain linear layers, no oneDNN-packed weight copies (recommend.py --no_pack_weights)")
    p.add_argument("--score_eos", action="store_true", help="score each item's EOS too (recommend.py --score_eos)")
    p.add_argument("--compare_score_eos", action="store_true",
                   help="afterwards ask every user again with the EOS term flipped and report how many answers "
                        "keep the same items, the same order and the same first item")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--http", action="store_true", help="ask over HTTP (recommend_server on 127.0.0.1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from recommender import Recommender

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_path = stand_in_data(Path(args.data_path), args.dataset, args.index_file, work_dir)
    ckpt = args.ckpt_path or stand_in_checkpoint(
        Path(args.base_model), load_indices(dataset_file(data_path, args.dataset, args.index_file)), work_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_flags = ["--ckpt_path", str(ckpt), "--dataset", args.dataset, "--data_path", str(data_path), "--index_file",
                   args.index_file, "--num_beams", str(args.num_beams), "--max_his_len", str(args.max_his_len)]
    rec = Recommender(parse_args("recommend", [
        *model_flags, "--cpu_bf16", args.cpu_bf16, *(["--copy_prompt_cache"] if args.copy_prompt_cache else []),
        *(["--score_eos"] if args.score_eos else []), *(["--no_pack_weights"] if args.no_pack_weights else []),
        *(["--no_prefix_cache"] if args.no_prefix_cache else [])]))
    users = sorted(rec.files.inters, key=lambda u: (len(u), u))
    users = random.Random(args.seed).sample(users, min(args.users + args.warmup, len(users)))

    if args.http:
        import socket

        import uvicorn

        from recommend_server import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(rec), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        ask = http_answer(port)
    else:
        def ask(body: dict) -> dict:
            return rec.answer(body["user"], k=body["k"], keep_history=body["keep_history"])

    load_before = os.getloadavg()
    wall, cpu, inside, prompt_items, answers = [], [], [], [], []
    for n, user in enumerate(tqdm(users, desc="requests", dynamic_ncols=True)):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = ask({"user": user, "k": args.k, "keep_history": args.keep_history})
        if n >= args.warmup:
            wall.append(1000 * (time.perf_counter() - start))
            cpu.append(1000 * (time.process_time() - start_cpu))
            inside.append(out["latency_ms"])
            prompt_items.append(sum(h["in_prompt"] for h in out["history"]))
            answers.append([r["item"] for r in out["items"]])
    load_after = os.getloadavg()

    def pct(xs: list[float], q: int) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]

    print(f"cpu: {cpu_description()}")
    packed = sum(hasattr(m, "packed_weight") for m in rec.model.modules())
    prefixes = [len(ids) for ids, _ in rec.decoder.prefixes.entries] if rec.decoder.prefixes else []
    print(f"threads: {torch.get_num_threads()}; bf16 autocast: {rec.bf16_autocast}; linear layers packed: {packed}; "
          f"cached prompt prefixes (tokens): {prefixes or 'none'}; torch {torch.__version__}")
    print(f"load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}; "
          f"after: {' '.join(f'{x:.2f}' for x in load_after)}")
    print(f"asked: {len(wall)} users of {args.dataset}, {args.k} items from {rec.num_beams} beams, "
          f"history items in the prompt: median {statistics.median(prompt_items):.0f}, "
          f"{'history kept' if args.keep_history else 'history left out'}, {'HTTP' if args.http else 'in process'}, "
          f"{'a prompt cache per beam' if args.copy_prompt_cache else 'one prompt cache shared as a tree'}")
    # CPU time of the process (all its threads): what the answer costs whatever else runs on the machine
    for name, xs in (("answer", wall), ("model (latency_ms)", inside), ("CPU time", cpu)):
        print(f"{name} ms: p50 {pct(xs, 50):.0f}  p90 {pct(xs, 90):.0f}  min {min(xs):.0f}  max {max(xs):.0f}")

    def agreement(other: list[list[str]]) -> str:
        n = len(other)
        return (f"{n} users: same items {sum(set(a) == set(b) for a, b in zip(answers, other))}/{n}, same order "
                f"{sum(a == b for a, b in zip(answers, other))}/{n}, same first item "
                f"{sum(a[:1] == b[:1] for a, b in zip(answers, other))}/{n}")

    if args.compare_score_eos:  # the same users with the EOS term flipped: what leaving it out changes
        rec.decoder.score_eos = not rec.decoder.score_eos
        other = [[r["item"] for r in ask({"user": u, "k": args.k, "keep_history": args.keep_history})["items"]]
                 for u in tqdm(users[args.warmup:], desc="EOS flipped", dynamic_ncols=True)]
        print(f"the answers with the EOS term scored and left out, {agreement(other)}")
    if args.compare_fp32:  # bf16 rounding alone reorders close items: the fp32 answers are the reference
        fp32 = Recommender(parse_args("recommend", [
            *model_flags, "--cpu_bf16", "off", "--no_prefix_cache",
            *(["--score_eos"] if rec.decoder.score_eos else [])]))
        other = [[r["item"] for r in fp32.answer(u, k=args.k, keep_history=args.keep_history)["items"]]
                 for u in tqdm(users[args.warmup:], desc="fp32", dynamic_ncols=True)]
        print(f"these answers and fp32's (whole prompts), {agreement(other)}")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
