"""Reinforcement after fine-tuning: GRPO with trie-constrained rollouts and ranking rewards.

    python reinforce.py --ckpt_path ckpt/D --dataset D --data_path data --output_dir ckpt/D-rl [--bf16]
    python reinforce.py --lora --base_model B --ckpt_path ckpt/D-lora ...   # trains the adapter further
    torchrun --nproc_per_node=N reinforce.py ...

Each step takes ``--per_device_batch_size`` training prompts of ``--rl_tasks`` (the item-output
templates: seqrec, and fusionseqrec / itemsearch by flag) and rolls out a group of G =
``--num_generations`` items per prompt with the current model: the G best of the trie beam search
(``--rollout beam``, what test.py ranks) or G draws within the trie (``--rollout sample``). Every
item is rewarded against the held-out next item (``REWARDS``, weighted by ``--reward_weights``);
the rewards are normalised within each group into advantages, and the model is trained with the
clipped policy objective plus ``--beta`` times a KL estimate to the fine-tuned model (frozen, the
reference), both on the log-probabilities of the item's index tokens and its EOS only, normalised
as the checkpoint is scored (its ``index_softmax`` / ``index_prior``, see generation.child_logprobs).

Why not TRL's GRPOTrainer: it generates completions itself from text prompts (``generate`` or
vLLM), scores them as text, and has no place for a search that returns ranked token sequences of
real items whose rank the reward needs; fitting the trie beam search in means overriding its
private generation step (MiniOneRec copies the whole trainer for that), and TRL would be a new
dependency. Instead this is a compact loss on the transformers Trainer, which already gives what
finetune.py relies on: checkpoints that resume at their step with optimizer, scheduler and RNG
state, DDP (gloo on CPU, nccl on GPUs), DeepSpeed, bf16 autocast, callbacks (the learning curve).

Groups whose rewards are all equal (no hit among the G items, for the rule reward) have zero
advantage; they are left out of the backward pass unless ``--keep_flat_groups`` (the loss is still
divided by every rollout, so the policy gradient is unchanged; only their KL term is lost).
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as test.py: steadier on small CPU machines

import torch  # noqa: E402
from torch.utils.data import ConcatDataset  # noqa: E402
from transformers import DynamicCache, Trainer  # noqa: E402
from transformers.trainer_callback import ProgressCallback  # noqa: E402

import data  # noqa: E402
import prompt  # noqa: E402
from arguments import check_index_lr, parse_args, parse_list  # noqa: E402
from checkpoint_record import check_checkpoint  # noqa: E402
from collator import TestCollator  # noqa: E402
from evaluation import prompt_budget  # noqa: E402
from finetune import (add_learning_curve, first_index_row, init_distributed, log, resume_arg,  # noqa: E402
                      train_or_finish, training_arguments, with_index_lr)
from learning_curve import LearningCurve  # noqa: E402
from modeling import keeps_logits  # noqa: E402
from prompt import prompt_set  # noqa: E402
from generation import (Decoder, last_logits_only, prompt_position_ids, response_logprobs, scoring_softmax,  # noqa: E402
                        takes_cache, trie_beam_search, trie_sample)
from utils import DataError, check_writable, exit_on_data_error, set_seed  # noqa: E402

RL_TASKS = ("seqrec", "fusionseqrec", "itemsearch")  # the tasks with templates whose response is an item


# --------------------------------------------------------------------------- rewards
# A reward maps hit [prompts, G] (True where the rolled-out item is the held-out one; columns in
# rank order, best first) to rewards [prompts, G].
def rule_reward(hit: torch.Tensor) -> torch.Tensor:
    """1 for the held-out item, 0 for every other."""
    return hit.float()


def rank_reward(hit: torch.Tensor) -> torch.Tensor:
    """MiniOneRec's rank-aware penalty: in a group that holds the held-out item, every other item at
    rank k (0 = best) gets -(1 / log2(k + 2)) / sum_j 1 / log2(j + 2) over the group's G ranks (the
    penalties of a whole group add up to -1), so a wrong item ranked high costs more; the held-out
    item gets 0, and a group without it gets 0 everywhere."""
    G = hit.shape[-1]
    discount = 1.0 / torch.log2(torch.arange(G, dtype=torch.float32, device=hit.device) + 2)  # [G]
    penalty = -discount / discount.sum()
    return torch.where(hit.any(-1, keepdim=True) & ~hit, penalty, torch.zeros_like(penalty))


def ndcg_reward(hit: torch.Tensor) -> torch.Tensor:
    """1 / log2(k + 2) for the held-out item at rank k, 0 for the others (a graded hit)."""
    G = hit.shape[-1]
    discount = 1.0 / torch.log2(torch.arange(G, dtype=torch.float32, device=hit.device) + 2)
    return hit.float() * discount


def cooccurrence_reward(hit: torch.Tensor, count_logq: torch.Tensor) -> torch.Tensor:
    """The log-probability of each rolled-out item under the item co-occurrence count after the
    prompt's history (``count_logq`` [prompts, G], ``item_teacher.CooccurrenceRanker`` at the
    ``--fusion_*`` defaults), whether or not it is the held-out item. The policy that maximises this
    reward minus beta x KL to the reference is the reference times q ** (1 / beta), a shallow fusion
    of the count with the model (the group normalisation changes the effective weight): the reward
    teaches the model itself what fusion adds at decoding. Every group carries a signal, not only
    those that hold the held-out item."""
    return count_logq


cooccurrence_reward.needs_count = True  # total_reward hands it the count's log-probabilities

REWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "rule": rule_reward, "rank": rank_reward, "ndcg": ndcg_reward, "cooccurrence": cooccurrence_reward,
}


def parse_rewards(names: str, weights: str) -> list[tuple[Callable, float]]:
    """--rewards / --reward_weights -> [(reward, weight)]; one clear error per bad flag."""
    names_ = parse_list(names, str, "--rewards")
    unknown = [n for n in names_ if n not in REWARDS]
    if not names_ or unknown:
        raise DataError(f"--rewards: {unknown or names!r} unknown; expected comma-separated names from {list(REWARDS)}")
    weights_ = parse_list(weights, float, "--reward_weights") or [1.0] * len(names_)
    if len(weights_) != len(names_):
        raise DataError(f"--reward_weights: {len(weights_)} weights for {len(names_)} rewards ({names}); "
                        "expected one weight per reward")
    return [(REWARDS[n], w) for n, w in zip(names_, weights_)]


def needs_count(rewards: list[tuple[Callable, float]]) -> bool:
    return any(getattr(fn, "needs_count", False) for fn, _ in rewards)


def total_reward(hit: torch.Tensor, rewards: list[tuple[Callable, float]],
                 count_logq: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted sum of the rewards [prompts, G]; ``count_logq`` for those that read the count."""
    return sum(w * (fn(hit, count_logq) if getattr(fn, "needs_count", False) else fn(hit)) for fn, w in rewards)


