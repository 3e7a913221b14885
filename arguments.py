"""The one argument parser of finetune.py, lora_finetune.py, test.py, test_ddp.py, baseline.py
and recommend.py, the task names it accepts, and the checks of its training flags.
"""
from __future__ import annotations

import argparse
import functools
import math
import os

from utils import DataError

ALL_TASKS = ("seqrec", "item2index", "index2item", "fusionseqrec", "itemsearch", "preferenceobtain")
TEST_TASKS = ("seqrec", "itemsearch", "fusionseqrec")
DEFAULT_METRICS = "hit@1,hit@5,hit@10,ndcg@5,ndcg@10"
# Prompt settings a fine-tuned checkpoint records (checkpoint_record.py). The evaluation parsers leave
# them None, so that a flag given by hand can be told from one the checkpoint should fill in.
PROMPT_SETTINGS = ("max_his_len", "his_sep", "add_prefix", "model_max_length")


def parse_list(value: str, cast: type = str, flag: str = "") -> list:
    """``"a,b,c"`` to a list; a clear error names the flag on a bad element."""
    out = []
    for part in (p.strip() for p in str(value).split(",")):
        if part == "":
            continue
        try:
            out.append(cast(part))
        except ValueError as e:
            raise DataError(f"{flag}: could not read {part!r} as {cast.__name__} in {value!r}") from e
    return out


DECODINGS = ("trie", "position", "none")


def decoding_list(value: str) -> list[str]:
    """The argparse type of --decoding: one or more distinct DECODINGS, comma-separated."""
    modes = [m.strip().lower() for m in str(value).split(",")]
    if not all(m in DECODINGS for m in modes) or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected distinct decodings among {', '.join(DECODINGS)}, "
                                         f"comma-separated, got {value!r}")
    return modes


# The item co-occurrence ranker's context, window, recency decay and popularity damping where it ranks or
# fuses (item_teacher.CooccurrenceRanker), chosen on the ml-100k validation users (docs/experiments.md)
COOCCURRENCE_DEFAULTS = (5, 8, 0.8, 0.2)


def cooccurrence_settings(args: argparse.Namespace) -> dict:
    """The co-occurrence ranker's settings from the --fusion_* flags (test.py, baseline.py, recommend.py)."""
    return {"context": args.fusion_context, "window": args.fusion_window, "decay": args.fusion_decay,
            "damping": args.fusion_damping}


def positive_int(value: str) -> int:
    """The argparse type of counts that must be at least 1 (beams, batch sizes)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _float(value: str, ok, expected: str) -> float:
    """``value`` as a float, or argparse's error naming what was ``expected`` where ``ok(x)`` fails."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from None
    if not ok(x):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {value}")
    return x


