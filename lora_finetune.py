"""LoRA fine-tuning on the LC-Rec alignment tasks (same data, flags and Trainer as finetune.py).

    python lora_finetune.py --base_model <folder> --dataset D --data_path data --output_dir ckpt/D-lora

LoRA (r 8, alpha 32, dropout 0.05) on every attention and MLP projection; the resized
``embed_tokens`` and ``lm_head`` are trained in full (they hold the new index tokens) and stay
tied when the base model ties them. --output_dir receives the adapter and the tokenizer;
evaluate it with ``test.py --lora --base_model <folder> --ckpt_path <output_dir>``.
"""
from __future__ import annotations

import argparse
import os

import torch

from arguments import parse_args, parse_list
from finetune import is_main_process, run
from utils import DataError, exit_on_data_error


def quantization_kwargs(args: argparse.Namespace) -> dict:
    """from_pretrained kwargs for --load_in_8bit / --load_in_4bit (bitsandbytes: CUDA, or the CPU
    kernels of recent releases)."""
    if not (args.load_in_8bit or args.load_in_4bit):
        return {}
    flag = "--load_in_8bit" if args.load_in_8bit else "--load_in_4bit"
    if args.load_in_8bit and args.load_in_4bit:
        raise DataError("--load_in_8bit and --load_in_4bit are exclusive")
    if args.deepspeed:
        raise DataError(f"{flag} cannot be combined with --deepspeed")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise DataError(f"{flag} needs the bitsandbytes package: pip install bitsandbytes") from e
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    config = (BitsAndBytesConfig(load_in_8bit=True) if args.load_in_8bit else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute))
    device = int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def add_lora(model, args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.load_in_8bit or args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=parse_list(args.lora_target_modules, str, "--lora_target_modules"),
        modules_to_save=parse_list(args.lora_modules_to_save, str, "--lora_modules_to_save") or None,
        ensure_weight_tying=tied,  # a tied lm_head keeps sharing the trained embedding copy
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def main(argv: list[str] | None = None) -> None:
    args = parse_args("train", argv, description="LoRA fine-tuning on the LC-Rec tasks")
    quant = quantization_kwargs(args)  # checked before any work

    def adapt(model, args):
        model = add_lora(model, args)
        if is_main_process():
            model.print_trainable_parameters()
        return model

    run(args, model_kwargs=quant, adapt_model=adapt, what="adapter")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