# --------------------------------------------------------------------------- the objective
def group_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """rewards [prompts, G] -> (reward - group mean) / (group std + eps), over the ``valid`` items of
    each group (std with Bessel's correction, as GRPO); 0 where not valid."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = (rewards * valid).sum(-1, keepdim=True) / n
    var = (((rewards - mean) * valid) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    return torch.where(valid, (rewards - mean) / (var.sqrt() + eps), torch.zeros_like(rewards))


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate exp(r - p) - (r - p) - 1 (>= 0; zero, with zero gradient, where the
    policy's log-probability p equals the reference's r)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, ref_logp: torch.Tensor | None,
              beta: float, epsilon: float, denominator: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy objective and the KL term on per-token log-probabilities [rows, tokens]
    (``old_logp`` from the model that rolled out; ``advantages`` [rows]), as a loss to minimise:
    the mean over tokens of each row, summed over rows and divided by ``denominator`` (default:
    the rows). Returns (loss, {"kl", "clip_fraction"})."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    per_token = -objective
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta:
        kl = kl_to_reference(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = per_token.mean(-1).sum() / (denominator if denominator is not None else max(len(logp), 1))
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    return loss, {"kl": kl.mean().item(), "clip_fraction": clipped.float().mean().item()}


# --------------------------------------------------------------------------- data
class RolloutCollator:
    """Training items {"prompt", "response"} -> left-padded prompts and the held-out items' index
    token ids ``target_ids`` [B, L] (prompts cut as test.py cuts them)."""

    def __init__(self, tokenizer, index_len: int, max_prompt_length: int | None):
        self.collate, self.tokenizer, self.index_len = TestCollator(tokenizer, max_prompt_length), tokenizer, index_len

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor | list]:
        encodings, _ = self.collate([{"prompt": b["prompt"], "target": b["response"]} for b in batch])
        targets = [self.tokenizer(b["response"], add_special_tokens=False)["input_ids"] for b in batch]
        bad = [b["response"] for b, t in zip(batch, targets) if len(t) != self.index_len]
        if bad:
            raise DataError(f"response {bad[0]!r} is not one item index of {self.index_len} tokens; "
                            "--rl_tasks takes only item-output templates")
        extra = {"history": [b["history"] for b in batch]} if all("history" in b for b in batch) else {}
        return {**encodings, "target_ids": torch.tensor(targets, dtype=torch.long), **extra}


class WithHistory(torch.utils.data.Dataset):
    """A training task dataset whose items also carry the example's history (item ids, oldest
    first), which the co-occurrence reward reads."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        p, r, ex = self.dataset.render(idx)  # once: a template may be drawn at random
        return {"prompt": p, "response": r, "history": [str(i) for i in ex.get("history", [])]}


