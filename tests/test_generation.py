import copy
import itertools
import math
import random
from types import SimpleNamespace

import pytest
import torch

from fixtures import make_indexed_tiny_model, make_tiny_model, train_tokenizer
from evaluation import checkpoint_softmax, shard_range
from generation import (Decoder, TrieLogitsProcessor, can_share_prefill, position_allowed_tokens_fn,
                        rank_batch_with_backoff)
from item_trie import IndexTrie
from modeling import index_token_ids
from utils import DataError

EOS, PAD = 2, 3


def _brute_force_allowed(seqs, generated):
    """Next tokens allowed after ``generated``, straight from the list of item sequences."""
    L = len(seqs[0])
    if len(generated) > L or (len(generated) == L and tuple(generated) in seqs):
        if len(generated) == L:
            return {EOS}
        return {EOS, PAD} if tuple(generated[:L]) in seqs and all(t in (EOS, PAD) for t in generated[L:]) else {EOS}
    nxt = {s[len(generated)] for s in seqs if list(s[: len(generated)]) == list(generated)}
    return nxt or {EOS}  # an invalid path may only end


def test_trie_masks_exactly_the_allowed_tokens():
    rng = random.Random(0)
    vocab = 60
    # items: 3 levels, level tokens from disjoint id ranges like real index tokens
    seqs = sorted({(10 + rng.randrange(5), 20 + rng.randrange(5), 30 + rng.randrange(5)) for _ in range(40)})
    trie = IndexTrie(seqs, EOS, PAD)
    prompt = torch.tensor([[PAD, PAD, 5, 7, 11, 22, 33]])  # left padded; index tokens in the prompt are ignored
    prefixes = {()} | {s[:k] for s in seqs for k in range(1, 4)}
    prefixes |= {s + (EOS,) for s in seqs} | {s + (EOS, PAD) for s in seqs[:3]}
    prefixes |= {(10, 99), (40,), (10, 21, 99), (EOS,)}  # invalid paths
    prefixes = sorted(prefixes)
    width = max(len(p) for p in prefixes)
    by_len = itertools.groupby(sorted(prefixes, key=len), key=len)
    checked = 0
    for n, group in by_len:
        group = list(group)
        rows = torch.cat([prompt.repeat(len(group), 1), torch.tensor(group, dtype=torch.long).view(len(group), n)], 1)
        scores = torch.randn(len(group), vocab)
        out = TrieLogitsProcessor(trie, prompt.shape[1])(rows, scores)
        assert torch.isfinite(scores).all()  # the input is left untouched (greedy search keeps it as raw logits)
        for r, prefix in enumerate(group):
            allowed = set(torch.nonzero(torch.isfinite(out[r])).flatten().tolist())
            assert allowed == _brute_force_allowed(seqs, list(prefix)), prefix
            assert torch.equal(out[r, sorted(allowed)], scores[r, sorted(allowed)])  # kept scores untouched
            checked += 1
    assert checked == len(prefixes) and width == 5


def test_inplace_trie_processor_writes_the_same_scores_into_its_input():
    seqs = [(10, 20, 30), (10, 21, 31), (11, 22, 32)]
    trie = IndexTrie(seqs, EOS, PAD)
    rows = torch.tensor([[5, 6], [5, 6], [5, 6]])
    rows = torch.cat([rows, torch.tensor([[10], [11], [40]])], 1)  # two valid prefixes, one dead path
    scores = torch.randn(3, 50)
    expected = TrieLogitsProcessor(trie, 2)(rows, scores)
    out = TrieLogitsProcessor(trie, 2, inplace=True)(rows, scores)
    assert out.data_ptr() == scores.data_ptr() and torch.equal(out, expected)
    assert torch.isfinite(out).sum(1).tolist() == [2, 1, 1]


def test_trie_rejects_bad_index():
    with pytest.raises(DataError, match="different lengths"):
        IndexTrie([(10, 20), (10, 20, 30)], EOS)
    with pytest.raises(DataError, match="distinct"):
        IndexTrie([(10, 20), (11, 20), (10, 20)], EOS)
    with pytest.raises(DataError, match="EOS"):
        IndexTrie([(10, EOS)], EOS)


def test_position_baseline_allows_any_token_seen_at_a_position():
    seqs = [(10, 20, 30), (11, 21, 31)]
    fn = position_allowed_tokens_fn(seqs, prompt_len=2, eos_token_id=EOS)
    assert fn(0, torch.tensor([5, 6])) == [10, 11]
    assert fn(0, torch.tensor([5, 6, 10])) == [20, 21]  # (10, 21, ...) is no item but is allowed
    assert fn(0, torch.tensor([5, 6, 10, 21, 30])) == [EOS]


@pytest.fixture(scope="module")
def tiny_indexed():
    """Tokenizer with the index tokens added, a tiny random model and a 24-item index."""
    return make_indexed_tiny_model()


@pytest.fixture(scope="module")
def tie_free_model(tiny_indexed):
    """The tiny model with wide (tied) embeddings: its beam scores have no near-ties, so two
    numerically equivalent decodings must rank the same items."""
    tok, _, indices = tiny_indexed
    model = make_tiny_model(len(tok), seed=3).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    return model


def _encode(tok, texts):
    tok.padding_side = "left"
    return dict(tok(texts, return_tensors="pt", padding=True))


@pytest.mark.parametrize("batch_size,beams", [(1, 1), (3, 1), (1, 20), (3, 20)])
def test_every_generated_sequence_is_a_real_item(tiny_indexed, batch_size, beams):
    tok, model, indices = tiny_indexed
    texts = ["The red king <a_1><b_2>", "a blue night over the city river and a long road home", "star"][:batch_size]
    enc = _encode(tok, texts)
    if batch_size > 1:
        assert (enc["attention_mask"][:, 0] == 0).any()  # left padding really present
    decoder = Decoder.build(tok, indices)
    ranked = decoder.rank(model, enc, beams)
    assert len(ranked) == batch_size
    for items in ranked:
        names = [i for i, _ in items]
        assert len(names) == beams and len(set(names)) == beams
        assert all(n in indices for n in names)
        scores = [s for _, s in items]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    # the same prompt ranks the same alone and in a padded batch (up to float noise)
    if batch_size == 3 and beams == 20:
        alone = decoder.rank(model, _encode(tok, texts[1:2]), beams)[0]
        assert [i for i, _ in alone][:3] == [i for i, _ in ranked[1]][:3]


