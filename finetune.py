"""Full fine-tuning of an LLM on the LC-Rec alignment tasks with the HF Trainer.

    python finetune.py --base_model <folder> --dataset D --data_path data --output_dir ckpt/D
    torchrun --nproc_per_node=N finetune.py ... [--deepspeed config/ds_z3_bf16.json --bf16]

Runs as one process, under torchrun with DDP (nccl on GPUs, gloo on CPU), or with DeepSpeed.
The final model and its tokenizer (with the index tokens) are saved to --output_dir.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import data
from arguments import parse_args
from checkpoint_record import RECORD_KEY, check_resume, training_record
from collator import TrainCollator
from dataset_files import index_tokens
from modeling import keeps_logits, load_for_training
from prompt import prompt_set
from training_saves import final_save_errors, with_save_errors
from utils import check_writable, exit_on_data_error, folder_kept_only_if_used, set_seed


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
        include_num_input_tokens_seen="non_padding",  # logs train_tokens_per_second
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


def history_token_ids(args: argparse.Namespace, tokenizer, indices: dict[str, list[str]]) -> list[int]:
    """Ids of the index tokens, whose history occurrences --history_loss adds to the loss."""
    if not args.history_loss:
        return []
    return tokenizer.convert_tokens_to_ids(index_tokens(indices))


def with_index_lr(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` whose optimizer gives the embedding matrices (input, and the output head
    when it is not tied to it) their own group at ``index_lr``, without weight decay, and whose
    gradient on their pretrained rows is zeroed, so those rows stay as they are and only the new
    index-token rows move at that rate.

    Why: the new rows start as near-copies (or from titles) and must become item representations
    the body can read; at the body's rate they barely move in a short run."""

    class IndexLrTrainer(trainer_class):
        def __init__(self, *args, index_lr: float, first_index_row: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.index_lr, self.first_index_row = index_lr, first_index_row
            self.index_weights = embedding_weights(self.model)
            for weight in self.index_weights:
                if not weight.requires_grad:
                    raise SystemExit("error: --index_lr: an embedding matrix is frozen (LoRA without it in "
                                     "--lora_modules_to_save?); there are no index-token rows to train")

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            # the pretrained rows' gradient zeroed in place after each backward (and DDP's reduction), before
            # clipping and the step: a gradient hook did it on a new [V, H] tensor per step (0.1 s on 2 cores)
            with torch.no_grad():
                for weight in self.index_weights:
                    if weight.grad is not None:
                        weight.grad[: self.first_index_row].zero_()
            return loss

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            ours = {id(w) for w in self.index_weights}
            for group in optimizer.param_groups:  # out of the Trainer's groups, into their own
                group["params"] = [p for p in group["params"] if id(p) not in ours]
            optimizer.add_param_group({"params": self.index_weights, "lr": self.index_lr, "weight_decay": 0.0})
            return optimizer

    return IndexLrTrainer


def first_index_row(tokenizer, indices: dict[str, list[str]]) -> int:
    """The first embedding row of the index tokens (they were added after the pretrained vocabulary)."""
    return min(tokenizer.convert_tokens_to_ids(index_tokens(indices)))


def embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input embedding matrix, and the output head's when it is a separate matrix."""
    weights = [model.get_input_embeddings().weight]  # [V, H]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    return weights


def set_loss_normalization(trainer: Trainer, mode: str) -> None:
    """--loss_normalization on a built Trainer (every class of build_trainer).

    transformers >= 4.46 passes ``num_items_in_batch`` (the label tokens of the whole accumulated batch,
    summed over processes with ``average_tokens_across_devices``) to any model whose forward takes loss
    kwargs, and divides the summed token loss by it: ``global_tokens``. Its switch for the older rule is
    ``model_accepts_loss_kwargs``: off, no count is made or passed, each micro-batch's loss is its own
    token mean, ``training_step`` divides it by the accumulation steps, and DDP and DeepSpeed average the
    gradients over processes: ``micro_batch``, what the original trained with (transformers 4.2x).
    IndexSoftmaxTrainer reads the same switch."""
    if mode == "micro_batch":
        trainer.model_accepts_loss_kwargs = False
    elif not trainer.model_accepts_loss_kwargs:
        raise SystemExit("error: --loss_normalization global_tokens: this model's forward takes no "
                         "num_items_in_batch, so the Trainer can only normalise per micro-batch; pass micro_batch")


def build_trainer(args, training_args, model, tokenizer, train_set, valid_set) -> Trainer:
    trainer_class, extra = Trainer, {}
    indices = data.load_item_indices(args)
    if args.index_softmax != "none" or args.loss_temperature != 1:  # else the model's own loss, as the paper
        from index_loss import IndexSoftmax, IndexSoftmaxTrainer

        trie = None
        if args.index_softmax != "none":
            from item_prior import item_prior
            from item_trie import IndexTrie

            # the index tokens were checked when they were added (modeling.add_index_tokens)
            item_ids = [tokenizer.convert_tokens_to_ids(toks) for toks in indices.values()]
            prior = item_prior(args.index_prior, args, indices)
            weights = None if prior is None else [prior[item] for item in indices]
            trie = IndexTrie(item_ids, tokenizer.eos_token_id, weights=weights)
        mode = "full" if args.index_softmax == "none" else args.index_softmax
        teacher = None
        if args.teacher_weight > 0:  # soft targets from the training parts' item co-occurrence
            from item_teacher import CooccurrenceTeacher

            teacher = CooccurrenceTeacher.build(data.load_files(args).inters, list(indices), trie, item_ids,
                                                context=args.teacher_context, window=args.teacher_context)
        loss = IndexSoftmax(trie, len(tokenizer), mode, temperature=args.loss_temperature, teacher=teacher,
                            teacher_weight=args.teacher_weight)
        trainer_class, extra = IndexSoftmaxTrainer, {"index_softmax": loss}
    if args.index_lr is not None:
        trainer_class = with_index_lr(trainer_class)
        extra.update(index_lr=args.index_lr, first_index_row=first_index_row(tokenizer, indices))
    trainer_class = with_save_errors(trainer_class)  # a failed checkpoint save says how to resume
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=valid_set if training_args.eval_strategy != "no" else None,
        data_collator=TrainCollator(tokenizer, args.only_train_response, args.model_max_length,
                                    response_logits_only=args.response_logits_only and keeps_logits(model),
                                    history_token_ids=history_token_ids(args, tokenizer, indices)),
        processing_class=tokenizer,
        callbacks=[EpochCallback(train_set)],
        **extra,
    )
    set_loss_normalization(trainer, args.loss_normalization)
    return trainer


CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete ``checkpoint-N`` folder, None for one cut short by a kill. The
    Trainer writes ``trainer_state.json`` last, so a readable one means the save finished."""
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """(newest complete ``checkpoint-N`` in output_dir or None, the newer incomplete ones skipped)."""
    folders = [f for f in Path(output_dir).glob("checkpoint-*") if f.is_dir() and CHECKPOINT_RE.match(f.name)]
    skipped = []
    for folder in sorted(folders, key=lambda f: int(CHECKPOINT_RE.match(f.name).group(1)), reverse=True):
        if checkpoint_step(folder) is not None:
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def resume_arg(value: str | None, output_dir: str | os.PathLike = ".") -> str | None:
    """--resume_from_checkpoint: a folder, or true/last for the newest *complete* checkpoint in
    --output_dir (folders a kill left half-written are skipped, and said so)."""
    if value is None or value.lower() in ("", "false", "no", "none"):
        return None
    if value.lower() in ("true", "last", "latest"):
        folder, skipped = newest_complete_checkpoint(output_dir)
        for bad in skipped:
            log(f"resume: skipping {bad}: incomplete (no readable trainer_state.json; killed during a save?)")
        if folder is None:
            log(f"resume: no complete checkpoint in {output_dir}; training from the start")
            return None
        log(f"resume: from {folder}")
        return str(folder)
    if not Path(value).is_dir():
        raise SystemExit(f"error: --resume_from_checkpoint: {value} is not a folder")
    if checkpoint_step(Path(value)) is None:
        raise SystemExit(f"error: --resume_from_checkpoint: {value} is incomplete (no readable trainer_state.json; "
                         "killed during a save?); pass an earlier checkpoint or 'true' for the newest complete one")
    return value


def final_model_complete(output_dir: str | os.PathLike) -> bool:
    """A finished final model: ``config.json`` is published last (see publish_folder)."""
    return (Path(output_dir) / "config.json").is_file()


def publish_folder(tmp: Path, output_dir: Path) -> None:
    """Move every file of ``tmp`` into ``output_dir``, ``config.json`` last: a kill in between
    leaves a folder without config.json, which neither run.sh nor from_pretrained takes as finished."""
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        target = output_dir / f.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(f, target)
    shutil.rmtree(tmp, ignore_errors=True)


@final_save_errors  # a failed write says so in one line, with the command that resumes
def save_final(trainer: Trainer, output_dir: str, state_dict: dict | None = None) -> None:
    """Model + tokenizer into output_dir, through a temporary folder published at the end (a kill
    never leaves a folder that looks finished). Under ZeRO-3 without 16-bit gathering the Trainer
    writes a DeepSpeed checkpoint instead; it is then consolidated to fp32 with DeepSpeed's own utility."""
    out = Path(output_dir)
    tmp = out / ".final.tmp"  # the same name on every rank: ZeRO-3 saves collectively
    barrier = torch.distributed.barrier if torch.distributed.is_initialized() else (lambda: None)
    if trainer.args.should_save:
        (out / "config.json").unlink(missing_ok=True)  # a re-save: the old model is no longer the final one
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if state_dict is not None:
        if trainer.args.should_save:
            trainer._save(str(tmp), state_dict=state_dict)
    else:
        trainer.save_model(str(tmp))
    if trainer.is_deepspeed_enabled:
        barrier()
        has_weights = any(tmp.glob("*.safetensors")) or any(tmp.glob("pytorch_model*.bin"))
        if not has_weights and trainer.args.should_save:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            consolidated = get_fp32_state_dict_from_zero_checkpoint(str(tmp))
            trainer._save(str(tmp), state_dict=consolidated)
            for tag in tmp.glob("global_step*"):
                shutil.rmtree(tag)  # the sharded optimizer states are no longer needed
            for name in ("latest", "zero_to_fp32.py", "zero_to_torch.py"):
                (tmp / name).unlink(missing_ok=True)
    barrier()
    if trainer.args.should_save:
        publish_folder(tmp, out)
        trainer.save_state()
    barrier()


