"""Make a weight delta: target minus base, so a fine-tuned model can be shared without the base.

    python convert/make_delta.py --base-model-path <llama-7b> --target-model-path <fine-tuned> \
        --delta-path <delta> [--delta-dtype exact|float32|bfloat16|float16] [--max-shard-size 5GB]

Tensors of equal shape are stored as target - base. Tensors whose shape differs (the embeddings
and output head resized for the index tokens) are stored whole, as are tensors the base lacks;
delta_info.json lists them, with a sha256 of the base tensors the differences are added to
(merge_delta.py checks it before merging). The target's config, generation config and tokenizer go
with the delta. The target is read one shard at a time.

``--delta-dtype exact`` (default) stores each difference in the narrowest float type whose round
trip (base + delta, in float64, rounded to the target's type) gives back the target bit for bit:
usually float32 for a bf16/fp16 target and float64 for a float32 one. A fixed type such as float16
makes a smaller delta and prints how many elements will not come back exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from modeling import copy_tokenizer
from utils import DataError, atomic_dir, copy_files, exit_on_data_error
from weights import (
    BASE_HASH, DELTA_INFO, DTYPES, ShardWriter, WeightReader, add_delta, is_vocab_tensor,
    parse_size, records_hash, resolve_model_path, sub_base, tensor_record,
)

WIDER = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def exact_delta(target: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
    """The difference in the narrowest float type (no narrower than the target's) that rebuilds the
    target exactly; None when not even float64 does (weights many orders of magnitude apart)."""
    for dtype in WIDER[WIDER.index(target.dtype):]:
        if dtype == torch.bfloat16 and target.dtype == torch.float16:
            continue  # bf16 has fewer mantissa bits than fp16
        delta = sub_base(target, base, dtype)
        if torch.equal(add_delta(base, delta, target.dtype), target):
            return delta
    return None


def make_delta(base_dir: Path, target_dir: Path, out_dir: Path, delta_dtype: str, max_shard_bytes: int) -> dict:
    """Write the delta tensors into out_dir; returns the delta_info record."""
    base, target = WeightReader(base_dir), WeightReader(target_dir)
    writer = ShardWriter(out_dir, max_shard_bytes)
    whole: list[str] = []
    dtypes: dict[str, int] = {}
    inexact_elements = 0
    base_records: dict[str, str] = {}  # the base tensors the delta is added to, for merge_delta's check
    bar = tqdm(total=len(target.names()), desc="delta tensors", unit="tensor")
    for file in target.files:
        for name in target.names_in(file):
            t = target.get(name)
            base_name = base.resolve(name)
            if base_name is not None and base.shape(base_name) != tuple(t.shape) and not is_vocab_tensor(name):
                raise DataError(f"tensor {name!r}: base shape {base.shape(base_name)} but target shape "
                                f"{tuple(t.shape)}; only the embeddings and output head may differ "
                                f"(is {base_dir} the model {target_dir} was fine-tuned from?)")
            delta = None
            if base_name is not None and t.is_floating_point() and base.shape(base_name) == tuple(t.shape):
                b = base.get(base_name)
                if delta_dtype == "exact":
                    delta = exact_delta(t, b)
                    if delta is None:
                        print(f"warning: {name}: no float type rebuilds it exactly; stored whole", file=sys.stderr)
                else:
                    delta = sub_base(t, b, DTYPES[delta_dtype])
                    inexact_elements += int((add_delta(b, delta, t.dtype) != t).sum())
            if delta is None:  # resized, absent from the base, or not a float: the target's own tensor
                whole.append(name)
                delta = t
            else:  # hashed while its pages are fresh from base.get
                base_records[base_name] = tensor_record(base, base_name)
            kind = str(delta.dtype).replace("torch.", "")
            dtypes[kind] = dtypes.get(kind, 0) + 1
            writer.add(name, delta)
            bar.update()
        target.close()
        base.close()  # drop the pages of this shard before the next
    bar.close()
    writer.close()
    print(f"{len(target.names())} tensors, {len(whole)} stored whole ({', '.join(whole) or 'none'}); "
          f"delta dtypes {dtypes}")
    if delta_dtype != "exact":
        print(f"{inexact_elements} elements will not be rebuilt bit-exactly from a {delta_dtype} delta")
    return {"format": "lc-rec-delta", "version": 1, "base_model": str(base_dir), "delta_dtype": delta_dtype,
            "whole_tensors": whole, BASE_HASH: records_hash(base_records)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Target minus base, saved as safetensors with the target's tokenizer")
    p.add_argument("--base-model-path", required=True, help="base model folder or hub id")
    p.add_argument("--target-model-path", required=True, help="fine-tuned model folder")
    p.add_argument("--delta-path", required=True, help="output folder")
    p.add_argument("--delta-dtype", default="exact", choices=["exact", *DTYPES],
                   help="type of the stored differences; 'exact' picks, per tensor, the narrowest that rebuilds it")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 100MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --delta-path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base_dir = resolve_model_path(args.base_model_path, "--base-model-path")
    target_dir = resolve_model_path(args.target_model_path, "--target-model-path")
    if not (target_dir / "config.json").is_file():
        raise DataError(f"--target-model-path: {target_dir} has no config.json")
    max_shard_bytes = parse_size(args.max_shard_size)
    with atomic_dir(args.delta_path, args.overwrite, what="the delta") as tmp:
        copy_tokenizer(target_dir, tmp)  # first: a target without a tokenizer is refused before any work
        info = make_delta(base_dir, target_dir, tmp, args.delta_dtype, max_shard_bytes)
        copy_files(target_dir, tmp, ["config.json", "generation_config.json"])
        (tmp / DELTA_INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"delta saved to {args.delta_path}")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