def rl_datasets(args: argparse.Namespace, with_history: bool = False) -> ConcatDataset:
    """The item-output training prompts of --rl_tasks: every item-output template of a task is a
    dataset of its own (fusionseqrec also has title-output templates, left out here); with
    ``with_history`` each item also carries its history's item ids."""
    tasks = [t.lower() for t in parse_list(args.rl_tasks, str, "--rl_tasks")]
    unknown = [t for t in tasks if t not in RL_TASKS]
    if not tasks or unknown:
        raise DataError(f"--rl_tasks: {unknown or args.rl_tasks!r} not usable; expected names from {list(RL_TASKS)}")
    if args.rl_sample_num < 0:
        raise DataError(f"--rl_sample_num: {args.rl_sample_num} is negative; expected a count >= 0 (0 = all)")
    parts = []
    for task in tasks:
        ids = prompt.item_output_ids(task)
        if len(ids) == len(prompt.TEMPLATES[task]):  # every template: one template drawn per example
            parts.append(data.TASK_DATASETS[task](args, "train", prompt_sample_num=1, sample_num=args.rl_sample_num))
        else:
            parts += [data.TASK_DATASETS[task](args, "train", sample_num=args.rl_sample_num, prompt_id=i) for i in ids]
    parts = [WithHistory(p) if with_history else p for p in parts if len(p)]
    if not parts:
        raise DataError(f"--rl_tasks {args.rl_tasks}: no training examples in {Path(args.data_path) / args.dataset}")
    return ConcatDataset(parts)


