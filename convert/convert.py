"""Turn training checkpoints into plain Hugging Face model folders.

    python convert/convert.py -s <checkpoint> -t <folder> [--dtype float32|bfloat16|float16]
    python convert/convert.py --all <output_dir>        # what convert.sh runs

A checkpoint holding ZeRO shards (a ``latest`` file or ``global_step*`` folder, ZeRO-2 or 3) is
consolidated with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``: the result is the
fp32 master weights (training ran its forward passes on their bf16/fp16 copies). They are written
as safetensors shards next to the config, generation config, tokenizer files and
trainer_state.json. Any other model folder is re-saved through transformers (safetensors).

With ``--all``, every ``checkpoint-<step>`` under the folder becomes ``final-checkpoint-<step>``:
ZeRO checkpoints are consolidated; checkpoints that already hold plain HF weights pass through
unchanged as a hard-linked copy of the whole folder (a plain copy where links are impossible).
Existing final folders are kept unless --overwrite. Outputs appear only once complete.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from modeling import check_tokenizer_files, copy_tokenizer
from utils import DataError, atomic_dir, copy_files, exit_on_data_error
from weights import DTYPES, TIED_ALIASES, ShardWriter, parse_size

SIDE_FILES = ["config.json", "generation_config.json", "trainer_state.json"]


def has_zero_shards(folder: Path) -> bool:
    return (folder / "latest").is_file() or any(p.is_dir() for p in folder.glob("global_step*"))


def expected_keys(config) -> set[str]:
    """The state-dict keys the model class expects, from a weightless (meta) instance."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return set(model.state_dict())


def consolidate_zero(src: Path, dst: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    """ZeRO shards of ``src`` to safetensors in ``dst`` (which also gets config, tokenizer, state)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(src))
    # lazy: each tensor is assembled from the flat fp32 partitions only when written
    state = get_fp32_state_dict_from_zero_checkpoint(str(src), lazy_mode=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for head, embedding in TIED_ALIASES.items():
        if tied and embedding in state:
            state.pop(head, None)  # ZeRO lists the shared weight under both names; a tied model saves one
    missing = expected_keys(config) - set(state)
    if tied:
        missing -= set(TIED_ALIASES)
    unexpected = set(state) - expected_keys(config)
    if missing or unexpected:
        raise DataError(f"{src}: the consolidated weights do not fit {config.architectures}: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    writer = ShardWriter(dst, max_shard_bytes)
    for name in tqdm(list(state), desc=f"consolidating {src.name}", unit="tensor"):
        tensor = state.pop(name).contiguous()
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.close()
    config.dtype = dtype
    config.save_pretrained(str(dst))
    copy_files(src, dst, ["generation_config.json", "trainer_state.json"])


def resave(src: Path, dst: Path, dtype: torch.dtype | None, max_shard_bytes: int) -> None:
    """A model folder loaded and saved again through transformers (safetensors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype or "auto")
    model.save_pretrained(str(dst), max_shard_size=max_shard_bytes)
    copy_files(src, dst, ["trainer_state.json"])


def convert(src: Path, dst: Path, dtype: str | None, max_shard_size: str, overwrite: bool) -> None:
    if not src.is_dir():
        raise DataError(f"-s: {src} is not a folder")
    if not (src / "config.json").is_file():
        raise DataError(f"-s: {src} has no config.json")
    max_shard_bytes = parse_size(max_shard_size)
    with atomic_dir(dst, overwrite, what="the converted model") as tmp:
        copy_tokenizer(src, tmp)  # first: a checkpoint without its tokenizer is refused before any work
        if has_zero_shards(src):
            consolidate_zero(src, tmp, DTYPES[dtype or "float32"], max_shard_bytes)
            print(f"{src}: ZeRO shards consolidated into {dst}")
        else:
            resave(src, tmp, DTYPES[dtype] if dtype else None, max_shard_bytes)
            print(f"{src}: re-saved into {dst}")


def link_copy(src: Path, dst: Path, overwrite: bool) -> None:
    """The folder unchanged, as hard links (no extra disk), or copied where links are impossible."""
    check_tokenizer_files(src)
    with atomic_dir(dst, overwrite, what="the checkpoint copy") as tmp:
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=os.link)
        except OSError:
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
    print(f"{src}: already plain weights, linked as {dst}")


def convert_all(output_dir: Path, dtype: str | None, max_shard_size: str, overwrite: bool) -> list[Path]:
    """Every checkpoint-<step> under output_dir to final-checkpoint-<step>; returns the finals."""
    checkpoints = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    checkpoints.sort(key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise DataError(f"{output_dir}: no checkpoint-<step> folders")
    finals = []
    for ckpt in checkpoints:
        final = output_dir / f"final-{ckpt.name}"
        if final.exists() and not overwrite:
            print(f"{final} exists, kept (pass --overwrite to redo it)")
        elif has_zero_shards(ckpt):
            convert(ckpt, final, dtype, max_shard_size, overwrite)
        else:
            link_copy(ckpt, final, overwrite)
        finals.append(final)
    return finals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Checkpoints (ZeRO shards or HF folders) to plain HF folders")
    p.add_argument("-s", "--source", help="checkpoint or model folder")
    p.add_argument("-t", "--target", help="output folder")
    p.add_argument("--all", metavar="OUTPUT_DIR", help="convert every checkpoint-<step> under this folder")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weight dtype (default: float32 for ZeRO shards, the saved dtype otherwise)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    if bool(args.all) == bool(args.source or args.target) or (not args.all and not (args.source and args.target)):
        p.error("give either -s SOURCE -t TARGET, or --all OUTPUT_DIR")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.all:
        if not Path(args.all).is_dir():
            raise DataError(f"--all: {args.all} is not a folder")
        convert_all(Path(args.all), args.dtype, args.max_shard_size, args.overwrite)
    else:
        convert(Path(args.source), Path(args.target), args.dtype, args.max_shard_size, args.overwrite)


if __name__ == "__main__":
    with exit_on_data_error():
        main()