def test_unconstrained_decoding_marks_non_items(tiny_indexed):
    tok, model, indices = tiny_indexed
    enc = _encode(tok, ["The red king"])
    keep = Decoder.build(tok, indices, mode="none").rank(model, enc, 5)[0]
    assert len(keep) == 5 and None in [i for i, _ in keep]  # a random model does not write indices
    dropped = Decoder.build(tok, indices, mode="none", filter_items=True).rank(model, enc, 5)[0]
    assert all(i is not None for i, _ in dropped) and len(dropped) < 5


def test_position_decoding_counts_a_beam_that_is_no_item_as_a_miss(tiny_indexed):
    """The original's rule spells non-items; each keeps its place in the ranking and never hits."""
    from metrics import compute_metrics, target_rank

    tok, model, indices = tiny_indexed
    decoder = Decoder.build(tok, indices, mode="position")
    ids = {item: tok.convert_tokens_to_ids(toks) for item, toks in indices.items()}
    per_position = [sorted({seq[j] for seq in ids.values()}) for j in range(3)]
    non_item = next(list(c) for c in itertools.product(*per_position) if list(c) not in ids.values())
    target = "0"
    ranked = decoder.ranked([non_item + [tok.eos_token_id], ids[target] + [tok.eos_token_id]], [-1.0, -2.0], 2)[0]
    names = [i for i, _ in ranked]
    assert names == [None, target] and target_rank(names, target) == 2
    assert compute_metrics([target_rank(names, target)], ["hit@1", "hit@2"]) == {"hit@1": 0.0, "hit@2": 1.0}
    # a random model under the position rule spells non-items among its 20 beams, all kept in place
    names = [i for i, _ in decoder.rank(model, _encode(tok, ["The red king"]), 20)[0]]
    assert len(names) == 20 and None in names and set(names) - {None} <= set(indices)


def test_index_tokens_must_be_single_ids(tiny_indexed):
    tok, model, indices = tiny_indexed
    plain = train_tokenizer()  # no index tokens added
    with pytest.raises(DataError, match="do not encode to exactly one id"):
        index_token_ids(plain, indices)
    ids = index_token_ids(tok, indices)
    assert ids == {item: tok.convert_tokens_to_ids(toks) for item, toks in indices.items()}


def test_oom_backoff_halves_beams(tiny_indexed):
    tok, model, indices = tiny_indexed
    decoder = Decoder.build(tok, indices)
    real_rank, tried = decoder.rank, []

    def rank_or_oom(model, enc, beams, exclude=None, histories=None):  # pretend anything above 5 beams runs out of memory
        tried.append(beams)
        if beams > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_rank(model, enc, beams, exclude=exclude, histories=histories)

    decoder.rank = rank_or_oom
    enc = _encode(tok, ["The red king", "star"])
    calls = []
    ranked, used = rank_batch_with_backoff(decoder, model, enc, 20, True, on_backoff=lambda a, b: calls.append((a, b)))
    assert tried == [20, 10, 5] and used == 5 and calls == [(20, 10), (10, 5)]
    assert [len(r) for r in ranked] == [5, 5]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        rank_batch_with_backoff(decoder, model, enc, 20, False)


@pytest.mark.parametrize("n,world", [(7, 2), (15, 4), (3, 8), (0, 2)])
def test_shards_cover_every_example_once(n, world):
    covered = [i for r in range(world) for i in shard_range(n, r, world)]
    assert covered == list(range(n))


TEXTS = ["The red king <a_1><b_2>", "a blue night over the city river and a long road home", "star"]


@pytest.mark.parametrize("batch_size,beams", [(1, 1), (3, 1), (1, 20), (3, 20)])
def test_shared_prefill_ranks_like_the_plain_generate(tiny_indexed, tie_free_model, batch_size, beams):
    tok, _, indices = tiny_indexed
    model = tie_free_model
    enc = _encode(tok, TEXTS[:batch_size])
    width = enc["input_ids"].shape[1]
    if batch_size > 1:
        assert (enc["attention_mask"][:, 0] == 0).any()  # left padding really present
    decoder = Decoder.build(tok, indices, search="hf")
    calls = []  # (rows, tokens) of each forward pass
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        shared = decoder.rank(model, enc, beams)
        shared_calls, calls[:] = list(calls), []
        decoder.share_prefill = False
        plain = decoder.rank(model, enc, beams)
    finally:
        hook.remove()
    # shared: the prompts once without their last token, then one token per beam; plain: the
    # whole prompt once per beam
    assert shared_calls[0] == (batch_size, width - 1) and shared_calls[1] == (batch_size * beams, 1)
    assert calls[0] == (batch_size * beams, width)
    assert [[i for i, _ in r] for r in shared] == [[i for i, _ in r] for r in plain]
    assert torch.allclose(torch.tensor([[s for _, s in r] for r in shared]),
                          torch.tensor([[s for _, s in r] for r in plain]), atol=1e-4)


def test_shared_prefill_falls_back_when_it_cannot_apply(tiny_indexed, tie_free_model):
    tok, _, indices = tiny_indexed
    model = tie_free_model
    one_token = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.tensor([[1]])}
    assert not can_share_prefill(model, one_token["input_ids"])  # nothing to prefill before the last token

    class NoCacheLM(torch.nn.Module):  # a model whose forward takes no cache object
        config = model.config

        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("not called")

    assert not can_share_prefill(NoCacheLM(), _encode(tok, TEXTS[:1])["input_ids"])
    assert can_share_prefill(model, _encode(tok, TEXTS[:1])["input_ids"])
    decoder = Decoder.build(tok, indices)
    ranked = decoder.rank(model, one_token, 5)[0]
    assert len(ranked) == 5 and all(i in indices for i, _ in ranked)


def test_no_share_prefill_flag():
    from arguments import parse_args

    assert parse_args("test", ["--no_share_prefill"]).no_share_prefill
    assert not parse_args("test", []).no_share_prefill