# --------------------------------------------------------------------------- the trainer
class GRPOTrainer(Trainer):
    """A Trainer whose loss rolls out, rewards and scores groups of items (see the module's docstring)."""

    def __init__(self, *args, decoder: Decoder, ref_model, rewards: list[tuple[Callable, float]],
                 rl_args: argparse.Namespace, count=None, **kwargs):
        """``count``: the item co-occurrence ranker (``item_teacher.CooccurrenceRanker``) where a reward reads it."""
        super().__init__(*args, **kwargs)
        self.decoder, self.ref_model, self.rewards, self.rl, self.count = decoder, ref_model, rewards, rl_args, count
        self.buffer: dict[int, dict] = {}  # micro-batch -> its rollouts, reused for --num_iterations steps
        self.micro = 0
        self.stats: dict[str, list[float]] = defaultdict(list)

    @torch.no_grad()
    def rollout(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G items per prompt from the current model, their rewards and advantages, in rank order."""
        G, trie, eos = self.rl.num_generations, self.decoder.trie, self.decoder.eos_token_id
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        was_training = model.training
        model.eval()
        try:
            if self.rl.rollout == "beam":
                tokens, scores = trie_beam_search(model, trie, ids, mask, G, eos, self.decoder.softmax)
            else:
                tokens, scores = trie_sample(model, trie, ids, mask, G, eos, self.decoder.softmax, self.rl.temperature)
                scores, order = scores.sort(-1, descending=True)  # rank the draws as beams are ranked
                tokens = tokens.gather(1, order[..., None].expand_as(tokens))
        finally:
            model.train(was_training)
        valid = torch.isfinite(scores)  # beams with no item left to reach score -inf
        hit = (tokens == inputs["target_ids"][:, None]).all(-1) & valid  # [B, G]
        rewards = total_reward(hit, self.rewards, self.count_logq(inputs, tokens, valid) if self.count else None)
        advantages = group_advantages(rewards, valid)
        self.stats["reward"].append(rewards[valid].mean().item())
        self.stats["hit_rate"].append(hit.any(-1).float().mean().item())
        self.stats["target_rank1"].append(hit[:, 0].float().mean().item())
        return {"tokens": tokens, "valid": valid, "rewards": rewards, "advantages": advantages}

    def count_logq(self, inputs: dict, tokens: torch.LongTensor, valid: torch.Tensor) -> torch.Tensor:
        """log q(item) [B, G] of the rolled-out items ``tokens`` [B, G, L] under the co-occurrence count
        after each prompt's history (0 where a beam reached no item)."""
        position = self.decoder.position_of
        histories = [[position[i] for i in h if i in position] for h in inputs["history"]]
        q = self.count.next_item(histories).to(tokens.device)  # [B, N]
        rows = tokens.tolist()
        items = torch.tensor([[position.get(self.decoder.item_of.get(tuple(t), ""), -1) for t in row] for row in rows],
                             device=tokens.device)  # [B, G], -1: no item
        logq = q.gather(1, items.clamp(min=0)).clamp(min=1e-30).log()
        return torch.where(valid & (items >= 0), logq, torch.zeros_like(logq))

    def item_logprobs(self, model, inputs: dict[str, torch.Tensor], tokens: torch.LongTensor,
                      rows: torch.LongTensor) -> torch.Tensor:
        """Per-token log-probabilities [N, L + 1] under ``model`` of the index tokens and EOS of the
        rolled-out items ``tokens`` [B x G, L] at the kept ``rows`` [N], after their prompts.

        Each prompt runs once (with its gradient) and its key/value cache is shared by its kept rows,
        which then run only their L index tokens: G times less work on the prompt than running
        every prompt + item sequence whole (the fallback, for models that take no cache, such as a
        LoRA-wrapped one, and under --gradient_checkpointing, which turns the cache off)."""
        tokens, prompt_of = tokens[rows], rows // self.rl.num_generations
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        L = tokens.shape[1]
        base = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model  # DDP: the module
        if not takes_cache(base) or getattr(base, "is_gradient_checkpointing", False):  # no cache while checkpointing
            return self.whole_sequence_logprobs(model, ids[prompt_of], mask[prompt_of], tokens)
        used, row_prompt = prompt_of.unique(return_inverse=True)  # the prompts with kept rows; each row's
        ids, mask = ids[used], mask[used]
        # generation.prefill's forward, through the (DDP) wrapper so that the gradient synchronises
        out = model(input_ids=ids, attention_mask=mask, position_ids=prompt_position_ids(mask),
                    cache=DynamicCache(config=base.config), use_cache=True, **last_logits_only(base, ids.shape[1]))
        first = out.logits[:, -1][row_prompt]  # [N, vocab]: predicts each item's first index token
        cache = out.cache
        cache.reorder_cache(row_prompt)  # one copy of its prompt's keys/values per row (differentiable)
        positions = prompt_position_ids(mask)[:, -1:][row_prompt] + 1 + torch.arange(L, device=ids.device)
        row_mask = torch.cat([mask[row_prompt], mask.new_ones(len(rows), L)], 1)
        rest = model(input_ids=tokens, attention_mask=row_mask, position_ids=positions, cache=cache,
                     use_cache=True).logits  # [N, L, vocab]: the later index tokens and EOS
        logits = torch.cat([first[:, None], rest], 1)
        return response_logprobs(logits, tokens, self.decoder.trie, self.decoder.eos_token_id, self.decoder.softmax)

    def whole_sequence_logprobs(self, model, prompt_ids, prompt_mask, tokens) -> torch.Tensor:
        """The same, running each prompt + item + EOS sequence whole (left padded)."""
        L = tokens.shape[1]
        eos = torch.full_like(tokens[:, :1], self.decoder.eos_token_id)
        input_ids = torch.cat([prompt_ids, tokens, eos], 1)
        attention_mask = torch.cat([prompt_mask, torch.ones_like(tokens), torch.ones_like(eos)], 1)
        base = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        extra = {"logits_to_keep": L + 2} if keeps_logits(base) else {}
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=prompt_position_ids(attention_mask),
                       use_cache=False, **extra).logits[:, -(L + 2):-1]  # positions predicting the L + 1 tokens
        return response_logprobs(logits, tokens, self.decoder.trie, self.decoder.eos_token_id, self.decoder.softmax)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        key = self.micro % self.args.gradient_accumulation_steps
        self.micro += 1
        fresh = self.state.global_step % self.rl.num_iterations == 0 or key not in self.buffer
        if fresh:
            self.buffer[key] = {"inputs": inputs, "ro": self.rollout(unwrapped, inputs)}
        inputs, ro = self.buffer[key]["inputs"], self.buffer[key]["ro"]
        valid, adv = ro["valid"].flatten(), ro["advantages"].flatten()
        informative = ro["rewards"].amax(-1) > ro["rewards"].amin(-1)  # [B]: groups with a learning signal
        keep = valid & (self.rl.keep_flat_groups | informative.repeat_interleave(self.rl.num_generations))
        rows = keep.nonzero().flatten()
        weight = 1.0
        if len(rows) == 0:  # nothing to learn here: one row at weight 0 keeps every process's backward in step
            rows, weight = valid.nonzero().flatten()[:1], 0.0
        logp = self.item_logprobs(model, inputs, ro["tokens"].flatten(0, 1), rows)
        if fresh:  # the model that rolled out is this one: its log-probabilities are the "old" ones
            ro["old_logp"] = torch.full((len(valid), logp.shape[1]), float("nan"), device=logp.device)
            ro["old_logp"][rows] = logp.detach()
            if self.ref_model is not None and self.rl.beta:
                with torch.no_grad():
                    ro["ref_logp"] = torch.zeros_like(ro["old_logp"])
                    ro["ref_logp"][rows] = self.item_logprobs(self.ref_model, inputs, ro["tokens"].flatten(0, 1), rows)
        ref = ro.get("ref_logp")
        loss, stats = grpo_loss(logp, ro["old_logp"][rows], adv[rows], None if ref is None else ref[rows],
                                self.rl.beta, self.rl.epsilon, denominator=max(int(valid.sum()), 1))
        for name, value in stats.items():
            self.stats[name].append(value)
        loss = loss * weight
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs plus the means of the rollout statistics since the last log."""
        if self.stats and "loss" in logs:
            logs = {**logs, **{k: round(sum(v) / len(v), 4) for k, v in self.stats.items() if v}}
            self.stats.clear()
        super().log(logs, start_time)


class CurveFromStart(LearningCurve):
    """The learning curve, with a first point at step 0: the fine-tuned model the stage starts from."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        if self.every and state.global_step == 0:
            self.score(model, state)