def non_negative_float(value: str) -> float:
    """The argparse type of weights that must be finite and at least 0."""
    return _float(value, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")


def decay_float(value: str) -> float:
    """The argparse type of a decay factor: a number in (0, 1]."""
    return _float(value, lambda x: 0 < x <= 1, "in (0, 1]")


def _add_global_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("global")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--base_model", type=str, default=None, help="base LLM folder or hub id")
    g.add_argument("--output_dir", type=str, default="./ckpt/", help="where checkpoints go")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--data_path", type=str, default="./data", help="folder holding <dataset>/<dataset>.*.json")
    g.add_argument("--dataset", type=str, default="Instruments")
    g.add_argument("--index_file", type=str, default=".index.json", help="joined to the dataset: <D>/<D><index_file>")
    g.add_argument("--user_file", type=str, default=".user.json", help="joined to the dataset: <D>/<D><user_file>")
    g.add_argument("--tasks", type=str, default=",".join(ALL_TASKS), help="comma-separated training tasks")
    g.add_argument("--max_his_len", type=int, default=20, help="history length kept (last items)")
    g.add_argument("--add_prefix", action="store_true", help="number the history items: '1. <a_..>'")
    g.add_argument("--no_add_prefix", dest="add_prefix", action="store_false",
                   help="do not number them (overrides a checkpoint trained with --add_prefix)")
    g.add_argument("--prompt_templates", type=str, default=None,
                   help="JSON file of the instruction wrapper and every task's templates (e.g. written by "
                        "convert/original_prompts.py); default: this repository's templates (prompt.py)")
    g.add_argument("--his_sep", type=str, default=", ", help="separator between history items")
    g.add_argument("--only_train_response", action="store_true", help="loss on the response tokens only")
    g.add_argument("--train_prompt_sample_num", type=str, default="1,1,1,1,1,1", help="templates per example, per task")
    g.add_argument("--train_data_sample_num", type=str, default="0,0,0,100000,0,0", help="examples per task (0 = all)")
    g.add_argument("--valid_prompt_id", type=int, default=0)
    g.add_argument("--sample_valid", action="store_true", default=True, help="sample validation templates")
    g.add_argument("--no_sample_valid", dest="sample_valid", action="store_false")
    g.add_argument("--valid_prompt_sample_num", type=int, default=2)
    g.add_argument("--valid_sample_num", type=int, default=0, help="validation users to keep (0 = all)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--optim", type=str, default="adamw_torch_fused",
                   help="a Trainer optimizer name; the default, transformers' own on torch >= 2.8, updates all "
                        "weights in one fused pass (4x faster than adamw_torch on 2 CPU cores, the same update); the "
                        "original: adamw_torch")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (quick runs)")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--per_device_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=2)
    g.add_argument("--logging_step", type=int, default=10)
    g.add_argument("--model_max_length", type=int, default=2048)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup_ratio", type=float, default=0.01)
    g.add_argument("--lr_scheduler_type", type=str, default="cosine")
    g.add_argument("--save_and_eval_strategy", type=str, default="epoch", choices=["epoch", "steps", "no"])
    g.add_argument("--save_and_eval_steps", type=int, default=1000)
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None)
    g.add_argument("--force_resume", action="store_true",
                   help="resume even when the checkpoint was trained on other tasks, sample numbers, prompt "
                        "settings, index or templates than this run's")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--deepspeed", type=str, default=None, help="DeepSpeed config JSON")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--curve_steps", type=int, default=0,
                   help="every N steps, score --curve_users validation users with the constrained beam search "
                        "(the learning curve, in <output_dir>/learning_curve.json); 0 = off")
    g.add_argument("--curve_users", type=int, default=100, help="validation users of the learning curve (seeded)")
    g.add_argument("--curve_beams", type=int, default=20, help="beams of the learning curve's search")
    g.add_argument("--curve_batch_size", type=int, default=8, help="prompts per batch of the learning curve")
    g.add_argument("--history_loss", action="store_true",
                   help="with --only_train_response, also train on the index tokens of the history in the prompt: "
                        "each history item becomes a next-item target (off in the paper)")
    g.add_argument("--loss_normalization", type=str, default="micro_batch", choices=["micro_batch", "global_tokens"],
                   help="micro_batch (the original's, under transformers 4.2x): each micro-batch's mean over its "
                        "label tokens, averaged over accumulation steps and processes; global_tokens (transformers' "
                        "own since 4.46): the summed token loss over the label tokens of the whole accumulated "
                        "batch of every process, which weighs long text answers more than 5-token index answers")
    g.add_argument("--attn_implementation", type=str, default=None, choices=["eager", "sdpa"],
                   help="the attention the model trains with (default: transformers' choice, sdpa); eager is the "
                        "same computation and 20%% faster a step on a 2-core CPU in bf16, whose sdpa backward is slow "
                        "(docs/benchmarks.md); sdpa on GPUs")
    g.add_argument("--torch_dtype", type=str, default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype the weights are loaded and trained in (the AdamW moments follow it); float32, as the "
                        "original (--bf16/--fp16 then autocast, DeepSpeed keeps its own fp32 master copy); auto: the "
                        "checkpoint's dtype (fp16 for LLaMA-7B), transformers 5's default")
    g.add_argument("--index_token_init", type=str, default="normal", choices=["mean", "normal", "title", "collab"],
                   help="start of the new index-token embeddings: normal (the model's weight init, N(0, "
                        "initializer_range), what the original's transformers did; default), mean (transformers' "
                        "mean resizing, its default since 4.46), "
                        "title (from the titles of the items under each code, centred, spread like the "
                        "pretrained rows) or collab (the same from which items occur close together in the "
                        "training sequences: PPMI + SVD; not in the paper)")
    g.add_argument("--index_lr", type=float, default=None,
                   help="learning rate of the new index-token rows of the embedding matrix (and of an untied output "
                        "head); the pretrained rows of those matrices are then held fixed. Default: off, every "
                        "weight trains at --learning_rate (the paper)")
    g.add_argument("--index_softmax", type=str, default="none", choices=["none", "level", "trie"],
                   help="the loss on an index token: a softmax over the whole vocabulary (none, the paper), over "
                        "the codes of its level (level), or over the codes the item trie allows after the "
                        "item's earlier tokens (trie: the choice constrained decoding makes)")
    g.add_argument("--index_prior", type=str, default="none", choices=["none", "popularity"],
                   help="with --index_softmax trie: add the log of each code's share of the training interactions "
                        "below its prefix to the model's logits, in training and when scoring, so that the model "
                        "starts at the popularity ranking and learns what the history changes (off in the paper)")
    g.add_argument("--loss_temperature", type=float, default=1.0,
                   help="LETTER's ranking-guided loss: every softmax of the training loss (full, level or trie, "
                        "with the prior) runs on its scores divided by this; below 1 it sharpens the softmax, so "
                        "the loss weighs the hard negatives more. 1 (default): the plain loss of the paper. "
                        "test.py scores with the plain softmax, as LETTER's does")
    g.add_argument("--teacher_weight", type=float, default=0.0,
                   help="with --index_softmax trie: mix each index token's loss with the cross-entropy of a teacher "
                        "over the same children, (1 - w) x true token + w x teacher; the teacher is which items "
                        "followed the row's last --teacher_context items in the training parts (item_teacher.py). "
                        "0 (default): off, the paper's loss")
    g.add_argument("--teacher_context", type=int, default=5,
                   help="history items the --teacher_weight teacher reads before each target (and the window, in "
                        "steps, of its counts)")
    g.add_argument("--full_logits", dest="response_logits_only", action="store_false",
                   help="run the output layer on every token; by default (with --only_train_response) it runs "
                        "on the response positions only, which gives the same loss and gradients, faster")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--report_to", type=str, default="none")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    g = p.add_argument_group("lora")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=32)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument(
        "--lora_target_modules", type=str, default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )
    g.add_argument("--lora_modules_to_save", type=str, default="embed_tokens,lm_head")
    g.add_argument("--load_in_8bit", action="store_true")
    g.add_argument("--load_in_4bit", action="store_true")