def _rank_both(decoder, model, enc, beams):
    """(trie-native ranking, its forward calls as (rows, tokens)), generate's ranking."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        decoder.search = "trie"
        trie = decoder.rank(model, enc, beams)
    finally:
        hook.remove()
    decoder.search = "hf"
    hf = decoder.rank(model, enc, beams)
    decoder.search = "trie"
    return trie, calls, hf


def _assert_same_ranking(a, b):
    assert [[i for i, _ in r] for r in a] == [[i for i, _ in r] for r in b]
    for ra, rb in zip(a, b):
        assert torch.allclose(torch.tensor([s for _, s in ra]), torch.tensor([s for _, s in rb]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size,beams", [(1, 1), (3, 1), (1, 5), (3, 5), (1, 20), (3, 20)])
def test_trie_search_ranks_like_generate(tiny_indexed, tie_free_model, batch_size, beams):
    tok, _, indices = tiny_indexed
    model = tie_free_model
    enc = _encode(tok, TEXTS[:batch_size])
    width = enc["input_ids"].shape[1]
    if batch_size > 1:
        assert (enc["attention_mask"][:, 0] == 0).any()  # left padding really present
    decoder = Decoder.build(tok, indices)
    assert decoder.search == "trie"  # the default
    trie, calls, hf = _rank_both(decoder, model, enc, beams)
    _assert_same_ranking(trie, hf)
    for items in trie:
        names = [i for i, _ in items]
        assert len(names) == beams and len(set(names)) == beams and all(n in indices for n in names)
    # the prompts once, then one token per beam for each of the 3 index tokens, appended to the one
    # prompt cache as a tree: [prompts, beams] inputs, no copy of the prompt per beam
    assert calls == [(batch_size, width)] + [(batch_size, beams)] * 3


def test_trie_search_with_as_many_beams_as_items_scores_every_item_exactly(tiny_indexed, tie_free_model):
    tok, _, indices = tiny_indexed
    model = tie_free_model
    decoder = Decoder.build(tok, indices)
    enc = _encode(tok, TEXTS)
    trie, _, hf = _rank_both(decoder, model, enc, len(indices))
    _assert_same_ranking(trie, hf)
    assert all(sorted(i for i, _ in r) == sorted(indices) for r in trie)
    # no prefix is ever dropped, so each score is the item's own log-likelihood (+ EOS) / length
    prompt = _encode(tok, TEXTS[1:2])["input_ids"]
    ids_of = {item: list(ids) for ids, item in decoder.item_of.items()}
    for item, score in trie[1]:
        tail = torch.tensor([ids_of[item] + [decoder.eos_token_id]])
        with torch.no_grad():
            logp = model(input_ids=torch.cat([prompt, tail], 1)).logits[0, prompt.shape[1] - 1:-1].log_softmax(-1)
        exact = logp.gather(1, tail.T).sum().item() / tail.shape[1]
        assert abs(score - exact) < 1e-4, item


def test_trie_search_without_the_eos_term_skips_its_forward_and_scores_the_index_tokens(tiny_indexed,
                                                                                        tie_free_model):
    tok, _, indices = tiny_indexed
    model = tie_free_model
    decoder = Decoder.build(tok, indices, score_eos=False)
    enc = _encode(tok, TEXTS)
    with_eos, _, _ = _rank_both(Decoder.build(tok, indices), model, enc, len(indices))
    without, calls, _ = _rank_both(decoder, model, enc, len(indices))
    # the prompts, then the 2 forwards that score the second and third index tokens; none for EOS
    assert calls == [(len(TEXTS), enc["input_ids"].shape[1])] + [(len(TEXTS), len(indices))] * 2
    prompt = _encode(tok, TEXTS[1:2])["input_ids"]
    ids_of = {item: list(ids) for ids, item in decoder.item_of.items()}
    eos_terms = []
    for item, score in without[1]:  # every item (as many beams as items): its own mean over 3 tokens
        tail = torch.tensor([ids_of[item] + [decoder.eos_token_id]])
        with torch.no_grad():
            logp = model(input_ids=torch.cat([prompt, tail], 1)).logits[0, prompt.shape[1] - 1:-1].log_softmax(-1)
        token_logp = logp.gather(1, tail.T)[:, 0]
        assert abs(score - token_logp[:3].mean().item()) < 1e-4, item
        eos_terms.append(token_logp[3].item())
    assert max(eos_terms) - min(eos_terms) > 1e-3  # the untrained model's EOS term differs by item: it was left out
    assert sorted(i for i, _ in without[1]) == sorted(i for i, _ in with_eos[1])


@pytest.mark.parametrize("first_codes,beams", [(2, 20), (1, 20)])
def test_trie_search_when_the_first_level_has_fewer_codes_than_beams(tiny_indexed, tie_free_model, first_codes,
                                                                      beams):
    """2 first-level codes x 4 x 4 = 32 items; 1 code: 16 items, fewer than the beams (every item is returned)."""
    tok, _, _ = tiny_indexed
    model = tie_free_model
    indices = {f"{a}{b}{c}": [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"]
               for a in range(first_codes) for b in range(4) for c in range(4)}
    decoder = Decoder.build(tok, indices)
    enc = _encode(tok, TEXTS)
    trie, _, hf = _rank_both(decoder, model, enc, beams)
    _assert_same_ranking(trie, hf)
    for items in trie:
        names = [i for i, _ in items]
        assert len(names) == min(beams, len(indices)) == len(set(names)) and all(n in indices for n in names)
        assert all(math.isfinite(s) for _, s in items)


def test_beam_search_flag_and_bad_value(tiny_indexed):
    from arguments import parse_args

    assert parse_args("test", []).beam_search == "trie"
    assert parse_args("test", ["--beam_search", "hf"]).beam_search == "hf"
    with pytest.raises(SystemExit):  # the parser checks the decoding options
        parse_args("test", ["--beam_search", "greedy"])
    assert parse_args("test", []).decoding == ["trie"]
    assert parse_args("test", ["--decoding", "trie,position"]).decoding == ["trie", "position"]
    for bad in ("beam", "trie,trie", "trie,"):
        with pytest.raises(SystemExit):
            parse_args("test", ["--decoding", bad])


def test_oom_inside_the_trie_search_backs_off(tiny_indexed):
    tok, model, indices = tiny_indexed
    decoder = Decoder.build(tok, indices)
    enc = _encode(tok, ["The red king", "star"])

    def oom_above_5_beams(module, args, kwargs):  # a forward over more than 2 x 5 tokens runs out of memory
        decoding = kwargs["cache"].get_seq_length() > 0  # not the prompts' prefill
        if decoding and kwargs["input_ids"].numel() > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    hook = model.register_forward_pre_hook(oom_above_5_beams, with_kwargs=True)
    try:
        ranked, used = rank_batch_with_backoff(decoder, model, enc, 20, True)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            rank_batch_with_backoff(decoder, model, enc, 20, False)
    finally:
        hook.remove()
    assert used == 5 and [len(r) for r in ranked] == [5, 5]
    assert ranked == decoder.rank(model, enc, 5)


@pytest.mark.parametrize("softmax", ["level", "trie"])
def test_level_and_trie_softmax_score_every_item_over_its_codes(tiny_indexed, tie_free_model, softmax):
    """--score_softmax level|trie: with as many beams as items, each score is the item's
    log-likelihood with every index token normalised over its level's codes, or over the codes
    that follow its prefix in the trie (EOS over the vocabulary), divided by the length."""
    tok, _, indices = tiny_indexed
    model = tie_free_model
    decoder = Decoder.build(tok, indices, softmax=softmax)
    prompt = _encode(tok, TEXTS[1:2])
    ranked = decoder.rank(model, prompt, len(indices))[0]
    assert sorted(i for i, _ in ranked) == sorted(indices)
    ids_of = {item: list(ids) for ids, item in decoder.item_of.items()}
    levels = [sorted({ids[t] for ids in ids_of.values()}) for t in range(decoder.trie.index_len)]
    full_scores = dict(Decoder.build(tok, indices).rank(model, prompt, len(indices))[0])
    differs = 0
    for item, score in ranked:
        tail = torch.tensor([ids_of[item] + [decoder.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=torch.cat([prompt["input_ids"], tail], 1)).logits[0, prompt["input_ids"].shape[1] - 1:-1]
        item_ids = ids_of[item]
        codes = [levels[t] if softmax == "level" else
                 sorted({o[t] for o in ids_of.values() if o[:t] == item_ids[:t]}) for t in range(len(levels))]
        exact = sum((logits[t, tail[0, t]] - logits[t, codes[t]].logsumexp(-1)).item() for t in range(len(levels)))
        exact += logits[-1].log_softmax(-1)[decoder.eos_token_id].item()
        assert abs(score - exact / tail.shape[1]) < 1e-4, item
        differs += abs(score - full_scores[item]) > 1e-4
    assert differs == len(indices)  # a real change: the full softmax scores every item lower
    with pytest.raises(DataError, match="needs the trie search"):
        checkpoint_softmax(softmax, model, "trie", "hf")
    # the original's per-position rule has no trie to normalise over: auto scores it with the full softmax
    trained = SimpleNamespace(config=SimpleNamespace(index_softmax=softmax))  # as config.json records it
    assert checkpoint_softmax("auto", trained, "position") == "full" and checkpoint_softmax("auto", trained) == softmax
    with pytest.raises(DataError, match="needs the trie search"):
        checkpoint_softmax(softmax, trained, "position")


def test_trie_prior_adds_up_to_the_item_weights(tiny_indexed):
    """--index_prior: the log-priors along an item's path sum to log(w_item / w_all), so the prior
    alone ranks items as their weights do; padding and the end states add nothing."""
    tok, _, indices = tiny_indexed
    items = sorted(indices)
    weights = {item: float(1 + 3 * k) for k, item in enumerate(items)}
    seqs = [tok.convert_tokens_to_ids(indices[i]) for i in items]
    trie = IndexTrie(seqs, tok.eos_token_id, weights=[weights[i] for i in items])
    total = sum(weights.values())
    for item, seq in zip(items, seqs):
        state, logp = IndexTrie.ROOT, 0.0
        for tok_id in seq:
            slot = int((trie.allowed[state, : trie.num_children[state]] == tok_id).nonzero()[0, 0])
            logp += float(trie.log_prior[state, slot])
            state = int(trie.child_state[state, slot])
        assert logp == pytest.approx(math.log(weights[item] / total), abs=1e-5)
        assert float(trie.log_prior[state].abs().sum()) == 0.0  # the leaf: EOS only, no prior
    assert float(trie.log_prior[: IndexTrie.ROOT].abs().sum()) == 0.0
    with pytest.raises(DataError, match="positive"):
        IndexTrie(seqs, tok.eos_token_id, weights=[0.0] * len(seqs))
    with pytest.raises(DataError, match="prior weights for"):
        IndexTrie(seqs, tok.eos_token_id, weights=[1.0])


def test_prior_search_on_a_blind_model_ranks_by_weight(tiny_indexed):
    """With every index token's logit equal (a model that has learned nothing about the codes),
    beam search with the prior returns the items in the order of their weights: the popularity
    ranking."""
    tok, _, indices = tiny_indexed
    model = make_tiny_model(len(tok), seed=3).eval()
    index_ids = torch.tensor(sorted({i for toks in indices.values() for i in tok.convert_tokens_to_ids(toks)}))
    rows = model.get_output_embeddings().weight.data
    rows[index_ids] = rows[index_ids[0]].clone()  # one output row for every index token: blind to the codes
    items = sorted(indices)
    weights = {item: float(2 ** k) for k, item in enumerate(items)}  # far apart: no near ties
    prompt = _encode(tok, TEXTS[:2])
    decoder = Decoder.build(tok, indices, softmax="trie", prior=weights)
    for ranked in decoder.rank(model, prompt, len(indices)):
        assert [i for i, _ in ranked] == sorted(items, key=lambda i: -weights[i])
    with pytest.raises(DataError, match="needs the trie softmax"):
        Decoder.build(tok, indices, softmax="full", prior=weights)


def test_cpu_bf16_autocast_is_chosen_only_on_a_cpu_with_native_bf16(monkeypatch):
    import utils
    from arguments import parse_args

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(utils, "cpu_supports_bf16", lambda native=native: native)
        assert utils.cpu_autocast_bf16(cpu, "auto") is native
        assert utils.cpu_autocast_bf16(cpu, "on") and not utils.cpu_autocast_bf16(cpu, "off")
        assert not utils.cpu_autocast_bf16(gpu, "on")  # GPUs load bf16 weights instead
    assert parse_args("test", []).cpu_bf16 == "auto"
    with pytest.raises(SystemExit):
        parse_args("test", ["--cpu_bf16", "yes"])


def test_decoding_under_cpu_bf16_autocast_scores_real_items_close_to_fp32(tiny_indexed, tie_free_model):
    """bf16 autocast (native on some CPUs, emulated here otherwise) moves the scores by rounding only."""
    tok, _, indices = tiny_indexed
    enc = _encode(tok, TEXTS[:3])
    decoder = Decoder.build(tok, indices)
    fp32 = decoder.rank(tie_free_model, enc, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = decoder.rank(tie_free_model, enc, 10)
    for full, rounded in zip(fp32, bf16):
        assert len(rounded) == 10 and all(item in indices for item, _ in rounded)
        assert all(isinstance(score, float) for _, score in rounded)
        exact = dict(full)
        shared = [(exact[item], score) for item, score in rounded if item in exact]
        assert len(shared) >= 5  # mostly the same items
        assert max(abs(a - b) for a, b in shared) < 0.1  # mean log-probability per token
        assert rounded[0][1] >= rounded[-1][1]


def test_excluded_states_are_the_prefixes_with_no_item_left():
    seqs = [(10, 20, 30), (10, 20, 31), (10, 21, 30), (11, 20, 30)]
    trie = IndexTrie(seqs, EOS, PAD)
    state_of = {tuple(p): trie.states(torch.tensor([p])).item() for s in seqs for p in (s[:1], s[:2], s)}
    ex = trie.excluded_states([[(10, 20, 30), (10, 20, 31)],  # both items below (10, 20)
                               [(10, 20, 30), (99, 98, 97), (10, 20)],  # one item; a non-item and a prefix count nowhere
                               [(11, 20, 30)],  # the only item below 11: the whole first-level branch goes
                               []])
    gone = [{p for p, s in state_of.items() if ex[row, s]} for row in range(4)]
    assert gone[0] == {(10, 20), (10, 20, 30), (10, 20, 31)}
    assert gone[1] == {(10, 20, 30)}
    assert gone[2] == {(11,), (11, 20), (11, 20, 30)}
    assert gone[3] == set() and not ex[:, trie.ROOT].any()


@pytest.mark.parametrize("search,softmax", [("trie", "full"), ("trie", "trie"), ("hf", "full")])
def test_excluded_items_are_never_returned_and_the_others_keep_their_scores(tiny_indexed, tie_free_model, search,
                                                                            softmax):
    """With as many beams as items the search is exhaustive: leaving items out must give exactly the
    full ranking less those items, same scores. With 5 beams, excluding the top 5 must still give 5
    real items (the search goes past them), none of them excluded."""
    tok, _, indices = tiny_indexed
    decoder = Decoder.build(tok, indices, search=search, softmax=softmax)
    enc = _encode(tok, TEXTS)
    full = decoder.rank(tie_free_model, enc, len(indices))
    exclude = [[i for i, _ in r[:: 3]] for r in full]  # every third item of each example's ranking
    exclude[1] += ["not an item"]  # ignored
    masked = decoder.rank(tie_free_model, enc, len(indices), exclude=exclude)
    for f, m, ex in zip(full, masked, exclude):
        kept = [(i, s) for i, s in f if i not in ex]
        assert [i for i, _ in m] == [i for i, _ in kept] and len(kept) == len(indices) - 8
        assert torch.allclose(torch.tensor([s for _, s in m]), torch.tensor([s for _, s in kept]), atol=1e-5, rtol=0)
    top5 = [[i for i, _ in r[:5]] for r in decoder.rank(tie_free_model, enc, 5)]
    for items, ex in zip(decoder.rank(tie_free_model, enc, 5, exclude=top5), top5):
        names = [i for i, _ in items]
        assert len(names) == 5 == len(set(names)) and all(n in indices and n not in ex for n in names)


def test_leaving_items_out_needs_the_trie_decoding(tiny_indexed):
    tok, model, indices = tiny_indexed
    decoder = Decoder.build(tok, indices, mode="position")
    with pytest.raises(DataError, match="--decoding trie"):
        decoder.rank(model, _encode(tok, ["star"]), 3, exclude=[["1"]])


@pytest.fixture(params=["sdpa", "eager"])
def tie_free_model_attn(request, tie_free_model):
    """The tie-free model under each attention the tree decoding builds its own mask for."""
    model = copy.deepcopy(tie_free_model)
    model.set_attn_implementation(request.param)
    return model


@pytest.mark.parametrize("batch_size,beams", [(1, 5), (3, 20)])
def test_tree_decoding_ranks_like_a_prompt_cache_per_beam(tiny_indexed, tie_free_model_attn, batch_size, beams):
    """One prompt cache shared by the beams as a tree ranks the same items with the same scores as
    the prompt cache repeated per beam and reordered, on left-padded prompts, with and without
    items left out."""
    import generation

    tok, _, indices = tiny_indexed
    model = tie_free_model_attn
    enc = _encode(tok, TEXTS[:batch_size])
    assert generation.tree_attention(model, enc["input_ids"].shape[1], 3 * beams)
    decoder = Decoder.build(tok, indices)
    exclude = [list(indices)[i::5] for i in range(batch_size)]
    tree = [decoder.rank(model, enc, beams), decoder.rank(model, enc, beams, exclude=exclude)]
    decoder.tree = False
    copies = [decoder.rank(model, enc, beams), decoder.rank(model, enc, beams, exclude=exclude)]
    for a, b in zip(tree, copies):
        _assert_same_ranking(a, b)


def test_tree_sampling_draws_like_a_prompt_cache_per_draw(tiny_indexed, tie_free_model):
    """At a temperature near 0 every draw is the trie's greedy path, so both cache layouts must draw
    the same items with the same (untempered) scores."""
    import generation

    tok, _, indices = tiny_indexed
    enc = _encode(tok, TEXTS[:3])
    decoder = Decoder.build(tok, indices)

    def draw(tree):
        return generation.trie_sample(tie_free_model, decoder.trie, enc["input_ids"], enc["attention_mask"], 6,
                                       decoder.eos_token_id, temperature=1e-4, generator=torch.Generator().manual_seed(0),
                                       tree=tree)

    tokens, scores = draw(True)
    copy_tokens, copy_scores = draw(False)
    assert torch.equal(tokens, copy_tokens)
    assert torch.allclose(scores, copy_scores, atol=1e-5, rtol=0)


def test_tree_decoding_is_used_only_where_the_model_allows_it(tiny_indexed):
    from generation import tree_attention

    tok, model, _ = tiny_indexed
    model = copy.deepcopy(model)
    assert tree_attention(model, 30, 60)
    model.config.sliding_window = 64  # keys past the window would be dropped by the model, not by the mask
    assert tree_attention(model, 4, 60) and not tree_attention(model, 30, 60)
    model.config.sliding_window = None
    model.config.layer_types = ["full_attention", "linear_attention"]  # a hybrid: a recurrent state mixes the beams
    assert not tree_attention(model, 30, 60)
    model.config.layer_types = None
    model.config.attention_chunk_size = 128  # chunked attention builds its own mask
    assert not tree_attention(model, 30, 60)
    model.config.attention_chunk_size = None
    model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask
    assert not tree_attention(model, 30, 60)


def test_tree_step_mask_shows_each_token_its_prompt_and_its_own_beam_only():
    from generation import tree_step_mask

    prompt = torch.tensor([[0, 1, 1], [1, 1, 1]])  # the first prompt left padded
    # step t = 1 of 2 beams: beam 0 descends from last step's beam 1 (column 4), beam 1 from beam 0 (column 3)
    columns = torch.tensor([[[4, 5], [3, 6]], [[3, 5], [3, 6]]])
    mask = tree_step_mask(prompt, columns, torch.float32, boolean=True)
    assert mask.shape == (2, 1, 2, 3 + 4)
    assert mask[0, 0].int().tolist() == [[0, 1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0, 1]]
    additive = tree_step_mask(prompt, columns, torch.float32, boolean=False)
    assert torch.equal(additive == 0, mask) and additive.min() == torch.finfo(torch.float32).min


def test_linear_weights_cast_once_give_what_autocast_gives(tiny_indexed, tie_free_model):
    """bf16 linear weights stored once decode exactly as fp32 weights under bf16 autocast, the
    embedding keeps its fp32 rows, and a tied head gets its own copy."""
    from modeling import cast_linear_weights

    tok, _, indices = tiny_indexed
    model = copy.deepcopy(tie_free_model)
    enc = _encode(tok, TEXTS)
    decoder = Decoder.build(tok, indices)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = decoder.rank(model, enc, 10)
        assert cast_linear_weights(model, torch.bfloat16) > 0
        after = decoder.rank(model, enc, 10)
    assert before == after
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())


@pytest.mark.skipif(not __import__("modeling").can_pack_linear_weights(),
                    reason="this torch has no oneDNN packed linear")
def test_packed_linear_weights_give_exactly_what_plain_bf16_weights_give(tiny_indexed, tie_free_model):
    """oneDNN-packed copies of the bf16 linear weights: every product bit-identical to F.linear (2D
    and 3D inputs, fp32 inputs cast as autocast casts them), so the decoded ranking is unchanged."""
    from modeling import cast_linear_weights, pack_linear_weights

    tok, _, indices = tiny_indexed
    model = copy.deepcopy(tie_free_model)
    enc = _encode(tok, TEXTS)
    decoder = Decoder.build(tok, indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_linear_weights(model, torch.bfloat16)
        before = decoder.rank(model, enc, 10)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert pack_linear_weights(model, rows=10) == len(linears) > 0
        after = decoder.rank(model, enc, 10)
    assert before == after
    layer = linears[0]
    for shape in ((7, layer.in_features), (2, 5, layer.in_features)):
        x = torch.randn(shape)
        assert torch.equal(layer(x), torch.nn.functional.linear(x.to(torch.bfloat16), layer.weight, layer.bias))


def test_only_bf16_linear_weights_are_packed(tiny_indexed, tie_free_model, monkeypatch):
    """fp32 weights (no --cpu_bf16) stay plain, and a torch without the oneDNN ops packs nothing."""
    import modeling

    model = copy.deepcopy(tie_free_model)
    assert modeling.pack_linear_weights(model) == 0
    assert not any(hasattr(m, "packed_weight") for m in model.modules())
    modeling.cast_linear_weights(model, torch.bfloat16)
    monkeypatch.setattr(modeling, "can_pack_linear_weights", lambda: False)
    assert modeling.pack_linear_weights(model) == 0


def test_a_cached_prompt_prefix_ranks_like_the_whole_prompt(tiny_indexed, tie_free_model_attn):
    """A prompt that starts with a cached prefix runs only its other tokens and ranks the same items
    with the same scores (fp32); the cached prefix is copied, so a second request is unchanged; a
    prompt the prefix does not start, a batch of two and a padded prompt run whole."""
    from generation import PromptPrefixes, common_prefix

    tok, _, indices = tiny_indexed
    model = tie_free_model_attn
    texts = ["a blue night over the city river and a long road home", "a blue night over the city of stars"]
    rows = [tok(t)["input_ids"] for t in texts]
    shared = common_prefix(rows)
    assert 3 <= len(shared) < min(map(len, rows))
    prefixes = PromptPrefixes()
    assert prefixes.add(model, shared) and not prefixes.add(model, shared)  # a known prefix is not added twice
    plain, cached = Decoder.build(tok, indices), Decoder.build(tok, indices)
    cached.prefixes = prefixes
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        for text in texts + texts[:1]:
            enc = _encode(tok, [text])
            calls.clear()
            got = cached.rank(model, enc, 8)
            assert calls[0] == enc["input_ids"].shape[1] - len(shared)  # only the tokens after the prefix
            _assert_same_ranking(got, plain.rank(model, enc, 8))
        for batch in (["star over the city"], TEXTS[:2]):  # no prefix / a padded batch of two
            enc = _encode(tok, batch)
            calls.clear()
            cached.rank(model, enc, 8)
            assert calls[0] == enc["input_ids"].shape[1]
    finally:
        hook.remove()
    padded_ids = torch.tensor([[tok.pad_token_id or 0, *rows[0]]])
    padded_mask = torch.tensor([[0] + [1] * len(rows[0])])
    assert prefixes.start(model, padded_ids, padded_mask)[1] == 0


@pytest.mark.parametrize("shape", ["mixed", "single", "early"])
@pytest.mark.parametrize("batch_size,beams", [(1, 5), (3, 12)])
def test_trie_softmax_search_runs_only_the_beams_with_a_choice(tiny_indexed, tie_free_model,
                                                             shape, batch_size, beams, monkeypatch):
    """Under the trie softmax without the EOS term, a prefix that holds one item adds 0 to its beam's
    score at every later token whatever the logits, so each step's forward runs only the beams whose
    prefix holds more than one item (none at all when no beam's does): the same items and scores as the
    search that runs every beam (a prompt cache per beam), and as the search whose every step runs the
    whole output layer (not cut to the level's codes), with a prior and with items left out."""
    import generation

    tok, _, _ = tiny_indexed
    model = tie_free_model
    if shape == "mixed":  # some (a, b) prefixes with 3 last codes, the others with one
        indices = {f"{a}{b}{c}": [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for a in range(4) for b in range(4)
                   for c in (range(3) if (a + b) % 3 == 0 else [(a * b) % 4])}
    elif shape == "single":  # every (a, b) prefix has a single last code
        indices = {f"{a}{b}": [f"<a_{a}>", f"<b_{b}>", f"<c_{(a + b) % 4}>"] for a in range(4) for b in range(4)}
    else:  # as mixed, but <a_2> holds one item: its beam runs no forward after the first token
        indices = {f"{a}{b}{c}": [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for a in (0, 1, 3) for b in range(4)
                   for c in (range(3) if (a + b) % 3 == 0 else [(a * b) % 4])}
        indices["2"] = ["<a_2>", "<b_1>", "<c_3>"]
    prior = {item: 1.0 + (n % 5) for n, item in enumerate(indices)}
    enc = _encode(tok, TEXTS[:batch_size])
    exclude = [list(indices)[i::4] for i in range(batch_size)]
    decoder = Decoder.build(tok, indices, softmax="trie", prior=prior, score_eos=False)
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"]), with_kwargs=True)
    try:
        tree = [decoder.rank(model, enc, beams), decoder.rank(model, enc, beams, exclude=exclude)]
    finally:
        hook.remove()
    decoder.tree = False
    copies = [decoder.rank(model, enc, beams), decoder.rank(model, enc, beams, exclude=exclude)]
    head = model.get_output_embeddings()
    monkeypatch.setattr(generation, "level_heads", lambda *a: None)  # every step through the whole output layer
    whole = [decoder.rank(model, enc, beams), decoder.rank(model, enc, beams, exclude=exclude)]
    assert model.get_output_embeddings() is head  # the cut layers were put back
    for a, b, c in zip(tree, copies, whole):
        _assert_same_ranking(a, b)
        _assert_same_ranking(a, c)
        assert all(len(r) == beams for r in a)
    # per search: the prompt, then one step: the beams whose first code holds more than one item (their
    # first codes), then the children of those beams that have a choice at the last level (second
    # codes), whose logits the last level reads instead of a forward of its own
    first = torch.tensor(sorted({tok.convert_tokens_to_ids(codes[0]) for codes in indices.values()}))
    per_search = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
    for n, calls in enumerate(per_search):
        assert len(calls) == 2 and calls[1].shape[0] == batch_size
        keep = int(torch.isin(calls[1][0], first).sum())  # the beams' rows come first, as many in each example
        assert bool(torch.isin(calls[1][:, :keep], first).all())
        if shape == "single":  # no last-level choice anywhere: no row looks ahead
            assert calls[1].shape[1] == keep == beams
        elif shape == "mixed":
            assert keep == beams and calls[1].shape[1] > keep
        elif n == 0:  # early, nothing excluded: the beam on <a_2> (one item) never runs
            assert keep < beams and calls[1].shape[1] > keep


@pytest.mark.parametrize("batch_size,beams", [(1, 6), (3, 16)])
def test_four_level_search_skips_and_looks_ahead_with_the_same_ranking(batch_size, beams):
    """A 4-level index with first codes holding one item, (a, b) prefixes holding one item, and a few
    last-level choices: the search that runs only the beams with a choice (and looks ahead to the
    last level from the third code's step) ranks the same items with the same scores as the search
    that runs every beam, with a prior and with items left out, and runs fewer rows."""
    import generation

    tok = train_tokenizer()
    tok.add_tokens([f"<{level}_{i}>" for level in "abcd" for i in range(3)])
    model = make_tiny_model(len(tok), seed=5).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)  # no near-ties
    rng = random.Random(0)
    indices = {}
    for a, b, c in itertools.product(range(3), range(3), range(3)):
        if a == 2 and (b, c) != (0, 0):  # <a_2> holds one item
            continue
        if c > 0 and (a + b) % 2:  # (a, b) prefixes with one item
            continue
        for d in (range(3) if rng.random() < 0.3 else [rng.randrange(3)]):  # a few last-level choices
            indices[f"{a}{b}{c}{d}"] = [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>", f"<d_{d}>"]
    prior = {item: 1.0 + (n % 5) for n, item in enumerate(indices)}
    decoder = Decoder.build(tok, indices, softmax="trie", prior=prior, score_eos=False)
    enc = _encode(tok, TEXTS[:batch_size])
    exclude = [list(indices)[i::5] for i in range(batch_size)]
    calls = {}
    sparse = []
    for name, excluded in (("all", None), ("excluded", exclude)):
        calls[name] = []
        hook = model.register_forward_pre_hook(lambda m, a, kw: calls[name].append(kw["input_ids"]), with_kwargs=True)
        try:
            sparse.append(decoder.rank(model, enc, beams, exclude=excluded))
        finally:
            hook.remove()
    decoder.tree = False
    every = [decoder.rank(model, enc, beams), decoder.rank(model, enc, beams, exclude=exclude)]
    for a, b in zip(sparse, every):
        _assert_same_ranking(a, b)
    # the prompt and the steps after the first and second codes; the last level reads the lookahead
    code = {level: torch.tensor(tok.convert_tokens_to_ids([f"<{level}_{i}>" for i in range(3)])) for level in "abcd"}
    for steps in calls.values():
        assert len(steps) == 3
        assert bool(torch.isin(steps[1], code["a"]).all()) and steps[1].shape[1] <= beams
        second = torch.isin(steps[2], code["b"])
        keep = int(second[0].sum())  # the beams' rows first, as many in each example, then the lookahead's
        assert bool(second[:, :keep].all()) and keep < beams  # some (a, b) prefixes hold one item
    assert any(torch.isin(steps[2], code["c"]).any() for steps in calls.values())  # some rows looked ahead


@pytest.mark.parametrize("score_eos", [True, False])
def test_trie_softmax_search_scores_each_level_with_the_output_layer_cut_to_its_codes(tiny_indexed, tie_free_model,
                                                                                    score_eos, monkeypatch):
    """Under the trie softmax each step's forward computes the logits of its level's codes only
    (``level_heads``; the step that looks ahead, those of its two levels), and the EOS term the whole
    vocabulary's: the same items and scores as every
    step through the whole output layer, which is put back afterwards (also after an error)."""
    import generation

    tok, _, indices = tiny_indexed
    model = tie_free_model
    enc = _encode(tok, TEXTS)
    decoder = Decoder.build(tok, indices, softmax="trie", score_eos=score_eos)
    head = model.get_output_embeddings()
    widths = []
    hook = model.register_forward_hook(lambda m, a, out: widths.append(out.logits.shape[-1]))
    try:
        cut = decoder.rank(model, enc, 7)
    finally:
        hook.remove()
    assert model.get_output_embeddings() is head
    codes = [len(c) for c in decoder.trie.level_tokens]
    if score_eos:  # the prefill, each step; the EOS term: the whole layer
        assert widths == codes + [head.out_features]
    else:  # the prefill, then the step that also looks ahead to the last level: both levels' codes
        assert widths == [codes[0], codes[1] + codes[2]]
    monkeypatch.setattr(generation, "level_heads", lambda *a: None)
    _assert_same_ranking(cut, decoder.rank(model, enc, 7))
    monkeypatch.undo()
    monkeypatch.setattr(generation, "tree_forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        decoder.rank(model, enc, 7)
    assert model.get_output_embeddings() is head


def _fusion_inters(items):
    """Training parts where item 0 is followed by items 5 (four times), 9 (three) and 14 (twice), and
    item 3 by item 20 once; each sequence ends with two held-out items."""
    follows = [(0, 5)] * 4 + [(0, 9)] * 3 + [(0, 14)] * 2 + [(3, 20)]
    return {f"u{n}": [items[a], items[b], items[1], items[2]] for n, (a, b) in enumerate(follows)}


def test_fusion_adds_the_weighted_log_probability_of_the_cooccurrence_ranker(tiny_indexed, tie_free_model):
    """--fusion_weight: with as many beams as items, each fused score is the model's score plus
    weight x log q(item) / (L + 1), q the co-occurrence ranker's distribution after the history."""
    tok, _, indices = tiny_indexed
    items = sorted(indices)
    inters, weight = _fusion_inters(items), 0.7
    plain = Decoder.build(tok, indices, softmax="trie")
    fused = Decoder.build(tok, indices, softmax="trie", fusion_inters=inters, fusion_weight=weight,
                          fusion_settings={"context": 1})
    enc = _encode(tok, TEXTS)
    histories = [[items[7], items[0]], [items[3]], []]
    base = plain.rank(tie_free_model, enc, len(indices))
    both = fused.rank(tie_free_model, enc, len(indices), histories=histories)
    q = fused.fusion.next_item([[fused.position_of[i] for i in h] for h in histories])
    for b in range(len(TEXTS)):
        expected = {i: s + weight * math.log(float(q[b, fused.position_of[i]])) / 4 for i, s in base[b]}
        assert sorted(expected) == sorted(i for i, _ in both[b])
        for item, score in both[b]:
            assert score == pytest.approx(expected[item], abs=1e-4)


def test_fusion_prunes_beams_by_the_ranker_mass_below_their_prefixes(tiny_indexed, tie_free_model):
    """With few beams and a large weight the search must find the ranker's best items, which it can
    only do if each prefix is weighed by the mass below it (a weight added at the leaves alone would
    come too late for items whose prefixes the model ranks low)."""
    tok, _, indices = tiny_indexed
    items = sorted(indices)
    fused = Decoder.build(tok, indices, softmax="trie", fusion_inters=_fusion_inters(items), fusion_weight=100.0,
                          fusion_settings={"context": 1})
    for ranked in fused.rank(tie_free_model, _encode(tok, TEXTS), 3, histories=[[items[0]]] * len(TEXTS)):
        assert [i for i, _ in ranked] == [items[5], items[9], items[14]]


def test_fusion_needs_the_trie_search_and_the_histories(tiny_indexed):
    tok, model, indices = tiny_indexed
    inters = _fusion_inters(sorted(indices))
    with pytest.raises(DataError, match="--fusion_weight 0.5 needs the trie search"):
        Decoder.build(tok, indices, mode="position", fusion_inters=inters, fusion_weight=0.5)
    with pytest.raises(DataError, match="--fusion_weight 0.5 needs the trie search"):
        Decoder.build(tok, indices, search="hf", fusion_inters=inters, fusion_weight=0.5)
    decoder = Decoder.build(tok, indices, fusion_inters=inters, fusion_weight=0.5)
    with pytest.raises(ValueError, match="one history per example"):
        decoder.rank(model, _encode(tok, ["star"]), 3)
    assert Decoder.build(tok, indices, fusion_inters=inters, fusion_weight=0.0).fusion is None
