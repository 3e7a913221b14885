"""The evaluation behind test.py and test_ddp.py: argument checks, one shard of every prompt's
test set decoded (generation.Decoder), the metrics, and the results and predictions files.

Sharding is contiguous, one shard per rank, covering every example exactly once; rank 0 gathers
the per-example records, so the metrics do not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm
from transformers import GenerationConfig

import data
from arguments import TEST_TASKS, cooccurrence_settings
from checkpoint_record import check_checkpoint
from dataset_files import dataset_file, held_out
from generation import Decoder, rank_batch_with_backoff, scoring_softmax
from metrics import (aggregate, compute_metrics, format_table, max_k, parse_metrics, per_user_values,
                     personalisation, standard_errors, target_rank)
from prompt import PromptSet, prompt_set
from utils import (DataError, check_writable, cpu_autocast_bf16, default_dtype, get_device, set_seed,
                   write_jsonl_atomic, write_results)

log = logging.getLogger("lcrec.eval")


def check_test_args(args: argparse.Namespace) -> None:
    """Cheap checks before any model is loaded (the decoding options are the parser's)."""
    args.test_task = str(args.test_task).strip().lower()  # case-insensitive, as in the original
    if args.test_task not in TEST_TASKS:
        raise DataError(f"--test_task: unknown test task {args.test_task!r}; expected one of {list(TEST_TASKS)}")
    if not args.ckpt_path:
        raise DataError("--ckpt_path is required: the fine-tuned checkpoint folder (or the LoRA adapter with --lora)")


def checkpoint_softmax(choice: str, model, mode: str = "trie", search: str = "trie") -> str:
    """``--score_softmax``: ``auto`` follows the checkpoint (``index_softmax`` in its config.json,
    written by finetune.py --index_softmax); full, level or trie force one. Only the trie search
    (``mode`` and ``search`` "trie") scores with a softmax other than full: ``auto`` under the
    position or no constraint (which have no trie to normalise over) scores with the full one."""
    if choice == "auto":
        choice = scoring_softmax(getattr(model.config, "index_softmax", "none"))
        if choice != "full" and mode != "trie":
            log.warning("decoding %s: the checkpoint's --index_softmax %s needs the trie; its beams are scored "
                        "with the full softmax", mode, choice)
            return "full"
    if choice != "full" and (mode, search) != ("trie", "trie"):
        raise DataError(f"--score_softmax {choice} (a model trained with --index_softmax {choice}) needs the "
                        "trie search: --decoding trie --beam_search trie, or --score_softmax full")
    return choice


def checkpoint_prior(choice: str, model, args: argparse.Namespace, indices: dict,
                     inters: dict[str, list[int]] | None = None) -> dict[str, float] | None:
    """``--score_prior``: the item weights to add to the beam scores, or None. ``auto`` follows the
    checkpoint (``index_prior`` in its config.json, written by finetune.py --index_prior); the
    weights are recomputed from the training part of the dataset being scored, as training did."""
    from item_prior import item_prior

    if choice == "auto":
        choice = getattr(model.config, "index_prior", "none") or "none"
    return item_prior(choice, args, indices, inters)


def prompt_budget(model_max_length: int, index_len: int) -> int:
    """Prompt tokens kept at test time: prompts are cut as in training, leaving room for the
    index and its EOS."""
    budget = model_max_length - index_len - 1
    if budget < 1:
        raise DataError(f"--model_max_length {model_max_length} leaves no room for a prompt before "
                        f"an index of {index_len} tokens")
    return budget


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous shard of ``range(n)`` for ``rank``: shards cover every index exactly once."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def evaluate_prompt(model, tokenizer, dataset, decoder: Decoder, metrics: list[str], positions: Sequence[int], *,
                    batch_size: int, num_beams: int, oom_backoff: bool = False, desc: str = "", show: bool = True,
                    max_prompt_length: int | None = None, exclude: dict[str, list[str]] | None = None,
                    histories: dict[str, list[str]] | None = None) -> list[dict]:
    """Score ``dataset[i]`` for i in ``positions``, ``batch_size`` prompts at a time with
    ``num_beams`` beams; one record per example (its position, the target item, its rank, the
    ranked items and scores, whether its prompt was cut to ``max_prompt_length`` tokens).
    ``exclude``: user -> items the search leaves out of that user's ranking (--exclude_history).
    ``histories``: user -> the items of that user's history, oldest first (--fusion_weight)."""
    from collator import TestCollator

    collate = TestCollator(tokenizer, max_prompt_length)
    device = next(model.parameters()).device
    records: list[dict] = []
    backoffs: list[tuple[int, int]] = []
    positions = list(positions)
    bar = tqdm(range(0, len(positions), batch_size), desc=desc, dynamic_ncols=True,
               disable=not show or len(positions) == 0)
    for start in bar:
        chunk = positions[start:start + batch_size]
        batch = [dataset[i] for i in chunk]
        encodings, targets = collate(batch)
        encodings = {k: v.to(device) for k, v in encodings.items()}
        ranked, beams = rank_batch_with_backoff(decoder, model, encodings, num_beams, oom_backoff,
                                                on_backoff=lambda old, new: backoffs.append((old, new)),
                                                exclude=None if exclude is None else
                                                [exclude.get(str(ex.get("user")), []) for ex in batch],
                                                histories=None if histories is None else
                                                [histories.get(str(ex.get("user")), []) for ex in batch])
        for pos, example, target, items, cut in zip(chunk, batch, targets, ranked, collate.last_cut):
            target_item = decoder.item_of_string(target)
            names = [i for i, _ in items]
            records.append({"position": pos, "user": example.get("user"), "target": target,
                            "target_item": target_item, "rank": target_rank(names, target_item) if target_item else 0,
                            "items": names, "scores": [round(s, 6) for _, s in items], "beams": beams,
                            "prompt_cut": cut})
        running = compute_metrics([r["rank"] for r in records], metrics)
        bar.set_postfix({m: f"{v:.4f}" for m, v in running.items() if m in (metrics[0], metrics[-1])})
    return records