def _add_test_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("test")
    g.add_argument("--ckpt_path", type=str, default=None, help="fine-tuned checkpoint (or LoRA adapter with --lora)")
    g.add_argument("--lora", action="store_true", help="ckpt_path is a LoRA adapter on --base_model")
    g.add_argument("--filter_items", action="store_true", help="drop generations that are not items")
    g.add_argument("--results_file", type=str, default="./results/test.json")
    g.add_argument("--save_predictions", action="store_true", help="also write each example's ranked items")
    g.add_argument("--test_batch_size", type=positive_int, default=1)
    g.add_argument("--num_beams", type=positive_int, default=20)
    g.add_argument("--sample_num", type=int, default=-1, help="test examples to use (-1 = all)")
    g.add_argument("--gpu_id", type=int, default=0)
    g.add_argument("--test_prompt_ids", type=str, default="0", help="'all' or comma-separated template ids")
    g.add_argument("--metrics", type=str, default=DEFAULT_METRICS)
    g.add_argument("--test_task", type=str, default="seqrec", help="seqrec, itemsearch or fusionseqrec")
    g.add_argument("--model_max_length", type=int, default=2048,
                   help="prompts longer than this (less the index and EOS) lose their oldest tokens, as in training")
    g.add_argument("--oom_backoff", action="store_true", help="on CUDA OOM retry the batch with fewer beams")
    g.add_argument("--cpu_bf16", type=str, default="auto", choices=["auto", "on", "off"],
                   help="bf16 autocast when decoding on a CPU (GPUs load bf16 weights); auto: on where the CPU "
                        "has native bf16 (avx512_bf16, AMX), where it is about twice as fast; scores stay fp32")
    g.add_argument("--decoding", type=decoding_list, default="trie",
                   help="trie: only real items (default); position: any token seen at each index position "
                        "(the original rule; a beam that spells no item is a miss); none: unconstrained. "
                        "Several, comma-separated (trie,position), are scored one after the other on one "
                        "loaded model: the first writes --results_file, each other one <stem>_<decoding>.json")
    g.add_argument("--no_share_prefill", action="store_true",
                   help="run each prompt once per beam inside generate instead of once, then sharing its cache")
    g.add_argument("--copy_prompt_cache", action="store_true",
                   help="give each beam of the trie search its own copy of the prompt's key/value cache instead of "
                        "sharing one as a tree under a 4D attention mask (slower, same ranking; for checking)")
    g.add_argument("--no_pack_weights", action="store_true",
                   help="under CPU bf16 decoding, keep the plain linear layers instead of copies of their weights "
                        "laid out once for oneDNN (the same scores, about 15%% faster answers; the copies double "
                        "the linear weights' memory)")
    g.add_argument("--beam_search", type=str, default="trie", choices=["trie", "hf"],
                   help="trie: beam search over the index trie's allowed tokens only (default, fast); "
                        "hf: transformers' generate with the trie as a logits processor (same ranking)")
    g.add_argument("--score_softmax", type=str, default="auto", choices=["auto", "full", "level", "trie"],
                   help="normalise each step's beam scores over the whole vocabulary (full), the level's codes "
                        "(level) or the trie's allowed codes (trie), as finetune.py --index_softmax trained; "
                        "auto: what the checkpoint's config.json records (full when nothing)")
    g.add_argument("--score_prior", type=str, default="auto", choices=["auto", "none", "popularity"],
                   help="add the popularity prior to the beam scores (popularity) or not (none); auto: what the "
                        "checkpoint's config.json records (finetune.py --index_prior); needs the trie softmax")
    g.add_argument("--fusion_weight", type=non_negative_float, default=0.0,
                   help="shallow fusion: add W x the log-probability that the item co-occurrence ranker (which items "
                        "followed the history's last --fusion_context items in the training parts) gives each item "
                        "to its beam score; 0 (default): off, the model alone; needs the trie search "
                        "(docs/evaluation.md)")
    g.add_argument("--fusion_context", type=positive_int, default=COOCCURRENCE_DEFAULTS[0],
                   help="the most recent history items whose followers the co-occurrence ranker of --fusion_weight counts")
    g.add_argument("--fusion_window", type=positive_int, default=COOCCURRENCE_DEFAULTS[1],
                   help="the co-occurrence ranker counts the items up to this many steps after each item")
    g.add_argument("--fusion_decay", type=decay_float, default=COOCCURRENCE_DEFAULTS[2],
                   help="the co-occurrence ranker weighs each older context item this much relative to the next "
                        "newer one (1: equally)")
    g.add_argument("--fusion_damping", type=non_negative_float, default=COOCCURRENCE_DEFAULTS[3],
                   help="the co-occurrence ranker divides each candidate's follow mass by its popularity to this "
                        "power (0: no damping)")
    g.add_argument("--allow_index_mismatch", action="store_true",
                   help="evaluate with an index file other than the one the checkpoint was trained with")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))


