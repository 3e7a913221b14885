"""Constrained decoding benchmark: examples per second and valid-item rate of the trie-native beam
search (``trie``), of transformers' generate beam search with the trie logits processor (``trie via
HF generate``) and of the per-position allowed-set callback (the original rule, run through
generate's prefix_allowed_tokens_fn, ``callback``). Same model, prompts, beams and batch size.

Two settings:
  tiny    a small random LlamaForCausalLM (hidden 64, 2 layers) whose vocabulary is SmolLM2's
          49152 tokens + 1024 index tokens, with 1682 items of 4-level indices: the model is
          cheap, so the cost of the constraint itself shows;
  smollm2 the embedded SmolLM2-135M-Instruct with the same index tokens added (--smollm2_batches 0
          skips it); also timed through generate without sharing the prompt's prefill across beams.

One figure per line on stdout; the last line is the tiny setting's trie/callback speed ratio.

    python bench/bench_decode.py [--batch_size 8] [--num_beams 20] [--batches 5]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from generation import Decoder, TrieLogitsProcessor, position_allowed_tokens_fn  # noqa: E402
from item_trie import IndexTrie  # noqa: E402
from utils import get_device  # noqa: E402

LEVELS, CODES, N_ITEMS, BASE_VOCAB = 4, 256, 1682, 49152


def make_index(n_items: int, seed: int = 0) -> dict[str, list[str]]:
    """Distinct 4-level indices <a_i><b_j><c_k><d_l>, codes spread like a trained RQ-VAE's."""
    rng = random.Random(seed)
    seen, out = set(), {}
    while len(out) < n_items:
        code = tuple(rng.randrange(CODES) for _ in range(LEVELS))
        if code not in seen:
            seen.add(code)
            out[str(len(out))] = [f"<{'abcd'[lvl]}_{c}>" for lvl, c in enumerate(code)]
    return out


