"""Full fine-tuning of an LLM on the LC-Rec alignment tasks with the HF Trainer.

    python finetune.py --base_model <folder> --dataset D --data_path data --output_dir ckpt/D
    torchrun --nproc_per_node=N finetune.py ... [--deepspeed config/ds_z3_bf16.json --bf16]

Runs as one process, under torchrun with DDP (nccl on GPUs, gloo on CPU), or with DeepSpeed.
The final model and its tokenizer (with the index tokens) are saved to --output_dir.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import data
from collator import TrainCollator
from modeling import load_for_training
from utils import DataError, parse_args, set_seed


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def init_distributed(args: argparse.Namespace) -> None:
    """DeepSpeed: set up its process group first (gloo on CPU, nccl on GPUs), so that ZeRO-3 can
    partition the weights while from_pretrained builds the model. A plain single process (no
    torchrun) gets a one-rank group; otherwise DeepSpeed would look for MPI."""
    if not args.deepspeed:
        return
    import deepspeed

    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def training_arguments(args: argparse.Namespace, **overrides) -> TrainingArguments:
    """The paper's Trainer settings from the shared flags. Create it BEFORE loading the model: with a
    ZeRO-3 config it registers DeepSpeed so that from_pretrained partitions the weights."""
    if args.bf16 and args.fp16:
        raise SystemExit("error: --bf16 and --fp16 are exclusive")
    if args.deepspeed and not Path(args.deepspeed).is_file():
        raise SystemExit(f"error: --deepspeed: config file {args.deepspeed} not found")
    on_cpu = not torch.cuda.is_available()
    strategy = args.save_and_eval_strategy
    kwargs = dict(
        output_dir=args.output_dir,
        seed=args.seed,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a value below 1 is a fraction of the total steps
        lr_scheduler_type=args.lr_scheduler_type,
        optim=args.optim,
        logging_steps=args.logging_step,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=args.save_and_eval_steps,
        save_steps=args.save_and_eval_steps,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=strategy != "no",
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=args.bf16,
        fp16=args.fp16,
        deepspeed=args.deepspeed,
        activation_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to=[] if args.report_to in ("none", "") else args.report_to.split(","),
        remove_unused_columns=False,  # items are {"prompt", "response"}; the collator tokenizes
        prediction_loss_only=True,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and world_size() > 1 else None,
        ddp_find_unused_parameters=False if world_size() > 1 else None,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class EpochCallback(TrainerCallback):
    """Re-draws the training templates at the start of every epoch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int((state.epoch or 0) + 1e-6))  # floor, robust to float sums and resumes


def build_trainer(args, training_args, model, tokenizer, train_set, valid_set) -> Trainer:
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=valid_set if training_args.eval_strategy != "no" else None,
        data_collator=TrainCollator(tokenizer, args.only_train_response, args.model_max_length),
        processing_class=tokenizer,
        callbacks=[EpochCallback(train_set)],
    )


def resume_arg(value: str | None):
    """--resume_from_checkpoint: a folder, or true/last for the newest checkpoint in --output_dir."""
    if value is None or value.lower() in ("", "false", "no", "none"):
        return None
    if value.lower() in ("true", "last", "latest"):
        return True
    if not Path(value).is_dir():
        raise SystemExit(f"error: --resume_from_checkpoint: {value} is not a folder")
    return value


def save_final(trainer: Trainer, output_dir: str) -> None:
    """Model + tokenizer into output_dir. Under ZeRO-3 without 16-bit gathering the Trainer writes a
    DeepSpeed checkpoint instead; it is then consolidated to fp32 with DeepSpeed's own utility."""
    trainer.save_model(output_dir)
    trainer.save_state()
    out = Path(output_dir)
    has_weights = any(out.glob("*.safetensors")) or any(out.glob("pytorch_model*.bin"))
    if trainer.is_deepspeed_enabled:
        torch.distributed.barrier() if torch.distributed.is_initialized() else None
        if not has_weights and trainer.args.should_save:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(out))
            trainer._save(str(out), state_dict=state_dict)
            for tag in out.glob("global_step*"):
                shutil.rmtree(tag)  # the sharded optimizer states are no longer needed
            for name in ("latest", "zero_to_fp32.py", "zero_to_torch.py"):
                (out / name).unlink(missing_ok=True)
        torch.distributed.barrier() if torch.distributed.is_initialized() else None


def run(args: argparse.Namespace, model_kwargs: dict | None = None, adapt_model=None, what: str = "model") -> None:
    """Load data and model, train, save: shared by finetune.py and lora_finetune.py.

    ``adapt_model(model, args)`` wraps the loaded model (LoRA); ``model_kwargs`` go to from_pretrained."""
    set_seed(args.seed)
    init_distributed(args)
    training_args = training_arguments(args)

    indices = data.load_item_indices(args)
    train_set, valid_set = data.load_datasets(args)
    log(f"train examples per task: {dict(zip(train_set.tasks, (len(d) for d in train_set.datasets)))}; "
        f"validation: {len(valid_set)}")
    model, tokenizer = load_for_training(args.base_model, indices, **(model_kwargs or {}))
    log(f"vocabulary with index tokens: {len(tokenizer)}")
    if adapt_model is not None:
        model = adapt_model(model, args)
    if args.gradient_checkpointing:
        model.config.use_cache = False

    trainer = build_trainer(args, training_args, model, tokenizer, train_set, valid_set)
    trainer.train(resume_from_checkpoint=resume_arg(args.resume_from_checkpoint))
    save_final(trainer, args.output_dir)
    log(f"saved {what} and tokenizer to {args.output_dir}")


def main(argv: list[str] | None = None) -> None:
    run(parse_args("train", argv, description="Full fine-tuning on the LC-Rec tasks"))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}")