def _add_evaluation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("test.py only")
    g.add_argument("--exclude_history", action="store_true",
                   help="NOT the paper's protocol: leave each user's test-time history out of the ranking (as "
                        "recommend.py does); off by default, so that the metrics compare with the paper's")


def _add_recommend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recommend")
    g.add_argument("--user", type=str, default=None, help="a user of <D>.inter.json: their test-time history")
    g.add_argument("--history", type=str, default=None, help='typed history, oldest first: "Title one; Title two"')
    g.add_argument("--history_ids", type=str, default=None, help="typed history as item ids: 12,40,7")
    g.add_argument("--query", type=str, default=None, help="a request in plain words (alone or with a history)")
    g.add_argument("--k", type=int, default=10, help="items to return")
    g.add_argument("--keep_history", action="store_true",
                   help="let items already in the history be recommended (by default the search leaves them out "
                        "and returns K other items)")
    g.add_argument("--score_eos", action="store_true",
                   help="add each item's EOS log-probability to its score, as test.py does: one more model forward "
                        "per answer (about a fifth of its time); left out by default: the same ten items for 99 of "
                        "100 users of the cpu profile's model, 49 of 50 of the quick start's (docs/recommend.md)")
    g.add_argument("--no_prefix_cache", action="store_true",
                   help="run every prompt whole instead of reusing the keys and values of the words all prompts "
                        "start with (computed once at start-up; about a fifth of each prompt)")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table (titles kept whole)")
    g.add_argument("--title_width", type=positive_int, default=60,
                   help="the table cuts longer titles (and the request) to this many characters")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of the model (default: every core, or OMP_NUM_THREADS where set)")
    g.add_argument("--serve", action="store_true", help="serve the web page and its JSON API instead")
    g.add_argument("--host", type=str, default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max_body_kb", type=positive_int, default=64,
                   help="--serve: requests with a larger body are refused (HTTP 413) before they are read")