class RewardProgress(ProgressCallback):
    """The Trainer's progress bar, with the latest reward and KL beside it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "reward" in logs:
            self.training_bar.set_postfix(reward=f"{logs['reward']:.3f}", kl=f"{logs.get('kl', 0.0):.4f}",
                                          hit=f"{logs.get('hit_rate', 0.0):.2f}", refresh=False)
        super().on_log(args, state, control, logs=logs, **kwargs)


# --------------------------------------------------------------------------- loading and running
def load_policy_and_reference(args: argparse.Namespace, indices: dict[str, list[str]]):
    """(policy to train, frozen reference or None when --beta is 0, tokenizer). A LoRA checkpoint
    trains its adapter further; its reference is the merged fine-tuned model."""
    from transformers import AutoModelForCausalLM

    from modeling import check_vocab, load_for_inference, load_tokenizer

    if not args.ckpt_path:
        raise DataError("--ckpt_path is required: the fine-tuned checkpoint folder (or the LoRA adapter with --lora)")
    reference = None
    if args.beta:
        reference, _ = load_for_inference(args.ckpt_path, indices, lora=args.lora, base_model=args.base_model)
        reference.requires_grad_(False)
    if args.lora:
        from peft import PeftModel

        if not args.base_model:
            raise DataError("--lora needs --base_model (the model the adapter was trained on)")
        tokenizer = load_tokenizer(args.ckpt_path)
        model = AutoModelForCausalLM.from_pretrained(args.base_model)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
        model = PeftModel.from_pretrained(model, args.ckpt_path, is_trainable=True)
        check_vocab(model, tokenizer, args.ckpt_path)
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model, tokenizer = load_for_inference(args.ckpt_path, indices)
    return model.train(), reference, tokenizer


def check_reinforce_args(args: argparse.Namespace) -> None:
    if args.beta < 0:
        raise DataError(f"--beta: {args.beta} is negative; expected a KL weight >= 0")
    if not 0 < args.epsilon < 1:
        raise DataError(f"--epsilon: {args.epsilon}; expected a clipping range between 0 and 1")
    if args.num_generations < 2:
        raise DataError(f"--num_generations: {args.num_generations}; a group needs at least 2 items to compare")
    if not args.temperature > 0:
        raise DataError(f"--temperature: {args.temperature}; expected a positive temperature")
    check_index_lr(args)
    if args.index_lr is not None and args.lora:
        raise DataError("--index_lr is not supported with --lora (it trains the index-token rows of the whole "
                        "embedding matrix); leave one of them out")
    if args.deepspeed:
        from dataset_files import load_json

        config = load_json(args.deepspeed, "DeepSpeed config")
        if (config.get("zero_optimization") or {}).get("stage") == 3:
            # ZeRO-3 partitions every weight at load time: the frozen reference (no engine of its own) and
            # the checks on the loaded model would see empty tensors
            raise DataError(f"--deepspeed {args.deepspeed}: ZeRO stage 3 is not supported by reinforce.py (the "
                            "reference model and the rollouts need whole weights on every process); use stage 2, "
                            "e.g. config/ds_z2_bf16.json, or plain DDP")


def run(args: argparse.Namespace) -> None:
    set_seed(args.seed)
    check_reinforce_args(args)
    rewards = parse_rewards(args.rewards, args.reward_weights)
    check_writable(args.output_dir, "--output_dir", is_dir=True)
    init_distributed(args)
    training_args = training_arguments(
        args, eval_strategy="no", load_best_model_at_end=False, metric_for_best_model=None,
        max_grad_norm=args.max_grad_norm, include_num_input_tokens_seen="no")
    indices = data.load_item_indices(args)
    # before the weights load: prompt settings from the checkpoint (a flag given by hand wins), its index checked
    check_checkpoint(args, indices, prompt_set(args), log)
    if args.rollout == "beam" and args.num_generations > len(indices):
        raise DataError(f"--num_generations {args.num_generations} is larger than the number of items ({len(indices)})")
    train_set = rl_datasets(args, with_history=needs_count(rewards))
    log(f"reinforcement prompts: {len(train_set)} ({args.rl_tasks}); {args.num_generations} items each "
        f"by {args.rollout}")
    model, reference, tokenizer = load_policy_and_reference(args, indices)
    device = training_args.device
    if reference is not None:
        reference.to(device)
    # the checkpoint's scoring (its --index_softmax and --index_prior): rollouts, log-probabilities and the curve
    args.index_softmax = getattr(model.config, "index_softmax", "none") or "none"
    args.index_prior = getattr(model.config, "index_prior", "none") or "none"
    from item_prior import item_prior

    decoder = Decoder.build(tokenizer, indices, device=device, softmax=scoring_softmax(args.index_softmax),
                            prior=item_prior(args.index_prior, args, indices))
    collate = RolloutCollator(tokenizer, decoder.trie.index_len,
                              prompt_budget(args.model_max_length, decoder.trie.index_len))
    count = None
    if needs_count(rewards):  # the co-occurrence reward's count, at the --fusion_* defaults
        from item_teacher import CooccurrenceRanker

        count = CooccurrenceRanker.build(data.load_files(args).inters, list(decoder.position_of))
    trainer_class, extra = GRPOTrainer, {}
    if args.index_lr is not None:  # the index-token rows at their own rate, the pretrained rows held (as fine-tuning)
        trainer_class = with_index_lr(GRPOTrainer)
        extra = {"index_lr": args.index_lr, "first_index_row": first_index_row(tokenizer, indices)}
    trainer = trainer_class(model=model, args=training_args, train_dataset=train_set, data_collator=collate,
                            processing_class=tokenizer, decoder=decoder, ref_model=reference, rewards=rewards,
                            rl_args=args, count=count, **extra)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(RewardProgress)
    if args.curve_steps:
        add_learning_curve(trainer, args, tokenizer, CurveFromStart)
    what = f"reinforced {'adapter' if args.lora else 'model'}"
    if train_or_finish(trainer, args, resume_arg(args.resume_from_checkpoint, args.output_dir), what):
        log(f"saved the {what} and tokenizer to {args.output_dir}")


def main(argv: list[str] | None = None) -> None:
    run(parse_args("reinforce", argv, description=__doc__.split("\n")[0]))


if __name__ == "__main__":
    with exit_on_data_error():
        main()
