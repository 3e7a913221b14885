"""Fine-tuning throughput on real training batches: the plain path against the fast one, in one run.

Both paths take optimizer steps (forward, backward, AdamW) on batches of the given dataset's
training mixture, rendered and tokenized exactly as finetune.py does:
- ``plain``: random batches, right padding, the output layer on every token, fp32 on CPU
  (bf16 autocast on GPUs);
- ``fast``: what finetune.py does by default: the output layer on the response positions only,
  bf16 autocast wherever the device has native bf16 (GPUs, CPUs with avx512_bf16 or AMX;
  run.sh's PRECISION=auto), and AdamW in one fused pass (``--optim adamw_torch_fused``) instead
  of a loop over the weights.
Each path has its own optimizer over the same weights.
Both paths take the same random batches; ``padding_share`` says how much batching by length
could still save.
Steps of the two paths alternate, so that a machine whose speed drifts slows both alike; the
figures are medians over the timed steps. Before any step, both collators score the same batch
with the same weights: their losses must agree (exactly in fp32, within bf16 rounding otherwise).

One figure per line on stdout:
    device, loss_plain, loss_fast, <path>_examples_per_second (and the interquartile range of the
    steps' rates), <path>_tokens_per_second, <path>_padding_share, speedup

    python bench/bench_train.py --data_path runs/ml-100k-SmolLM2-135M-Instruct-quick/data --dataset ml-100k \
        [--tasks seqrec --train_data_sample_num 0 --max_his_len 5] [--batch_size 16] [--steps 8]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from arguments import parse_args  # noqa: E402
from collator import TrainCollator  # noqa: E402
from modeling import load_for_training  # noqa: E402
from utils import cpu_supports_bf16, get_device, set_seed  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=str, default=None, help="HF folder (default: the embedded SmolLM2)")
    p.add_argument("--data_path", type=str, required=True)
    p.add_argument("--dataset", type=str, default="ml-100k")
    p.add_argument("--tasks", type=str, default="seqrec")
    p.add_argument("--train_data_sample_num", type=str, default="0")
    p.add_argument("--max_his_len", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    p.add_argument("--paths", type=str, default="plain,fast")
    args = p.parse_args()

    if args.model is None:
        from data_process.base_model import build_base_model

        args.model = str(build_base_model())
    n_tasks = len(args.tasks.split(","))
    train_args = parse_args("train", [
        "--base_model", args.model, "--data_path", args.data_path, "--dataset", args.dataset,
        "--tasks", args.tasks, "--train_data_sample_num", args.train_data_sample_num,
        "--train_prompt_sample_num", ",".join(["1"] * n_tasks), "--max_his_len", str(args.max_his_len),
        "--only_train_response"])
    set_seed(0)
    device = get_device()
    train_set, _ = data.load_datasets(train_args)
    model, tokenizer = load_for_training(args.model, data.load_item_indices(train_args), dtype=torch.float32)
    model.to(device).train()
    optimizers = {path: torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=path == "fast")
                  for path in ("plain", "fast")}
    native_bf16 = device.type == "cuda" or cpu_supports_bf16()

    collators = {"plain": TrainCollator(tokenizer, True, 2048, response_logits_only=False),
                 "fast": TrainCollator(tokenizer, True, 2048, response_logits_only=True)}
    autocasts = {"plain": device.type == "cuda", "fast": native_bf16}
    n_batches = args.warmup + args.steps
    pool = random.Random(0).sample(range(len(train_set)), min(len(train_set), args.batch_size * n_batches))
    same_batches = [pool[k * args.batch_size:(k + 1) * args.batch_size] for k in range(n_batches)]
    batches = {"plain": same_batches, "fast": same_batches}

    def encode(path: str, idx: list[int]) -> dict:
        batch = collators[path]([train_set[i] for i in idx])
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def loss_of(path: str, batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocasts[path]):
            return model(**batch).loss

    with torch.no_grad():  # same weights, same examples: the two paths must give the same loss
        same = batches["plain"][0]
        print(f"loss_plain {loss_of('plain', encode('plain', same)).item():.5f}")
        print(f"loss_fast {loss_of('fast', encode('fast', same)).item():.5f}")

    paths = [q for q in args.paths.split(",") if q]
    times: dict[str, list[float]] = {q: [] for q in paths}
    tokens: dict[str, list[int]] = {q: [] for q in paths}
    padded: dict[str, list[int]] = {q: [] for q in paths}
    for step in tqdm(range(n_batches), desc="steps", file=sys.stderr):
        for path in paths:
            batch = encode(path, batches[path][step])
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_of(path, batch).backward()
            optimizers[path].step()
            optimizers[path].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[path].append(time.perf_counter() - start)
                tokens[path].append(int(batch["attention_mask"].sum()))
                padded[path].append(batch["attention_mask"].numel())

    cpu = f"{os.cpu_count()} cpus, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, native bf16 {native_bf16}"
    print(f"device {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu})")
    rate = {}
    for path in paths:
        median = statistics.median(times[path])
        rate[path] = args.batch_size / median
        q1, _, q3 = statistics.quantiles(times[path], n=4) if len(times[path]) > 1 else [median] * 3
        print(f"{path}_examples_per_second {rate[path]:.2f}")
        print(f"{path}_examples_per_second_iqr {args.batch_size / q3:.2f}-{args.batch_size / q1:.2f}")
        print(f"{path}_tokens_per_second {statistics.median(tokens[path]) / median:.1f}")
        print(f"{path}_padding_share {1 - sum(tokens[path]) / sum(padded[path]):.3f}")
    if len(paths) == 2:
        print(f"speedup {rate[paths[1]] / rate[paths[0]]:.2f}")


if __name__ == "__main__":
    main()