def _add_reinforce_args(p: argparse.ArgumentParser) -> None:
    """reinforce.py: the training flags, with defaults for the reinforcement stage, and its own."""
    p.set_defaults(learning_rate=1e-5, warmup_ratio=0.03, epochs=1, per_device_batch_size=4,
                   gradient_accumulation_steps=1, logging_step=1, save_and_eval_strategy="steps",
                   save_and_eval_steps=100)
    g = p.add_argument_group("reinforce")
    g.add_argument("--ckpt_path", type=str, default=None, help="the fine-tuned checkpoint (or LoRA adapter with --lora)")
    g.add_argument("--lora", action="store_true",
                   help="ckpt_path is a LoRA adapter on --base_model: the adapter trains, the reference is the merge")
    g.add_argument("--rl_tasks", type=str, default="seqrec",
                   help="tasks whose item-output prompts are trained: seqrec, fusionseqrec, itemsearch (comma-separated)")
    g.add_argument("--rl_sample_num", type=int, default=0, help="training examples per task (0 = all)")
    g.add_argument("--num_generations", type=positive_int, default=16, help="items per prompt (G, the group)")
    g.add_argument("--rollout", type=str, default="beam", choices=["beam", "sample"],
                   help="beam: the G best items of the trie beam search; sample: G draws within the trie")
    g.add_argument("--temperature", type=float, default=1.0, help="of --rollout sample")
    g.add_argument("--rewards", type=str, default="rule,rank", help="comma-separated rewards (see reinforce.REWARDS)")
    g.add_argument("--reward_weights", type=str, default="", help="one weight per reward (default: 1 each)")
    g.add_argument("--beta", type=float, default=1e-3, help="weight of the KL term to the fine-tuned model (0: none)")
    g.add_argument("--epsilon", type=float, default=0.2, help="the clipping range of the probability ratio")
    g.add_argument("--num_iterations", type=positive_int, default=1,
                   help="optimizer steps on each batch of rollouts (above 1 the clipping takes effect)")
    g.add_argument("--max_grad_norm", type=float, default=0.3)
    g.add_argument("--allow_index_mismatch", action="store_true",
                   help="train on an index file other than the one the checkpoint was fine-tuned with")
    g.add_argument("--keep_flat_groups", action="store_true",
                   help="also run the groups whose rewards are all equal (their advantages are 0, so only their "
                        "KL term acts); by default they are left out of the backward pass")


def build_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    """The one parser. ``stage`` is "train" (finetune.py, lora_finetune.py), "test" (test.py,
    test_ddp.py), "baseline" (the test flags and baseline.py's), "recommend" (the test flags and the
    request flags) or "reinforce" (the training flags and those of reinforce.py)."""
    if stage not in ("train", "test", "baseline", "recommend", "reinforce"):
        raise ValueError(f"stage must be 'train', 'test', 'baseline', 'recommend' or 'reinforce', got {stage!r}")
    p = argparse.ArgumentParser(description=description, conflict_handler="resolve")
    _add_global_args(p)
    _add_dataset_args(p)
    (_add_train_args if stage in ("train", "reinforce") else _add_test_args)(p)
    if stage == "test":
        _add_evaluation_args(p)
    if stage == "baseline":
        p.add_argument_group("baseline.py only").add_argument(
            "--ranker", type=str, default="popularity", choices=["popularity", "cooccurrence"],
            help="popularity: the training parts' most frequent items; cooccurrence: the items that followed the "
                 "history's last --fusion_context items there (the ranker --fusion_weight fuses with LC-Rec)")
    if stage == "recommend":
        _add_recommend_args(p)
    if stage == "reinforce":
        _add_reinforce_args(p)
    if stage != "train":  # filled from the checkpoint, else the training default (checkpoint_record.py)
        p.set_defaults(**dict.fromkeys(PROMPT_SETTINGS))
    return p


