"""How close can an LLM with index tokens get to popularity without reading the history?

A model that ignores the history can only give each index token a fixed logit (a bias). This
script fits those biases by maximum likelihood to the training items (each item weighted by how
often it occurs in the training parts) and ranks every item by the probability the biases give
it, under the two ways this repository scores an item:

  level   an item's log-probability is the sum over its tokens of a softmax over the codes of
          the token's level (full-vocabulary and ``--index_softmax level`` scoring); the best
          biases are each level's code log-frequencies;
  trie    each token's softmax runs over the codes the trie allows after the item's earlier
          tokens (``--index_softmax trie``); fitted with Adam.

It prints, on all test users of the leave-one-out split, HR@10 and NDCG@10 with their standard
errors for popularity and for both bias models, and each model's training loss in nats per item
beside the entropy of the training items (popularity's own loss). A model whose loss is below
the bias models' has learned more than per-token biases; one ranked far below popularity at
this loss is limited by the index, not by training.

    python bench/bench_index_prior.py --data_path runs/ml-100k-SmolLM2-135M-Instruct-quick/data --dataset ml-100k
"""
from __future__ import annotations

import argparse

import torch

import data
from dataset_files import test_item
from item_prior import popularity_ranking, training_item_counts
from item_trie import IndexTrie
from metrics import compute_metrics, standard_errors, target_rank
from utils import exit_on_data_error

METRICS = ["hit@10", "ndcg@10"]


def sibling_codes(trie: IndexTrie, codes: torch.Tensor) -> torch.Tensor:
    """codes [N, L] -> [N, L, C]: the codes the trie allows at each token of each item, padded with -1."""
    levels = []
    for level in range(codes.shape[1]):
        state = trie.states(codes[:, :level])  # [N]
        allowed = trie.allowed[state]  # [N, C]
        real = torch.arange(allowed.shape[1]) < trie.num_children[state][:, None]
        levels.append(allowed.masked_fill(~real, -1))
    return torch.stack(levels, 1)


def trie_log_prob(bias: torch.Tensor, codes: torch.Tensor, siblings: torch.Tensor) -> torch.Tensor:
    """[N] log-probability of each item under per-token biases with the trie softmax."""
    logits = bias[siblings.clamp(min=0)].masked_fill(siblings < 0, float("-inf"))  # [N, L, C]
    return (bias[codes] - logits.logsumexp(-1)).sum(1)


def level_log_prob(bias: torch.Tensor, codes: torch.Tensor, level_tokens: list[torch.Tensor]) -> torch.Tensor:
    """[N] log-probability of each item under per-token biases with a softmax over each level's codes."""
    norm = torch.stack([bias[ids].logsumexp(0) for ids in level_tokens])  # [L]
    return (bias[codes] - norm).sum(1)


def fit_trie_bias(codes: torch.Tensor, weight: torch.Tensor, siblings: torch.Tensor, vocab: int,
                  steps: int = 300) -> torch.Tensor:
    bias = torch.zeros(vocab, requires_grad=True)
    optimizer = torch.optim.Adam([bias], lr=0.1)
    for _ in range(steps):  # convex in the biases: a few hundred full-batch steps converge
        optimizer.zero_grad()
        loss = -(weight * trie_log_prob(bias, codes, siblings)).sum() / weight.sum()
        loss.backward()
        optimizer.step()
    return bias.detach()


def evaluate(ranking: list[str], targets: list[str]) -> str:
    ranks = [target_rank(ranking[:10], t) for t in targets]
    values, errors = compute_metrics(ranks, METRICS), standard_errors(ranks, METRICS)
    return ", ".join(f"{m} {values[m]:.4f} ± {errors[m]:.4f}" for m in METRICS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--index_file", default=".index.json")
    args = p.parse_args()
    files = data.load_files(args)
    items = list(files.indices)
    tokens = sorted({t for toks in files.indices.values() for t in toks})
    number = {t: i for i, t in enumerate(tokens)}
    codes = torch.tensor([[number[t] for t in files.indices[item]] for item in items])  # [N, L]
    trie = IndexTrie(codes.tolist(), eos_token_id=len(tokens))  # codes stand in for token ids
    counts = training_item_counts(files.inters)
    weight = torch.tensor([float(counts.get(item, 0)) for item in items])  # [N]
    share = weight / weight.sum()
    targets = [str(test_item(seq)) for seq in files.inters.values()]

    freq = torch.zeros(len(tokens)).index_add_(0, codes.flatten(), weight.repeat_interleave(codes.shape[1]))
    level_bias = (freq + 1).log()  # the maximum-likelihood level biases (up to a constant per level)
    siblings = sibling_codes(trie, codes)
    trie_bias = fit_trie_bias(codes, weight, siblings, len(tokens))

    def nats(log_prob: torch.Tensor) -> float:
        return float(-(share * log_prob).sum())

    def ranked(log_prob: torch.Tensor) -> list[str]:
        return [items[i] for i in log_prob.argsort(descending=True).tolist()]

    print(f"{args.dataset}: {len(items)} items, {len(tokens)} index tokens, {len(targets)} test users")
    print(f"popularity                 : {evaluate(popularity_ranking(files.inters), targets)}; "
          f"{nats(share.clamp(min=1e-12).log()):.2f} nats per item (the training items' entropy)")
    for name, log_prob in (("level biases (ML)", level_log_prob(level_bias, codes, trie.level_tokens)),
                           ("trie, level biases", trie_log_prob(level_bias, codes, siblings)),
                           ("trie biases (ML, fitted)", trie_log_prob(trie_bias, codes, siblings))):
        print(f"{name:27s}: {evaluate(ranked(log_prob), targets)}; {nats(log_prob):.2f} nats per item")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
