"""Fine-tuning throughput: training tokens per second at a fixed batch on the available device.

The embedded SmolLM2-135M-Instruct (built by data_process/base_model.py) gets 1024 index tokens
added, like a real run, and takes optimizer steps (forward, backward, AdamW) on a fixed batch of
``batch_size x seq_len`` tokens with every token a label. On CUDA it uses bf16 autocast (what
``--bf16`` does in the Trainer), on CPU fp32. Warm-up steps are not timed.

One figure per line on stdout:
    device, train_tokens_per_second, seconds_per_step, peak_memory_gib (CUDA only)

    python bench/bench_train.py [--batch_size 8] [--seq_len 256] [--steps 3] [--warmup 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from utils import get_device, set_seed  # noqa: E402


def index_tokens(levels: int = 4, codes: int = 256) -> list[str]:
    return [f"<{chr(ord('a') + lvl)}_{c}>" for lvl in range(levels) for c in range(codes)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=str, default=None, help="HF folder (default: the embedded SmolLM2)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--gradient_checkpointing", action="store_true")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model is None:
        from data_process.base_model import build_base_model

        args.model = str(build_base_model())
    set_seed(0)
    device = get_device()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.add_tokens(index_tokens())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    input_ids = torch.randint(0, len(tokenizer), (args.batch_size, args.seq_len), device=device)  # [B, T]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in tqdm(range(args.warmup), desc="warm-up", file=sys.stderr):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="timed steps", file=sys.stderr):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps

    print(f"device {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
          f"{'' if device.type == 'cuda' else 'cpus, OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS']})")
    print(f"train_tokens_per_second {args.batch_size * args.seq_len / seconds:.1f}")
    print(f"seconds_per_step {seconds:.3f}")
    if device.type == "cuda":
        print(f"peak_memory_gib {torch.cuda.max_memory_allocated(device) / 2**30:.2f}")


if __name__ == "__main__":
    main()