@functools.lru_cache(maxsize=None)
def training_default(name: str):
    """The training parser's default of flag ``name`` (what an evaluation uses when nothing says otherwise)."""
    return build_parser("train").get_default(name)


def check_index_lr(args: argparse.Namespace) -> None:
    """--index_lr: a positive rate, and not with DeepSpeed (fine-tuning and reinforcement alike)."""
    if args.index_lr is not None and not args.index_lr > 0:
        raise DataError(f"--index_lr: {args.index_lr} is not allowed; expected a positive learning rate")
    if args.index_lr is not None and args.deepspeed:
        raise DataError("--index_lr is not supported with --deepspeed (ZeRO partitions the embedding rows it "
                        "holds fixed); leave one of them out")


def check_task_args(args: argparse.Namespace) -> None:
    """SPEC section 7: task lists of equal length and known names."""
    tasks = parse_list(args.tasks, str, "--tasks")
    if not tasks:
        raise DataError(f"--tasks: no task given; expected comma-separated names from {list(ALL_TASKS)}")
    unknown = [t for t in tasks if t.lower() not in ALL_TASKS]
    if unknown:
        raise DataError(f"--tasks: unknown task(s) {unknown}; expected names from {list(ALL_TASKS)}")
    prompt_nums = parse_list(args.train_prompt_sample_num, int, "--train_prompt_sample_num")
    data_nums = parse_list(args.train_data_sample_num, int, "--train_data_sample_num")
    for flag, nums in (("--train_prompt_sample_num", prompt_nums), ("--train_data_sample_num", data_nums)):
        negative = [n for n in nums if n < 0]
        if negative:
            raise DataError(f"{flag}: {negative} are negative; expected counts >= 0 per task (0 = all)")
    for flag in ("curve_steps", "curve_users", "curve_beams", "curve_batch_size"):
        value = getattr(args, flag)
        if value < 0 or (value == 0 and flag != "curve_steps"):
            expected = "0 (off) or a number of steps" if flag == "curve_steps" else "a positive number"
            raise DataError(f"--{flag}: {value} is not allowed; expected {expected}")
    check_index_lr(args)
    if not (0 < args.loss_temperature < math.inf):  # NaN fails too
        raise DataError(f"--loss_temperature: {args.loss_temperature} is not allowed; expected a positive number "
                        "(1 = the plain loss, below 1 sharper)")
    if not 0 <= args.teacher_weight <= 1:  # NaN fails too
        raise DataError(f"--teacher_weight: {args.teacher_weight} is not allowed; expected a weight in [0, 1] "
                        "(0 = off)")
    if args.teacher_weight > 0 and args.index_softmax != "trie":
        raise DataError(f"--teacher_weight needs --index_softmax trie (the teacher's mass is over the trie's "
                        f"children), got --index_softmax {args.index_softmax}")
    if args.teacher_context < 1:
        raise DataError(f"--teacher_context: {args.teacher_context} is not allowed; expected at least 1 item")
    if args.index_prior != "none" and args.index_softmax != "trie":
        raise DataError(f"--index_prior {args.index_prior} needs --index_softmax trie (the prior is over the trie's "
                        f"codes), got --index_softmax {args.index_softmax}")
    if args.max_steps == 0 or args.max_steps < -1:  # the Trainer would still take one step and save it
        raise DataError(f"--max_steps: {args.max_steps} trains nothing; expected a number of optimizer steps >= 1, "
                        "or -1 to train for --epochs")
    if args.max_steps == -1 and args.epochs < 1:
        raise DataError(f"--epochs: {args.epochs} trains nothing (--max_steps is -1); expected at least 1")
    if args.valid_sample_num < 0:
        raise DataError(f"--valid_sample_num: {args.valid_sample_num} is negative; expected a count >= 0 (0 = all)")
    if not (len(tasks) == len(prompt_nums) == len(data_nums)):
        raise DataError(
            f"--tasks has {len(tasks)} entries, --train_prompt_sample_num {len(prompt_nums)} and "
            f"--train_data_sample_num {len(data_nums)}; they must have one entry per task"
        )


def parse_args(stage: str, argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    parser = build_parser(stage, description)
    args = parser.parse_args(argv)
    if stage in ("test", "baseline"):
        args.test_task = args.test_task.lower()  # the original accepts any case
    if stage == "train":
        try:
            check_task_args(args)
        except DataError as e:
            parser.error(str(e))
    return args