DECODING_LABELS = {
    "trie": "Decoding trie: beam search over the real items' indices only (this repository's decoding)",
    "position": "Decoding position: any token seen at each index position (the original LC-Rec rule); "
                "a beam that spells no item is a miss",
    "none": "Decoding none: unconstrained; a beam that spells no item is a miss",
}


def decoding_results_file(results_file: str | Path, modes: Sequence[str], mode: str) -> Path:
    """Where ``mode``'s results go: ``--results_file`` for the first decoding of ``--decoding``,
    ``<stem>_<mode><suffix>`` beside it for each other one (results/lcrec_position.json)."""
    p = Path(results_file)
    return p if mode == modes[0] else p.with_name(f"{p.stem}_{mode}{p.suffix}")


def evaluate_checkpoint(args: argparse.Namespace, rank: int = 0, world_size: int = 1,
                        gather: Callable[[list], list[list]] | None = None) -> dict | None:
    """The whole evaluation: load once, then for each decoding of ``--decoding`` decode every
    prompt id and score. With ``world_size`` > 1 this rank scores its shard and ``gather``
    (all_gather_object) brings every shard to rank 0, which computes the metrics and writes the
    files. Returns the first decoding's results on rank 0."""
    from modeling import cast_linear_weights, load_for_inference, pack_linear_weights

    check_test_args(args)
    modes = list(args.decoding)
    files = {mode: decoding_results_file(args.results_file, modes, mode) for mode in modes}
    if rank == 0:
        for path in files.values():
            check_writable(path, "--results_file")
    metrics = parse_metrics(args.metrics)
    prompts = prompt_set(args)
    prompt_ids = data.resolve_prompt_ids(args.test_prompt_ids, args.test_task, prompts)
    indices = data.load_item_indices(args)
    # before the weights load: prompt settings from the checkpoint, its index and templates checked
    check_checkpoint(args, indices, prompts, log.warning if rank == 0 else (lambda _: None))
    if args.num_beams > len(indices):
        raise DataError(f"--num_beams {args.num_beams} is larger than the number of items ({len(indices)} in "
                        f"{dataset_file(args.data_path, args.dataset, args.index_file)}); beam search "
                        "cannot return that many distinct items")
    if args.num_beams < max_k(metrics):
        log.warning("--num_beams %d is below the largest K in --metrics (%d): items past rank %d count as misses",
                    args.num_beams, max_k(metrics), args.num_beams)

    device = get_device(args.gpu_id if world_size == 1 else None)
    model, tokenizer = load_for_inference(args.ckpt_path, indices, dtype=default_dtype(device), device=device,
                                          lora=args.lora, base_model=args.base_model)
    # generate() fills unset fields from the checkpoint's generation_config.json (sampling, penalties);
    # scoring must not depend on them
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    # every decoder is built before any is run: a decoding the checkpoint cannot use fails at once
    # (the popularity prior of --score_prior auto is for the trie only, as its softmax)
    fusion_inters = data.load_files(args).inters if args.fusion_weight > 0 else None
    decoders = [Decoder.build(tokenizer, indices, mode, args.filter_items, device,
                              share_prefill=not args.no_share_prefill, search=args.beam_search, tree=not args.copy_prompt_cache,
                              softmax=checkpoint_softmax(args.score_softmax, model, mode, args.beam_search),
                              prior=checkpoint_prior("none" if mode != "trie" and args.score_prior == "auto"
                                                     else args.score_prior, model, args, indices),
                              fusion_inters=fusion_inters, fusion_weight=args.fusion_weight,
                              fusion_settings=cooccurrence_settings(args))
                for mode in modes]
    autocast = cpu_autocast_bf16(device, args.cpu_bf16)
    if autocast and rank == 0:
        log.info("decoding under bf16 autocast on the CPU (--cpu_bf16 %s); beam scores stay fp32", args.cpu_bf16)
    if autocast and not args.no_pack_weights:  # autocast's weight casts made once, laid out for oneDNN: same scores
        cast_linear_weights(model, torch.bfloat16)
        pack_linear_weights(model, rows=args.num_beams)
    results = [evaluate_decoding(args, model, tokenizer, decoder, prompts, prompt_ids, files[decoder.mode], autocast,
                                 rank, world_size, gather, label=DECODING_LABELS[decoder.mode] if len(modes) > 1 else "")
               for decoder in decoders]
    return results[0]