def compare(name: str, decoder: Decoder, model, prompts: list[torch.Tensor], num_beams: int, batch_size: int,
            batches: int, pad_id: int, device: torch.device, unshared: bool = False) -> float:
    """Print examples/s and valid-item rate of each method; return the trie/callback speed ratio.
    All run each prompt once; ``unshared`` also times the trie via generate with the prompt run per beam.

    The methods run alternately on the same batches, after a warm-up of each, and the speed is the
    batch size over the median batch time, so that load from other processes hits all alike.
    """
    def batch(k: int) -> dict[str, torch.Tensor]:
        rows = prompts[k * batch_size:(k + 1) * batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    modes = {"trie": ("trie", "trie", True), "trie via HF generate": ("trie", "hf", True),
             "callback": ("position", "hf", True)}
    if unshared:
        modes["trie via HF generate without shared prefill"] = ("trie", "hf", False)
    times: dict[str, list[float]] = {m: [] for m in modes}
    valid = {m: [0, 0] for m in modes}
    # trie vs trie via HF generate: examples with the same ranked items, with the same set of items, and
    # the largest score difference of an item both return (orders may differ only at float-noise near-ties)
    same, same_set, n_compared, score_gap = 0, 0, 0, 0.0
    for k in range(batches + 1):  # batch 0 warms up
        enc = batch(k)
        for label, (mode, search, share) in modes.items():
            decoder.mode, decoder.search, decoder.share_prefill = mode, search, share
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            ranked = decoder.rank(model, enc, num_beams)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k == 0:
                continue
            if label == "trie":
                trie_ranked = ranked
            elif label == "trie via HF generate":
                for a, b in zip(trie_ranked, ranked):
                    a, b = dict(a), dict(b)
                    same += list(a) == list(b)
                    same_set += set(a) == set(b)
                    n_compared += 1
                    score_gap = max([score_gap] + [abs(a[i] - b[i]) for i in a if i in b])
            times[label].append(time.perf_counter() - start)
            valid[label][0] += sum(i is not None for items in ranked for i, _ in items)
            valid[label][1] += sum(len(items) for items in ranked)
    decoder.mode, decoder.search, decoder.share_prefill = "trie", "trie", True
    speed = {m: batch_size / statistics.median(t) for m, t in times.items()}
    for m in modes:
        print(f"{name} {m} examples/s: {speed[m]:.2f}")
        print(f"{name} {m} valid item rate: {valid[m][0] / max(valid[m][1], 1):.4f}")
    print(f"{name} trie vs trie via HF generate: same ranking {same / max(n_compared, 1):.4f}, same items "
          f"{same_set / max(n_compared, 1):.4f}, largest score difference of an item {score_gap:.2e}")
    print(f"{name} trie via HF generate/callback speed ratio: {speed['trie via HF generate'] / speed['callback']:.2f}")
    return speed["trie"] / speed["callback"]


def constraint_ms_per_step(trie: IndexTrie, sequences: list[list[int]], rows: int, num_beams: int, vocab: int,
                           eos: int, repeats: int = 3) -> tuple[float, float]:
    """The constraint alone: milliseconds per decoding step of the trie processor and of the callback
    (through transformers' PrefixConstrainedLogitsProcessor), on the same beams of real item prefixes."""
    from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

    rng, prompt_len = random.Random(1), 64
    totals = [0.0, 0.0]
    for step in range(trie.index_len + 1):
        gen = torch.tensor([(rng.choice(sequences) + [eos])[:step] for _ in range(rows)], dtype=torch.long)
        input_ids = torch.cat([torch.randint(3, 1000, (rows, prompt_len)), gen.view(rows, step)], 1)
        scores = torch.randn(rows, vocab).log_softmax(-1)
        trie_proc = TrieLogitsProcessor(trie, prompt_len, inplace=True)  # as in beam search
        callback = PrefixConstrainedLogitsProcessor(position_allowed_tokens_fn(sequences, prompt_len, eos), num_beams)
        for k, (proc, step_scores) in enumerate(((trie_proc, scores.clone()), (callback, scores))):
            start = time.perf_counter()
            for _ in range(repeats):
                proc(input_ids, step_scores)
            totals[k] += (time.perf_counter() - start) / repeats
    steps = trie.index_len + 1
    return 1000 * totals[0] / steps, 1000 * totals[1] / steps


def random_prompts(n: int, vocab: int, rng: random.Random, lo: int = 48, hi: int = 96) -> list[torch.Tensor]:
    return [torch.tensor([rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]) for _ in range(n)]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_beams", type=int, default=20)
    p.add_argument("--batches", type=int, default=5, help="timed batches per method (tiny model)")
    p.add_argument("--smollm2_batches", type=int, default=2, help="timed batches per method on SmolLM2; 0 skips it")
    p.add_argument("--smollm2_batch_size", type=int, default=1, help="batch size on SmolLM2 (CPU: keep it small)")
    p.add_argument("--smollm2_path", default=str(Path("~/.cache/lcrec/SmolLM2-135M-Instruct").expanduser()))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = get_device()
    rng = random.Random(0)
    indices = make_index(N_ITEMS)
    n_prompts = max(args.batch_size, args.smollm2_batch_size) * (max(args.batches, args.smollm2_batches) + 1)
    print(f"device: {device.type}, batch {args.batch_size}, beams {args.num_beams}, {N_ITEMS} items, "
          f"{LEVELS}-level indices", file=sys.stderr)

    ratio_smollm2 = None
    if args.smollm2_batches > 0:
        from transformers import AutoModelForCausalLM

        import prompt as templates
        from modeling import add_index_tokens, load_tokenizer
        from utils import default_dtype

        tokenizer = load_tokenizer(args.smollm2_path)
        add_index_tokens(tokenizer, indices)
        model = AutoModelForCausalLM.from_pretrained(args.smollm2_path, dtype=default_dtype(device))
        model.resize_token_embeddings(len(tokenizer))
        model.to(device).eval()
        items = list(indices)
        texts = [templates.wrap("The user has interacted with these items in order: "
                                + ", ".join("".join(indices[rng.choice(items)]) for _ in range(rng.randint(5, 20)))
                                + ". Which item will the user interact with next?") for _ in range(n_prompts)]
        prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in texts]
        decoder = Decoder.build(tokenizer, indices, device=device)
        ratio_smollm2 = compare("smollm2", decoder, model, prompts, args.num_beams, args.smollm2_batch_size,
                                args.smollm2_batches, tokenizer.pad_token_id, device, unshared=True)
        del model

    # tiny random model: SmolLM2's vocabulary size + one token per (level, code)
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, eos = BASE_VOCAB + LEVELS * CODES, 2
    token_id = {f"<{'abcd'[lvl]}_{c}>": BASE_VOCAB + lvl * CODES + c for lvl in range(LEVELS) for c in range(CODES)}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=eos, pad_token_id=eos)
    model = LlamaForCausalLM(config).to(device).eval()
    item_ids = {item: [token_id[t] for t in toks] for item, toks in indices.items()}
    trie = IndexTrie(list(item_ids.values()), eos, eos).to(device)
    decoder = Decoder(trie, {tuple(v): k for k, v in item_ids.items()}, eos, eos)
    prompts = random_prompts(n_prompts, BASE_VOCAB, rng)
    ratio_tiny = compare("tiny", decoder, model, prompts, args.num_beams, args.batch_size, args.batches, eos, device)
    trie_ms, callback_ms = constraint_ms_per_step(IndexTrie(list(item_ids.values()), eos, eos),
                                                  list(item_ids.values()), args.batch_size * args.num_beams,
                                                  args.num_beams, vocab, eos)
    print(f"constraint only, trie ms/step: {trie_ms:.2f}")
    print(f"constraint only, callback ms/step: {callback_ms:.2f}")
    print(f"constraint only trie/callback speed ratio: {callback_ms / trie_ms:.2f}")
    if ratio_smollm2 is not None:
        print(f"smollm2 trie/callback speed ratio: {ratio_smollm2:.2f}")
    print(f"tiny trie/callback speed ratio: {ratio_tiny:.2f}")


if __name__ == "__main__":
    main()
