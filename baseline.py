"""Count baselines on exactly the test examples LC-Rec is scored on: popularity and item co-occurrence.

    python baseline.py --dataset ml-100k --data_path data --results_file results/popularity.json \
        [--ranker popularity|cooccurrence] [--test_task seqrec] [--test_prompt_ids 0] [--sample_num 100]

popularity (default): items ranked by how often they occur in the training part of every user's
sequence (all but the last two items, so neither validation nor test items are counted; ties go
to the smaller item id). cooccurrence: per user, the items that followed the last
--fusion_context items of the history within --fusion_window steps in those training parts, the
newer context items weighed more (--fusion_decay), popular followers damped (--fusion_damping),
smoothed with popularity (item_teacher.CooccurrenceRanker, the ranker --fusion_weight fuses with
LC-Rec's beams). As for LC-Rec, no item is removed from the ranking because the user has seen it. It
takes the flags of test.py (one parser) and writes results in the same JSON format.
"""
from __future__ import annotations

import argparse

import data
from arguments import cooccurrence_settings, parse_args
from dataset_files import held_out
from item_prior import popularity_ranking
from metrics import (aggregate, compute_metrics, format_table, max_k, parse_metrics, per_user_values,
                     personalisation, standard_errors, target_rank)
from prompt import prompt_set
from utils import DataError, check_writable, exit_on_data_error, write_results


def evaluate_popularity(args: argparse.Namespace) -> dict:
    check_writable(args.results_file, "--results_file")
    metrics = parse_metrics(args.metrics)
    files = data.load_files(args)
    item_of_index = {files.index_str(item): item for item in files.indices}
    top = popularity_ranking(files.inters)[: max_k(metrics)]
    if args.ranker == "cooccurrence":
        from item_teacher import CooccurrenceRanker

        items = list(files.indices)
        ranker = CooccurrenceRanker.build(files.inters, items, **cooccurrence_settings(args))
        position = {item: k for k, item in enumerate(items)}
        users = list(files.inters)
        histories = [[position[str(i)] for i in held_out(files.inters[u], "test")[0] if str(i) in position]
                     for u in users]
        best = ranker.next_item(histories).topk(max_k(metrics), dim=1).indices  # [users, K]
        top_of = {u: [items[k] for k in row] for u, row in zip(users, best.tolist())}

    per_prompt: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    personal: dict[str, dict[str, float]] = {}
    n_examples, users, rank_lists = 0, None, []
    for pid in data.resolve_prompt_ids(args.test_prompt_ids, args.test_task, prompt_set(args)):
        dataset = data.load_test_dataset(args, args.test_task, pid)
        if len(dataset) == 0:
            raise DataError(f"{args.test_task} prompt {pid}: the test set of {args.dataset} is empty")
        tops = [top if args.ranker == "popularity" else top_of[str(dataset[i]["user"])] for i in range(len(dataset))]
        ranks = [target_rank(t, item_of_index[dataset[i]["target"]]) for i, t in enumerate(tops)]
        per_prompt[str(pid)] = compute_metrics(ranks, metrics)
        stderr[str(pid)] = standard_errors(ranks, metrics)
        personal[str(pid)] = personalisation(tops)
        users = users or [dataset[i]["user"] for i in range(len(dataset))]
        rank_lists.append(ranks)
        n_examples = len(ranks)
    summary = aggregate(per_prompt, metrics)
    results = {"dataset": args.dataset, "test_task": args.test_task, "model": args.ranker,
               **({"cooccurrence": cooccurrence_settings(args)} if args.ranker == "cooccurrence" else {}),
               "sample_num": args.sample_num, "metrics": metrics, "prompt_ids": [int(p) for p in per_prompt],
               "num_examples": n_examples, "per_prompt": per_prompt, "stderr": stderr,
               "personalisation": personal, **summary, "per_user": per_user_values(users, rank_lists, metrics)}
    write_results(results, args.results_file, format_table(per_prompt, summary, metrics, stderr, personal))
    return results


def main() -> None:
    args = parse_args("baseline", description=__doc__.split("\n")[0])
    with exit_on_data_error():
        evaluate_popularity(args)


if __name__ == "__main__":
    main()