def evaluate_decoding(args: argparse.Namespace, model, tokenizer, decoder: Decoder, prompts: PromptSet,
                      prompt_ids: list[int], results_file: Path, autocast: bool, rank: int = 0, world_size: int = 1,
                      gather: Callable[[list], list[list]] | None = None, label: str = "") -> dict | None:
    """Every prompt id decoded with ``decoder`` and scored; rank 0 writes ``results_file`` (and the
    predictions beside it), printing its table under ``label``, and returns the results."""
    metrics = parse_metrics(args.metrics)
    max_prompt_length = prompt_budget(args.model_max_length, decoder.trie.index_len)
    exclude = histories = None
    if getattr(args, "exclude_history", False) or decoder.fusion is not None:
        inters = data.load_files(args).inters
        histories = {user: [str(i) for i in held_out(seq, "test")[0]] for user, seq in inters.items()}
    if getattr(args, "exclude_history", False):  # test.py's option; the paper ranks every item
        exclude = histories
        if rank == 0:
            log.warning("--exclude_history: each user's history is left out of the ranking; NOT the paper's "
                        "protocol, so the metrics do not compare with its tables")
    per_prompt: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    personal: dict[str, dict[str, float]] = {}
    predictions: list[dict] = []
    users: list | None = None
    rank_lists: list[list[int]] | None = []  # per prompt, in test-set order: for the per-user values
    n_examples, reduced, cut = 0, 0, 0
    for pid in prompt_ids:
        set_seed(args.seed)
        dataset = data.load_test_dataset(args, args.test_task, pid)
        if len(dataset) == 0:
            raise DataError(f"{args.test_task} prompt {pid}: the test set of {args.dataset} is empty")
        shard = shard_range(len(dataset), rank, world_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            records = evaluate_prompt(model, tokenizer, dataset, decoder, metrics, shard,
                                      batch_size=args.test_batch_size, num_beams=args.num_beams,
                                      oom_backoff=args.oom_backoff,
                                      desc=f"{args.test_task} prompt {pid} ({decoder.mode})",
                                      show=rank == 0, max_prompt_length=max_prompt_length, exclude=exclude,
                                      histories=histories if decoder.fusion is not None else None)
        if world_size > 1:
            records = [r for part in gather(records) for r in part]
        if rank != 0:
            continue
        records.sort(key=lambda r: r["position"])
        if [r["position"] for r in records] != list(range(len(dataset))):
            raise RuntimeError(f"prompt {pid}: the shards did not cover every test example exactly once")
        per_prompt[str(pid)] = compute_metrics([r["rank"] for r in records], metrics)
        stderr[str(pid)] = standard_errors([r["rank"] for r in records], metrics)
        personal[str(pid)] = personalisation([r["items"] for r in records])
        prompt_users = [r["user"] for r in records]
        users = users or prompt_users
        if rank_lists is not None and prompt_users == users:
            rank_lists.append([r["rank"] for r in records])
        elif rank_lists is not None:  # cannot average per user; keep the rest of the results
            log.warning("prompt %d: its test users differ from the first prompt's; no per-user values", pid)
            rank_lists = None
        n_examples = len(records)
        reduced += sum(r["beams"] < args.num_beams for r in records)
        cut += sum(r["prompt_cut"] for r in records)
        log.info("prompt %d (%s): %s", pid, decoder.mode, {m: round(v, 4) for m, v in per_prompt[str(pid)].items()})
        if args.save_predictions:
            predictions += [{"prompt_id": pid, **r} for r in records]

    if rank != 0:
        return None
    summary = aggregate(per_prompt, metrics)
    results = {
        "dataset": args.dataset, "test_task": args.test_task, "ckpt_path": str(args.ckpt_path),
        "lora": bool(args.lora), "base_model": args.base_model, "index_file": args.index_file,
        "prompt_templates": prompts.source, "prompt_templates_sha256": prompts.sha256,
        **{name: getattr(args, name) for name in ("max_his_len", "his_sep", "add_prefix")},
        "decoding": decoder.mode, "beam_search": decoder.search, "filter_items": bool(args.filter_items), "num_beams": args.num_beams,
        "exclude_history": exclude is not None,
        "fusion_weight": decoder.fusion_weight, "fusion": cooccurrence_settings(args) if decoder.fusion else None,
        "test_batch_size": args.test_batch_size, "sample_num": args.sample_num, "world_size": world_size,
        "cpu_bf16_autocast": autocast,
        "metrics": metrics, "prompt_ids": prompt_ids, "num_examples": n_examples,
        "examples_with_fewer_beams": reduced, "model_max_length": args.model_max_length,
        "prompts_cut": cut, "per_prompt": per_prompt, "stderr": stderr, "personalisation": personal, **summary,
    }
    if rank_lists is not None:
        results["per_user"] = per_user_values(users, rank_lists, metrics)
    table = format_table(per_prompt, summary, metrics, stderr, personal)
    write_results(results, results_file, f"{label}\n{table}" if label else table)
    if args.save_predictions:
        write_jsonl_atomic(predictions, predictions_path(results_file), what="the predictions")
    return results


def predictions_path(results_file: str | Path) -> Path:
    """``results/x.json`` -> ``results/x.predictions.jsonl``."""
    p = Path(results_file)
    return p.with_name(p.stem + ".predictions.jsonl")
