"""Rebuild a fine-tuned model from its base and a delta (the inverse of make_delta.py).

    python convert/merge_delta.py --base-model-path <llama-7b> --target-model-path <out> \
        --delta-path <delta> [--low-cpu-mem] [--dtype float16] [--overwrite]

Paths are local folders or, when online, hub ids. Each tensor is base + delta, computed in float64
and rounded once to --dtype (float16 by default, as the released checkpoints; float32 gives back a
float32 target exactly). Tensors listed in the delta's delta_info.json, or, for a delta without
it, resized embeddings and output head, are taken whole from the delta. The output gets the
delta's tokenizer (with its added tokens), generation config and a config whose vocab_size is the
merged embedding size. It is built in a temporary folder and renamed only when complete.

Before anything is written, the base tensors the delta is added to are hashed (streamed, one
tensor at a time) and compared with the hash make_delta.py recorded in delta_info.json: the wrong
base (same shapes, other weights) is refused; --skip_base_check merges onto it anyway. A delta
without the hash (made before it was recorded, or released without delta_info.json) merges with
a note that the base could not be checked.

--low-cpu-mem processes one delta shard at a time: it reads only the base tensors that shard
needs and writes one output shard for it, so peak memory stays near the largest shard. Without
it every tensor of base and delta is loaded first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from modeling import copy_tokenizer, tokenizer_size
from utils import DataError, atomic_dir, copy_files, exit_on_data_error, refuse_existing
from weights import (
    BASE_HASH, DELTA_INFO, DTYPES, ShardWriter, WeightReader, add_delta, is_vocab_tensor, parse_size,
    read_delta_info, resolve_model_path, weights_hash,
)


def plan(base: WeightReader, delta: WeightReader, whole: set[str] | None) -> dict[str, str | None]:
    """For every delta tensor, the base tensor it is added to, or None when it is stored whole.
    Checked in full before anything is written."""
    sources: dict[str, str | None] = {}
    for name in delta.names():
        if (whole is not None and name in whole) or not delta.is_float(name):
            sources[name] = None
            continue
        base_name = base.resolve(name)
        if base_name is None:
            raise DataError(f"--base-model-path: {base.folder} has no tensor {name!r}, which the delta changes; "
                            "is it the model the delta was made from?")
        base_shape, delta_shape = base.shape(base_name), delta.shape(name)
        if base_shape != delta_shape:
            if whole is None and is_vocab_tensor(name):
                sources[name] = None  # a delta without delta_info.json: a resized vocabulary tensor is whole
                continue
            raise DataError(f"tensor {name!r}: base {base.folder} has shape {base_shape} but the delta has "
                            f"{delta_shape}; only stored-whole embeddings and output head may differ "
                            "(is --base-model-path the model the delta was made from?)")
        sources[name] = base_name
    return sources


def check_base(base_dir: Path, delta_dir: Path, skip: bool) -> None:
    """Refuse a base whose tensors are not those the delta was made from (the hash make_delta.py
    recorded); the shapes are checked by ``plan`` first. Reads the base; writes nothing."""
    info = read_delta_info(delta_dir)
    base, delta = WeightReader(base_dir), WeightReader(delta_dir)
    sources = plan(base, delta, set(info["whole_tensors"]) if info else None)
    expected = (info or {}).get(BASE_HASH)
    if expected is None:
        print(f"note: {delta_dir / DELTA_INFO} records no hash of its base (a delta made before hashes were "
              f"recorded, or released without it); {base_dir} could not be checked", file=sys.stderr)
        return
    if skip:
        print(f"note: --skip_base_check: {base_dir} is not checked against the base {delta_dir} was made from",
              file=sys.stderr)
        return
    found = weights_hash(base, (source for source in sources.values() if source))
    if found != expected:
        made_from = info.get("base_model", "?")
        raise DataError(f"--base-model-path: {base_dir} is not the base {delta_dir} was made from (made from "
                        f"{made_from}; its weights hash {found[:12]}, the delta expects {expected[:12]}); "
                        "merging would give other weights. Pass --skip_base_check to merge onto it anyway")


def merged_tensor(delta: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if base is None:
        return delta.to(dtype) if delta.is_floating_point() else delta
    return add_delta(base, delta, dtype)


def merge_weights(base_dir: Path, delta_dir: Path, out_dir: Path, dtype: torch.dtype, low_cpu_mem: bool,
                  max_shard_bytes: int) -> dict[str, tuple[int, ...]]:
    """Write the merged tensors into out_dir; returns their shapes."""
    base, delta = WeightReader(base_dir), WeightReader(delta_dir)
    info = read_delta_info(delta_dir)
    sources = plan(base, delta, set(info["whole_tensors"]) if info else None)
    shapes = {name: delta.shape(name) for name in sources}
    bar = tqdm(total=len(sources), desc="merging tensors", unit="tensor")
    if low_cpu_mem:  # one output shard per delta shard, written tensor by tensor
        writer = ShardWriter(out_dir)
        for file in delta.files:
            names = delta.names_in(file)
            entries = [(name, dtype if delta.is_float(name) else delta.dtype(name), shapes[name]) for name in names]

            def merged(names=names):
                for name in names:
                    source = sources[name]
                    yield merged_tensor(delta.get(name), base.get(source) if source else None, dtype)
                    bar.update()

            writer.add_shard_streaming(entries, merged())
            delta.close()
            base.close()
    else:  # everything in memory at once
        delta_tensors = {name: delta.get(name) for name in sources}
        base_tensors = {name: base.get(source) for name, source in sources.items() if source}
        writer = ShardWriter(out_dir, max_shard_bytes)
        for name, d in delta_tensors.items():
            writer.add(name, merged_tensor(d, base_tensors.get(name), dtype))
            bar.update()
    bar.close()
    writer.close()
    return shapes


def embedding_rows(shapes: dict[str, tuple[int, ...]]) -> int | None:
    for name, shape in shapes.items():
        if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
            return shape[0]
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Base + delta: rebuild a fine-tuned model")
    p.add_argument("--base-model-path", required=True, help="base model folder or hub id")
    p.add_argument("--target-model-path", required=True, help="output folder")
    p.add_argument("--delta-path", required=True, help="delta folder or hub id")
    p.add_argument("--low-cpu-mem", action="store_true", help="stream the delta shard by shard")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES), help="dtype of the merged weights")
    p.add_argument("--max-shard-size", default="5GB", help="output shard size without --low-cpu-mem")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --target-model-path")
    p.add_argument("--skip_base_check", "--skip-base-check", action="store_true",
                   help="merge even when the base's weights are not those the delta was made from")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    max_shard_bytes = parse_size(args.max_shard_size)
    delta_dir = resolve_model_path(args.delta_path, "--delta-path")
    base_dir = resolve_model_path(args.base_model_path, "--base-model-path")
    if not (delta_dir / "config.json").is_file():
        raise DataError(f"--delta-path: {delta_dir} has no config.json")
    from transformers import AutoConfig

    refuse_existing(args.target_model_path, args.overwrite)  # before the base is read and hashed
    check_base(base_dir, delta_dir, args.skip_base_check)
    with atomic_dir(args.target_model_path, args.overwrite, what="the merged model") as tmp:
        copy_tokenizer(delta_dir, tmp)  # first: a delta without a tokenizer is refused before any work
        vocab = tokenizer_size(tmp)  # loads, with its added tokens; then freed
        delta = WeightReader(delta_dir)
        rows = embedding_rows({name: delta.shape(name) for name in delta.names()})
        if rows is not None and rows < vocab:
            raise DataError(f"--delta-path: its tokenizer has {vocab} tokens but its embeddings only {rows} rows")
        shapes = merge_weights(base_dir, delta_dir, tmp, dtype, args.low_cpu_mem, max_shard_bytes)
        config = AutoConfig.from_pretrained(str(delta_dir))
        if rows is not None:
            config.vocab_size = rows
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        copy_files(delta_dir, tmp, ["generation_config.json"])
    print(f"merged model ({len(shapes)} tensors, {args.dtype}, vocabulary {vocab}) saved to "
          f"{args.target_model_path}")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