def finished_checkpoint_weights(trainer: Trainer, checkpoint: str) -> dict | None:
    """Weights of a checkpoint that already reached --max_steps, for saving without training
    (the Trainer would otherwise run one more step on resume). None where the model could be
    restored in place."""
    if trainer.is_deepspeed_enabled:
        if not trainer.args.should_save:
            return {}  # only the main process writes; the others skip the consolidation
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    return None


def run(args: argparse.Namespace, model_kwargs: dict | None = None, adapt_model=None, what: str = "model") -> None:
    """Load data and model, train, save: shared by finetune.py and lora_finetune.py.

    ``adapt_model(model, args)`` wraps the loaded model (LoRA); ``model_kwargs`` go to from_pretrained.
    A run refused before it wrote anything leaves no empty --output_dir behind."""
    with folder_kept_only_if_used(args.output_dir):
        _run(args, model_kwargs, adapt_model, what)


def _run(args: argparse.Namespace, model_kwargs: dict | None, adapt_model, what: str) -> None:
    set_seed(args.seed)
    check_writable(args.output_dir, "--output_dir", is_dir=True)  # before any work: it would lose the run
    init_distributed(args)
    training_args = training_arguments(args)

    indices = data.load_item_indices(args)
    record = training_record(args, indices, prompt_set(args))  # saved in config.json (checkpoint_record.py)
    checkpoint = resume_arg(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:  # before any work: the checkpoint must have trained on what this run trains on
        check_resume(checkpoint, record, args.force_resume, log)
    train_set, valid_set = data.load_datasets(args)
    log(f"train examples per task: {dict(zip(train_set.tasks, (len(d) for d in train_set.datasets)))}; "
        f"validation: {len(valid_set)}")
    titles = inters = None
    if args.index_token_init == "title":
        titles = {item: feat.get("title", "") for item, feat in data.load_files(args).items.items()}
    elif args.index_token_init == "collab":
        inters = data.load_files(args).inters
    model_kwargs = dict(model_kwargs or {})
    if args.attn_implementation:
        model_kwargs["attn_implementation"] = args.attn_implementation
    model, tokenizer = load_for_training(args.base_model, indices, dtype=args.torch_dtype, titles=titles, inters=inters,
                                         mean_resizing=args.index_token_init != "normal", **model_kwargs)
    log(f"vocabulary with index tokens: {len(tokenizer)}")
    if args.index_softmax != "none":  # saved in config.json: test.py then scores with the same softmax
        model.config.index_softmax = args.index_softmax
    if args.index_prior != "none":  # test.py then adds the same prior (from the dataset's training counts)
        model.config.index_prior = args.index_prior
    if args.loss_temperature != 1:  # a record only: test.py scores with the plain softmax, as LETTER's does
        model.config.loss_temperature = args.loss_temperature
    if args.teacher_weight > 0:  # a record only: scoring does not read it
        model.config.teacher = {"weight": args.teacher_weight, "context": args.teacher_context}
    # index hash, prompt settings, tasks, templates: test.py, recommend.py and a resume check them
    setattr(model.config, RECORD_KEY, record)
    if adapt_model is not None:
        model = adapt_model(model, args)
    if args.gradient_checkpointing:
        model.config.use_cache = False

    trainer = build_trainer(args, training_args, model, tokenizer, train_set, valid_set)
    if args.curve_steps:
        from learning_curve import LearningCurve

        add_learning_curve(trainer, args, tokenizer, LearningCurve)
    if train_or_finish(trainer, args, checkpoint, what):
        log(f"saved {what} and tokenizer to {args.output_dir}")


def add_learning_curve(trainer: Trainer, args: argparse.Namespace, tokenizer, curve_class: type) -> None:
    """``--curve_steps``: a ``curve_class`` callback scoring validation users every so many steps;
    skipped under DeepSpeed ZeRO-3, whose weights are partitioned across processes."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        log("learning curve: skipped under DeepSpeed ZeRO-3 (the weights are partitioned across processes)")
        return
    per_step = args.per_device_batch_size * args.gradient_accumulation_steps * world_size()
    trainer.add_callback(curve_class(args, tokenizer, args.output_dir, per_step))


def train_or_finish(trainer: Trainer, args: argparse.Namespace, checkpoint: str | None, what: str) -> bool:
    """Train (from ``checkpoint`` when resuming) and save the final model; a checkpoint that already
    reached ``--max_steps`` is only written out as the final model. False when that final model was
    already complete (nothing written)."""
    done = checkpoint_step(Path(checkpoint)) if checkpoint else None
    if done is not None and 0 < args.max_steps <= done:
        log(f"resume: {checkpoint} already reached step {done} of --max_steps {args.max_steps}; nothing to train")
        if final_model_complete(args.output_dir):
            log(f"the final {what} in {args.output_dir} is complete")
            return False
        save_final(trainer, args.output_dir, state_dict=finished_checkpoint_weights(trainer, checkpoint))
        if trainer.args.should_save:  # the finished run's state, not the unused trainer's
            shutil.copyfile(Path(checkpoint) / "trainer_state.json", Path(args.output_dir) / "trainer_state.json")
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
        save_final(trainer, args.output_dir)
    return True


def main(argv: list[str] | None = None) -> None:
    run(parse_args("train", argv, description="Full fine-tuning on the LC-Rec tasks"))


if __name__ == "__main__":
    with exit_on_data_error():
        main()
