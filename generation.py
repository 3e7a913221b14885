"""Constrained decoding of item indices (the evaluation loop that uses it is evaluation.py).

Decoding is constrained by a prefix trie of the real item indices: after the prompt the model
may only emit an index token that extends the prefix of some item, then EOS, then EOS/pad.
Every beam therefore ends as a real item. The trie (item_trie.IndexTrie) is compiled once into
tensors, and each decoding step walks all beams of all prompts through it with a few gathers (no
Python loop over beams).

Beam search over the trie (``trie_beam_search``, the default) scores only each beam's allowed
children after a full-vocabulary log-softmax, so it ranks exactly like transformers' ``generate``
beam search with the trie processor (``--beam_search hf``) without its work on [beams, vocab]
tensors.

Each prompt is run once, not once per beam: ``shared_prefill`` caches the prompt's keys/values
and repeats the cache for the beams before ``generate`` (switch off with ``--no_share_prefill``).
The trie search goes further where the model allows it (``tree_attention``): the prompt's cache is
never repeated at all; each step appends the beams' new tokens to the one prompt cache as a tree,
and a 4D attention mask lets each token see only the prompt and its own beam's earlier tokens. A
decoding step then reads the prompt's keys once, not once per beam, which was most of its time.

A single prompt that starts with words every request shares (the instruction wrapper and a
template's first words) can skip them: ``PromptPrefixes`` keeps their keys and values from start-up
(recommend.py).

Items can be left out per example (``Decoder.rank(..., exclude=...)``, e.g. what a user has
already seen): ``IndexTrie.excluded_states`` marks the trie states with no other item below them,
and both searches never step into those, so the beams still end at K real items that are left.

``position_allowed_tokens_fn`` is the paper's looser rule (any token seen at that position in
any index), kept as a baseline for bench/bench_decode.py; it can produce indices of no item.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from item_trie import IndexTrie
from modeling import keeps_logits
from utils import DataError

if TYPE_CHECKING:
    from item_teacher import CooccurrenceTeacher

log = logging.getLogger("lcrec.eval")


# --------------------------------------------------------------------------- constraints for generate
class TrieLogitsProcessor(LogitsProcessor):
    """Sets every score to -inf except the tokens the trie allows after the generated prefix.

    ``prompt_len`` is the (left-padded) prompt width of the batch; the generated part of each
    row is ``input_ids[:, prompt_len:]``, whatever the batch size or number of beams.
    ``inplace`` overwrites ``scores`` instead of allocating a new [rows, vocab] tensor each step;
    right for beam search, whose scores are a fresh log-softmax, but not for greedy search,
    which keeps the very tensor it passes in as the raw logits.
    ``excluded``: [batch, num_states] from ``IndexTrie.excluded_states``, or None; the rows of
    example b (b * rows / batch ...) never step into its excluded states.
    """

    def __init__(self, trie: IndexTrie, prompt_len: int, inplace: bool = False,
                 excluded: torch.BoolTensor | None = None):
        self.trie, self.prompt_len, self.inplace, self.excluded = trie, prompt_len, inplace, excluded

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state = self.trie.states(input_ids[:, self.prompt_len:])  # [rows]
        allowed = self.trie.allowed[state]  # [rows, max_children]
        kept = scores.gather(1, allowed)
        if self.excluded is not None:
            example = torch.arange(len(state), device=state.device) // (len(state) // self.excluded.shape[0])
            gone = self.excluded[example[:, None], self.trie.child_state[state]]  # [rows, max_children]
            real = torch.arange(allowed.shape[1], device=state.device) < self.trie.num_children[state][:, None]
            gone = torch.where(real, gone, gone[:, :1])  # padding repeats the first child: the same verdict
            kept = kept.masked_fill(gone, -math.inf)
        out = scores.fill_(-math.inf) if self.inplace else torch.full_like(scores, -math.inf)
        return out.scatter_(1, allowed, kept)


def position_allowed_tokens_fn(sequences: Sequence[Sequence[int]], prompt_len: int, eos_token_id: int,
                               pad_token_id: int | None = None) -> Callable[[int, torch.Tensor], list[int]]:
    """Baseline for the benchmark: the paper's per-position rule, as a ``prefix_allowed_tokens_fn``.
    At generated position j any token seen at position j of any index is allowed; then EOS."""
    per_position = [sorted({seq[j] for seq in sequences}) for j in range(len(sequences[0]))]
    end = [eos_token_id] + ([pad_token_id] if pad_token_id not in (None, eos_token_id) else [])

    def allowed(batch_id: int, row: torch.Tensor) -> list[int]:
        j = row.shape[-1] - prompt_len
        return per_position[j] if j < len(per_position) else end

    return allowed


# --------------------------------------------------------------------------- prefill once per prompt
def takes_cache(model) -> bool:
    """A decoder-only model whose forward takes a ``DynamicCache`` (``cache=``) and position ids."""
    import inspect

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    params = inspect.signature(model.forward).parameters
    return bool(supports and supports()) and "cache" in params and "position_ids" in params


def can_share_prefill(model, input_ids: torch.LongTensor) -> bool:
    """Whether ``shared_prefill`` applies: ``takes_cache`` and prompts of at least two tokens."""
    return input_ids.shape[1] >= 2 and takes_cache(model)


def prompt_position_ids(attention_mask: torch.LongTensor) -> torch.LongTensor:
    """generate's rule: count of attended tokens - 1, 0 on (left) padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)


def prefill(model, input_ids: torch.LongTensor, attention_mask: torch.LongTensor,
            prefixes: "PromptPrefixes | None" = None):
    """Runs left-padded prompts [batch, len] into a fresh ``DynamicCache``; only the last position's
    logits are computed where the model allows it. Returns the model output (``.cache``, ``.logits``).
    A single unpadded prompt that starts with one of ``prefixes`` runs only the tokens after it."""
    if prefixes is None:
        cache, start = DynamicCache(config=model.config), 0
    else:
        cache, start = prefixes.start(model, input_ids, attention_mask)
    return model(input_ids=input_ids[:, start:], attention_mask=attention_mask,
                 position_ids=prompt_position_ids(attention_mask)[:, start:], cache=cache, use_cache=True,
                 **last_logits_only(model, input_ids.shape[1] - start))


class PromptPrefixes:
    """The keys and values of prompt beginnings that every request shares (the instruction wrapper
    and a template's words before its first field), computed once; ``prefill`` then runs a prompt
    that starts with one of them from where it ends.

    For recommend.py, whose every history prompt starts with the same 39 tokens, this takes about
    a fifth of each prefill away. The reused keys are what a full prefill computes, up to the
    rounding of attention over a shorter sequence: in exact arithmetic the ranking is the same, and
    under bf16 the answers agree with fp32's as often as a full prefill's do (docs/recommend.md).
    Add prefixes under the precision the requests run in (the same ``torch.autocast``). Only for
    models whose every layer keeps plain keys and values (``takes_cache`` and ``DynamicLayer``
    only: a sliding window or a recurrent state is not a prefix that can be copied)."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.LongTensor, DynamicCache]] = []  # (token ids [n], cache of n tokens)

    @staticmethod
    def supported(model) -> bool:
        return takes_cache(model) and all(type(layer) is DynamicLayer
                                          for layer in DynamicCache(config=model.config).layers)

    @torch.no_grad()
    def add(self, model, prefix_ids: Sequence[int]) -> bool:
        """Runs ``prefix_ids`` once and keeps their cache; False (nothing kept) for an empty or known
        prefix or a model that is not ``supported``."""
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=model.device)
        if ids.shape[1] == 0 or not self.supported(model) or any(torch.equal(ids[0], k) for k, _ in self.entries):
            return False
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
              **last_logits_only(model, ids.shape[1]))
        self.entries.append((ids[0], cache))
        return True

    def start(self, model, input_ids: torch.LongTensor,
              attention_mask: torch.LongTensor) -> tuple[DynamicCache, int]:
        """Prompts [batch, len] -> (a copy of the cache of the longest known prefix of the prompt, its
        length), or (an empty cache, 0): for a batch of one unpadded prompt only. The prompt's last
        token always runs, for its logits."""
        best = None
        if input_ids.shape[0] == 1 and bool(attention_mask.all()):
            for ids, cache in self.entries:
                n = ids.shape[0]
                longer = best is None or n > best[0].shape[0]
                if n < input_ids.shape[1] and longer and torch.equal(input_ids[0, :n], ids):
                    best = (ids, cache)
        copy = DynamicCache(config=model.config)
        if best is None:
            return copy, 0
        for layer, kept in enumerate(best[1].layers):
            copy.update(kept.keys.clone(), kept.values.clone(), layer)
        return copy, best[0].shape[0]


def common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    """The longest list of token ids that every row starts with."""
    first = list(rows[0])
    n = 0
    while n < len(first) and all(len(row) > n and row[n] == first[n] for row in rows):
        n += 1
    return first[:n]


def last_logits_only(model, length: int) -> dict:
    """The ``logits_to_keep`` that computes only the last of ``length`` positions' logits, where the
    model takes it (else nothing): earlier logits are not needed, and skipping them skips most of
    the LM head. The position goes as an index tensor, not the count 1: the count slices a strided
    view of the hidden states, which under bf16 autocast with bf16 head weights sent the product to
    a batched matmul that copied the whole transposed [hidden, vocab] head (about 60 of a 135M
    model's 270 ms prefill on 2 cores); the index gathers a contiguous row and takes the plain matmul."""
    if not keeps_logits(model):
        return {}
    return {"logits_to_keep": torch.tensor([length - 1], device=model.device)}


def shared_prefill(model, input_ids: torch.LongTensor, attention_mask: torch.LongTensor,
                   num_beams: int) -> DynamicCache:
    """Runs the left-padded prompts [batch, len] without their last token once and repeats the
    key/value cache for every beam -> cache [batch * num_beams, heads, len - 1, head_dim].

    ``generate`` copies each prompt num_beams times before its prefill, so without this the prompt
    is run num_beams times over. Given this cache, generate only runs the last prompt token: it
    slices its inputs to the tokens past ``cache.get_seq_length()``, and its expansion for beam
    search repeats tensors only, not a Cache object. Position ids follow generate's rule (count of
    attended tokens - 1, 0 on padding), so the cached keys are the same as in a full prefill."""
    cache = prefill(model, input_ids[:, :-1], attention_mask[:, :-1]).cache
    cache.batch_repeat_interleave(num_beams)  # row b -> rows b * num_beams ... (b + 1) * num_beams - 1
    return cache


def tree_attention(model, prompt_width: int, new_tokens: int) -> bool:
    """Whether the trie searches can decode as a tree over one prompt cache (``tree_step_mask``):
    a ``takes_cache`` model whose attention takes a ready 4D mask (sdpa, eager), whose layers all
    keep plain keys and values (not the recurrent state of linear-attention, state-space or conv
    layers, which would run a step's beams as one sequence), with no chunked attention or ALiBi
    (their masks and biases are built otherwise), and whose sliding windows, if any, hold the
    prompt and the ``new_tokens`` appended."""
    config = getattr(model, "config", None)
    if not takes_cache(model) or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    text = config.get_text_config(decoder=True)
    if getattr(text, "attention_chunk_size", None) or getattr(text, "alibi", False):
        return False
    layers = DynamicCache(config=config).layers
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return False
    windows = [layer.sliding_window for layer in layers if isinstance(layer, DynamicSlidingWindowLayer)]
    return prompt_width + new_tokens <= min(windows, default=prompt_width + new_tokens)


def tree_step_mask(attention_mask: torch.LongTensor, columns: torch.LongTensor, dtype: torch.dtype,
                   boolean: bool, generated: int | None = None) -> torch.Tensor:
    """The 4D mask of one tree step: the prompts' padding mask [batch, width] and the cache columns
    of each row's tokens so far [batch, rows, t + 1] (generated tokens only, its new one last) ->
    [batch, 1, rows, width + (t + 1) * rows] where each new token sees its prompt and its own tokens.
    Boolean (True = seen) for sdpa; additive (0 / dtype's min) for eager. ``generated``: the cache's
    generated columns so far, this step's included, where a step ran fewer rows than the earlier ones
    (default: every step ``rows``)."""
    batch, rows, steps = columns.shape
    width = attention_mask.shape[1]
    generated = steps * rows if generated is None else generated
    seen = torch.zeros((batch, rows, generated), dtype=torch.bool, device=columns.device)
    seen.scatter_(2, columns - width, True)
    mask = torch.cat([attention_mask.bool()[:, None].expand(batch, rows, width), seen], 2)[:, None]
    if boolean:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def tree_forward(model, tokens: torch.LongTensor, columns: torch.LongTensor, attention_mask: torch.LongTensor,
                 position: torch.LongTensor, cache: DynamicCache, generated: int | None = None) -> torch.Tensor:
    """One tree step: this step's tokens [batch, rows] at cache columns ``columns[..., -1]``, each
    after its own earlier tokens (``columns``) and its prompt, at position ``position`` [batch, 1] (or
    [batch, rows]) -> logits [batch * rows, vocab]. The rows' tokens are appended to the prompt's cache."""
    batch, rows = tokens.shape
    eager = model.config._attn_implementation == "eager"
    mask = tree_step_mask(attention_mask, columns, model.dtype, boolean=not eager, generated=generated)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=position.expand(batch, rows),
                   cache=cache, use_cache=True).logits  # [batch, rows, vocab]
    return logits.reshape(batch * rows, -1)


def choice_forward(model, trie: IndexTrie, state: torch.LongTensor, tokens: torch.LongTensor,
                   columns: torch.LongTensor, attention_mask: torch.LongTensor, position: torch.LongTensor,
                   cache: DynamicCache, generated: int, codes: torch.LongTensor | None = None,
                   lookahead: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.LongTensor, int]:
    """``tree_forward`` for a step under the trie softmax with no EOS term, run only for the beams whose
    prefix (``state`` [batch, rows], after this step's ``tokens``) still holds more than one item.
    Below a prefix with one item every later index token is its prefix's only child, whose
    trie-softmax log-probability is 0 whatever its logit (prior included), so such a beam needs no
    logits and no later step reads its keys. On ml-100k most (a, b) prefixes hold one item and 96%
    of the last-level prefixes have one child, so the later steps run a few beams, or none.

    ``lookahead`` (the step before the last level's): the same forward also runs, after each running
    beam's token, those of its children that have a choice at the last level (a few: most have one
    child), each seeing its prompt, its beam and itself, so that the last level needs no forward of
    its own: -> their logits, looked up by the next step once it has chosen.

    ``columns`` [batch, rows, t]: the cache columns of each beam's earlier tokens; ``generated``: the
    cache's generated columns so far; ``codes``: the token ids the model's output layer is cut to
    (``level_heads``; with ``lookahead``, this level's and the last level's), None for the whole layer.
    -> (the logits of each state's allowed children [batch, rows, C] (``child_logprobs`` with
    ``gathered``), zeros for the rows that did not run; with ``lookahead`` those of each child's
    children [batch, rows, C, C], zeros where not run, else None; the columns with this step's
    [batch, rows, t + 1] (a placeholder, never read, for the rows that did not run); the generated
    columns after this step)."""
    batch, rows = tokens.shape
    device, width = tokens.device, attention_mask.shape[1]
    allowed = trie.allowed[state]  # [batch, rows, C]
    C = allowed.shape[2]
    children = torch.zeros(allowed.shape, device=device)
    choice = trie.items_below[state] > 1  # [batch, rows]
    keep = int(choice.sum(1).max())  # the rows each example runs: its beams with a choice first
    new = torch.full((batch, rows), width, dtype=torch.long, device=device)  # [batch, rows]
    if keep == 0:
        return children, None, torch.cat([columns, new[..., None]], 2), generated
    order = choice.int().argsort(dim=1, descending=True, stable=True)[:, :keep]  # [batch, keep]
    new.scatter_(1, order, (width + generated + torch.arange(keep, device=device)).expand(batch, -1))
    columns = torch.cat([columns, new[..., None]], 2)  # [batch, rows, t + 1]
    picked = columns.gather(1, order[..., None].expand(-1, -1, columns.shape[2]))  # [batch, keep, t + 1]
    run_tokens, run_position = tokens.gather(1, order), position.expand(batch, keep)
    grand, more = None, 0
    if lookahead:  # the children (running beams only) whose own children hold a choice
        grand_state = trie.child_state[state]  # [batch, rows, C]; padding slots: the dead state, no children
        ahead = choice[..., None] & (trie.num_children[grand_state] > 1)  # [batch, rows, C]
        more = int(ahead.flatten(1).sum(1).max())
    if more:
        flat = ahead.flatten(1).int().argsort(dim=1, descending=True, stable=True)[:, :more]  # [batch, more]
        parent = flat // C
        own = width + generated + keep + torch.arange(more, device=device)
        # each sees its parent beam's columns (this step's included) and its own; the beams' rows
        # repeat their last column to the same length (a column marked twice is marked once)
        picked = torch.cat([torch.cat([picked, picked[..., -1:]], 2),
                            torch.cat([columns.gather(1, parent[..., None].expand(-1, -1, columns.shape[2])),
                                       own.expand(batch, -1)[..., None]], 2)], 1)
        run_tokens = torch.cat([run_tokens, allowed.flatten(1).gather(1, flat)], 1)
        run_position = torch.cat([run_position, position.expand(batch, more) + 1], 1)
    out = tree_forward(model, run_tokens, picked, attention_mask, run_position, cache,
                       generated=generated + keep + more).view(batch, keep + more, -1)
    index = order[..., None].expand(-1, -1, C)
    wanted = allowed.gather(1, index)  # [batch, keep, C] token ids
    if codes is not None:  # the output layer was cut to ``codes`` (``level_heads``)
        wanted = code_slots(codes, wanted)
    children.scatter_(1, index, out[:, :keep].gather(2, wanted).float())
    if more:
        later = trie.allowed[grand_state.flatten(1).gather(1, flat)]  # [batch, more, C] their children's ids
        if codes is not None:
            later = code_slots(codes, later)
        values = out[:, keep:].gather(2, later).float()
        values = torch.where(ahead.flatten(1).gather(1, flat)[..., None], values, 0.0)  # padding rows: 0
        grand = torch.zeros((batch, rows * C, C), device=device)
        grand = grand.scatter_(1, flat[..., None].expand(-1, -1, C), values).view(batch, rows, C, C)
    elif lookahead:
        grand = torch.zeros((batch, rows, C, C), device=device)
    return children, grand, columns, generated + keep + more


def level_heads(model, trie: IndexTrie) -> list[torch.nn.Linear] | None:
    """The output layer cut to each index level's codes (one linear layer per level, rows in the
    order of ``trie.level_tokens``), or None where the model's output layer is not a plain linear
    layer that can be swapped. Under the trie softmax a step reads only the logits of its level's
    codes, and the whole layer (about 50k rows for SmolLM2, a quarter of its weights) cost a few
    milliseconds of every decoding step. Cut from the current weights at every search, so a model
    that trains between searches (reinforcement) is always scored with its own head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or not hasattr(model, "set_output_embeddings") or hasattr(head, "_hf_hook"):
        return None
    if hasattr(head.weight, "ds_id") or head.weight.numel() != head.in_features * head.out_features:
        return None  # partitioned (DeepSpeed ZeRO-3): the rows are not here to cut
    return [cut_head(head, codes) for codes in trie.level_tokens]


def cut_head(head: torch.nn.Linear, codes: torch.LongTensor) -> torch.nn.Linear:
    """The output layer ``head`` cut to the rows of the token ids ``codes`` (sorted)."""
    cut = torch.nn.Linear(head.in_features, len(codes), bias=head.bias is not None, device=head.weight.device,
                          dtype=head.weight.dtype)
    cut.weight = torch.nn.Parameter(head.weight.detach()[codes], requires_grad=False)
    if head.bias is not None:
        cut.bias = torch.nn.Parameter(head.bias.detach()[codes], requires_grad=False)
    return cut


def code_slots(codes: torch.LongTensor, tokens: torch.LongTensor) -> torch.LongTensor:
    """Token ids -> their positions among a level's sorted ``codes`` (the columns of a ``level_heads``
    layer); a token that is no code of the level gets some code's position."""
    return torch.searchsorted(codes, tokens.contiguous()).clamp_(max=len(codes) - 1)


def level_children(logits: torch.Tensor, trie: IndexTrie, state: torch.LongTensor, t: int) -> torch.Tensor:
    """Logits over level ``t``'s codes [batch, 1 or beams, codes] (``level_heads``) and trie states
    [batch, beams] -> the logits of each state's allowed children [batch, beams, max_children]
    (``child_logprobs`` with ``gathered``). A child that is no code of the level (EOS of a dead or
    finished beam, whose score is fixed anyway) reads some code's logit."""
    slots = code_slots(trie.level_tokens[t], trie.allowed[state])
    return logits.expand(state.shape[0], state.shape[1], -1).gather(2, slots)


# --------------------------------------------------------------------------- trie-native beam search
def child_logprobs(logits: torch.Tensor, trie: IndexTrie, state: torch.LongTensor, t: int,
                   softmax: str = "full", gathered: bool = False) -> tuple[torch.Tensor, torch.LongTensor]:
    """Next-token logits [batch, 1 or beams, vocab] and trie states [batch, beams] at index position
    ``t`` -> (log-probabilities [batch, beams, children] of each state's allowed children, -inf on
    padding slots; those children's token ids [batch, beams, children]).

    The one definition of a step's score, shared by the beam search, sampling within the trie and
    the log-probabilities reinforcement trains: normalised in float32 over the whole vocabulary
    (full, as generate does), the codes of level ``t`` (level), or the real children of the state
    (trie), after adding the trie's ``log_prior`` where it has one. ``gathered``: ``logits`` are already
    those of each state's allowed children [batch, beams, children] (trie softmax only)."""
    batch, beams = state.shape
    allowed = trie.allowed[state]  # [batch, beams, children]
    real = torch.arange(allowed.shape[-1], device=state.device) < trie.num_children[state][..., None]
    if softmax == "trie":  # normalised over the real children of each beam's prefix
        # the children gathered before the float cast: a [beams, vocab] copy was a fresh 4 MB each step
        raw = (logits if gathered else logits.expand(batch, beams, -1).gather(2, allowed)).float()
        if trie.log_prior is not None:  # --index_prior: the model's logits are a residual on the prior
            raw = raw + trie.log_prior[state]
        cand = raw.masked_fill(~real, -math.inf).log_softmax(-1)
    else:
        if gathered:
            raise ValueError("gathered children logits need the trie softmax")
        logits = logits.float()
        if softmax == "level":
            logprobs = logits - logits[..., trie.level_tokens[t]].logsumexp(-1, keepdim=True)
        else:
            logprobs = torch.log_softmax(logits, -1)
        cand = logprobs.expand(batch, beams, -1).gather(2, allowed)
    return cand.masked_fill(~real, -math.inf), allowed


def response_logprobs(logits: torch.Tensor, tokens: torch.LongTensor, trie: IndexTrie, eos_token_id: int,
                      softmax: str = "full") -> torch.Tensor:
    """Logits [rows, L + 1, vocab] at the positions that predict an item's L index tokens and its EOS,
    and those index tokens [rows, L] -> each token's log-probability [rows, L + 1], normalised as the
    trie search scores it (``child_logprobs``; EOS over the vocabulary). Their mean is the item's
    beam score; unlike the search it keeps the gradient."""
    rows, L = tokens.shape
    state = torch.full((rows, 1), trie.ROOT, dtype=torch.long, device=tokens.device)
    out = []
    for t in range(L):
        cand, allowed = child_logprobs(logits[:, t, None], trie, state, t, softmax)  # [rows, 1, children]
        slot = (allowed[:, 0] == tokens[:, t, None]).float().argmax(-1, keepdim=True)  # [rows, 1]
        out.append(cand[:, 0].gather(1, slot))
        state = trie.child_state[state, slot]
    out.append(torch.log_softmax(logits[:, L].float(), -1)[:, eos_token_id, None])
    return torch.cat(out, 1)


@torch.no_grad()
def trie_sample(model, trie: IndexTrie, input_ids: torch.LongTensor, attention_mask: torch.LongTensor,
                num_samples: int, eos_token_id: int, softmax: str = "full", temperature: float = 1.0,
                generator: torch.Generator | None = None, tree: bool = True) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """Samples items within the trie -> (index tokens [batch, samples, L], scores [batch, samples]).

    Each of ``num_samples`` draws per prompt walks the trie, choosing among the allowed children
    with probabilities ``softmax(log p / temperature)``; draws may repeat an item. Scores are the
    untempered beam scores of the drawn items (mean log-probability over L + 1 tokens, EOS
    included), so draws can be ranked like beams. The prompt runs once; the draws share its cache as a
    tree (``tree_attention``) or, where the model does not allow that, get a copy each."""
    batch, width = input_ids.shape
    device, L = input_ids.device, trie.index_len
    tree = tree and tree_attention(model, width, L * num_samples)
    out = prefill(model, input_ids, attention_mask)
    cache, logits = out.cache, out.logits[:, -1]  # [batch, vocab]
    position = prompt_position_ids(attention_mask)[:, -1:] + 1  # [batch, 1]
    if not tree:  # one copy of the prompt cache per draw
        cache.batch_repeat_interleave(num_samples)
        position = position.repeat_interleave(num_samples, 0)
    padded = bool((attention_mask == 0).any())
    mask = attention_mask.repeat_interleave(num_samples, 0) if padded and not tree else None
    columns = torch.empty((batch, num_samples, 0), dtype=torch.long, device=device)  # tree: each draw's tokens
    state = torch.full((batch, num_samples), trie.ROOT, dtype=torch.long, device=device)
    tokens = torch.empty((batch, num_samples, 0), dtype=torch.long, device=device)
    scores = torch.zeros((batch, num_samples), device=device)
    for t in range(L):
        cand, allowed = child_logprobs(logits.view(batch, -1, logits.shape[-1]), trie, state, t, softmax)
        probs = (cand / temperature).softmax(-1).view(batch * num_samples, -1)  # padding slots: 0
        slot = torch.multinomial(probs, 1, generator=generator).view(batch, num_samples, 1)
        scores = scores + cand.gather(2, slot).squeeze(-1)
        chosen = allowed.gather(2, slot)  # [batch, samples, 1]
        state = trie.child_state[state, slot.squeeze(-1)]
        tokens = torch.cat([tokens, chosen], 2)
        if tree:  # draws never swap places: each keeps its columns
            new = width + t * num_samples + torch.arange(num_samples, device=device)
            columns = torch.cat([columns, new.expand(batch, -1)[..., None]], 2)
            logits = tree_forward(model, chosen[..., 0], columns, attention_mask, position + t, cache)
            continue
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        logits = model(input_ids=chosen.view(-1, 1), attention_mask=mask, position_ids=position + t,
                       cache=cache, use_cache=True).logits[:, -1]
    eos = torch.log_softmax(logits.float(), -1)[:, eos_token_id].view(batch, num_samples)
    return tokens, (scores + eos) / (L + 1)


@torch.no_grad()
def trie_beam_search(model, trie: IndexTrie, input_ids: torch.LongTensor, attention_mask: torch.LongTensor,
                     num_beams: int, eos_token_id: int, softmax: str = "full",
                     excluded: torch.BoolTensor | None = None, tree: bool = True,
                     score_eos: bool = True, prefixes: PromptPrefixes | None = None,
                     state_bonus: torch.Tensor | None = None) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """Beam search over the trie's items only -> (index tokens [batch, beams, L], scores [batch, beams]).

    The same search and scores as ``generate``'s beam search with ``TrieLogitsProcessor`` (length
    penalty 1): each step normalises the logits over the whole vocabulary (log-softmax), extends
    every beam by its allowed children only, keeps the best ``num_beams`` of batch x beams x
    children candidates and reorders the cache; after the L index tokens the EOS log-probability is
    added and the sum divided by the generated length L + 1. All items have L tokens, so no beam
    finishes early. What it saves over generate is work on [beams, vocab] tensors: the top-k runs
    over beams x max_children candidates, not beams x vocab, and no masked copy of the scores is
    made. Beams that have no real item to reach (fewer than ``num_beams`` items below the kept
    prefixes) score -inf. The prompt runs once per example; the beams share its cache as a tree
    (``tree_attention``) or, where the model does not allow that, get a copy each, reordered as they move.
    Candidates with exactly equal float scores may be kept in another order than generate keeps them.

    ``softmax``: what each index token's log-probability is normalised over: the whole vocabulary
    (full, as generate does), the codes of its level (level) or the children the trie allows after
    the beam's prefix (trie), matching a model trained with ``--index_softmax`` level or trie (its
    text rows were never pushed down, so their share of a full softmax would differ from prefix to
    prefix and blur the ranking). EOS keeps the full softmax, as in that training. A trie with a
    ``log_prior`` (a model trained with ``--index_prior``) adds it to the logits before the trie
    softmax, as that training did.

    ``excluded``: [batch, num_states] from ``IndexTrie.excluded_states`` (e.g. the items of each
    user's history), or None. A beam never steps into a state whose items are all excluded, so the
    beams hold the best items that are left, not the best items less the excluded ones; the kept
    items score exactly as without the exclusion (a trie softmax still normalises over all children).

    ``score_eos``: False leaves out the EOS term and the model forward that only computes it (one of
    the L + 1 forwards); the scores are then the mean over the L index tokens. For serving, where
    that forward is a fifth of an answer's time and a model trained on complete indices gives EOS
    nearly all its mass at every leaf (recommend.md has the measured effect on the ranking).

    ``prefixes``: a ``PromptPrefixes`` whose known prompt beginnings a single prompt does not run again.

    ``state_bonus``: [batch, num_states] log-weights of the trie states (``Decoder.fusion``): a beam that
    steps from a state into a child gains the child's weight less the state's, so an item's score gains
    its leaf's weight (less the root's) and the beams are pruned by their prefixes' weights on the way.
    """
    batch, width = input_ids.shape
    device, L = input_ids.device, trie.index_len
    tree = tree and tree_attention(model, width, L * num_beams)
    # under the trie softmax each step reads only its level's codes: the output layer is cut to them
    # (the whole vocabulary again for the EOS term) and put back whatever happens
    heads = level_heads(model, trie) if softmax == "trie" else None
    full_head = model.get_output_embeddings() if heads is not None else None

    # without the EOS term, under the trie softmax, a step runs only the beams that still have a choice,
    # and the step before the last level's scores the last level too (``choice_forward``)
    sparse = tree and softmax == "trie" and not score_eos
    lookahead_at = L - 3 if sparse else -1  # the step whose forward looks ahead (none for L < 3)
    joint_codes = torch.cat(trie.level_tokens[-2:]).unique() if sparse and L >= 3 else None  # sorted
    if heads is not None and joint_codes is not None:
        heads.append(cut_head(full_head, joint_codes))  # heads[L]: the lookahead step's two levels

    def use_head(level: int) -> None:  # the output layer of the next forward, which scores level ``level``
        if heads is not None:
            model.set_output_embeddings(heads[level] if level < L else full_head)

    try:
        use_head(0)
        out = prefill(model, input_ids, attention_mask, prefixes)
        cache, logits = out.cache, out.logits[:, -1]  # logits [batch, vocab]
        position = prompt_position_ids(attention_mask)[:, -1:] + 1  # [batch, 1]
        if not tree:  # one copy of the prompt cache per beam, reordered as beams move
            cache.batch_repeat_interleave(num_beams)
            position = position.repeat_interleave(num_beams, 0)  # [rows, 1]
        padded = bool((attention_mask == 0).any())
        mask = attention_mask.repeat_interleave(num_beams, 0) if padded and not tree else None  # [rows, width + t]
        columns = torch.empty((batch, num_beams, 0), dtype=torch.long, device=device)  # tree: each beam's tokens
        generated = 0  # tree: the cache's columns after the prompt
        grand = None  # the lookahead step's logits of the last level [batch, beams, C, C]

        # one live beam per example at first (the others start at -inf, as generate's -1e9)
        scores = torch.full((batch, num_beams), -math.inf, device=device)
        scores[:, 0] = 0.0
        state = torch.full((batch, num_beams), trie.ROOT, dtype=torch.long, device=device)
        tokens = torch.empty((batch, num_beams, 0), dtype=torch.long, device=device)
        offset = torch.arange(batch, device=device)[:, None] * num_beams  # [batch, 1] first row of each example
        children = trie.allowed.shape[1]
        gathered = False  # whether ``logits`` hold only each state's children (``choice_forward``)
        for t in range(L):
            logits = logits.view(batch, -1, logits.shape[-1])
            if heads is not None and not gathered:  # logits over level t's codes only
                logits, gathered = level_children(logits, trie, state, t), True
            cand, allowed = child_logprobs(logits, trie, state, t, softmax, gathered)
            gathered = False
            if excluded is not None:  # children whose every item is excluded for this example
                gone = excluded.gather(1, trie.child_state[state].flatten(1)).view_as(cand)
                cand = cand.masked_fill(gone, -math.inf)
            if state_bonus is not None:  # the children's weights less their parent's
                cand = (cand + state_bonus.gather(1, trie.child_state[state].flatten(1)).view_as(cand)
                        - state_bonus.gather(1, state)[..., None])
            cand = cand + scores[..., None]  # -inf on padding slots stays -inf
            scores, flat = cand.view(batch, -1).topk(num_beams, dim=1)  # [batch, beams]
            beam, slot = flat // children, flat % children
            chosen = allowed.gather(1, beam[..., None].expand(-1, -1, children)).gather(2, slot[..., None])  # [b, k, 1]
            state = trie.child_state[state.gather(1, beam), slot]
            tokens = torch.cat([tokens.gather(1, beam[..., None].expand(-1, -1, t)), chosen], 2)
            if t == L - 1 and not score_eos:
                return tokens, scores / L
            if tree:  # a beam's earlier tokens are its parent's; its new one goes to the next free column
                columns = columns.gather(1, beam[..., None].expand(-1, -1, t))
                if sparse and grand is not None:  # the last level's logits came with the previous step
                    parent = (beam * children + slot)[..., None].expand(-1, -1, children)  # [batch, beams, C]
                    logits, gathered = grand.flatten(1, 2).gather(1, parent), True
                    continue
                if sparse:
                    lookahead = t == lookahead_at
                    if heads is not None:
                        model.set_output_embeddings(heads[L] if lookahead else heads[t + 1])
                    codes = None if heads is None else joint_codes if lookahead else trie.level_tokens[t + 1]
                    logits, grand, columns, generated = choice_forward(
                        model, trie, state, chosen[..., 0], columns, attention_mask, position + t, cache, generated,
                        codes, lookahead)
                    gathered = True
                    continue
                use_head(t + 1)
                new = width + generated + torch.arange(num_beams, device=device)
                columns = torch.cat([columns, new.expand(batch, -1)[..., None]], 2)
                generated += num_beams
                logits = tree_forward(model, chosen[..., 0], columns, attention_mask, position + t, cache)
                continue
            if t > 0:  # at t = 0 every row of an example holds the same prompt cache
                cache.reorder_cache((beam + offset).flatten())
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            use_head(t + 1)
            logits = model(input_ids=chosen.view(-1, 1), attention_mask=mask, position_ids=position + t,
                           cache=cache, use_cache=True).logits[:, -1]  # [rows, vocab]
        # every live beam is at a leaf, where only EOS is allowed: score it and normalise by the length
        eos = torch.log_softmax(logits.float(), -1)[:, eos_token_id].view(batch, num_beams)
        return tokens, (scores + eos) / (L + 1)
    finally:
        if heads is not None:
            model.set_output_embeddings(full_head)


# --------------------------------------------------------------------------- one batch
@dataclass
class Decoder:
    """What a batch needs to be decoded into ranked items."""

    trie: IndexTrie
    item_of: dict[tuple[int, ...], str]  # token ids of an index -> item id
    eos_token_id: int
    pad_token_id: int
    mode: str = "trie"  # trie | position | none
    filter_items: bool = False
    item_of_str: dict[str, str] = field(default_factory=dict)  # "<a_1><b_2><c_3>" -> item id
    share_prefill: bool = True  # run each prompt once, not once per beam (see ``shared_prefill``)
    search: str = "trie"  # trie: ``trie_beam_search`` (mode trie only); hf: transformers' generate
    softmax: str = "full"  # what each step's scores are normalised over: full, level or trie (see trie_beam_search)
    tree: bool = True  # the trie search's beams share one prompt cache where the model allows it (``tree_attention``)
    score_eos: bool = True  # the trie search adds each item's EOS log-probability (see ``trie_beam_search``)
    prefixes: PromptPrefixes | None = None  # prompt beginnings whose cache the trie search reuses
    fusion: CooccurrenceTeacher | None = None  # --fusion_weight: the item co-occurrence ranker
    fusion_weight: float = 0.0
    position_of: dict[str, int] = field(default_factory=dict)  # item id -> its position in the trie's order

    @classmethod
    def build(cls, tokenizer, indices: dict[str, list[str]], mode: str = "trie", filter_items: bool = False,
              device: torch.device | None = None, share_prefill: bool = True, search: str = "trie",
              softmax: str = "full", prior: dict[str, float] | None = None, tree: bool = True,
              score_eos: bool = True, fusion_inters: dict[str, list] | None = None, fusion_weight: float = 0.0,
              fusion_settings: dict | None = None) -> "Decoder":
        """From the index file's ``{item: [token, ...]}``, whose tokens were checked when the model
        and tokenizer were loaded (modeling.index_token_ids); the options were checked by the parser.
        A softmax other than full needs the trie search (mode and search "trie"). ``prior``: item ->
        weight, the popularity prior of a model trained with ``--index_prior`` (trie softmax only).
        ``tree``: False gives each beam of the trie search its own copy of the prompt cache.
        ``score_eos``: False leaves the EOS term out of the trie search's scores (generate keeps it).
        ``fusion_weight`` > 0: each item's beam score gains that weight times the log-probability the
        item co-occurrence ranker gives it after the example's history (``item_teacher.CooccurrenceRanker``
        counted on ``fusion_inters``' training parts with ``fusion_settings`` (its context, window, decay and
        damping; the defaults where left out), mapped onto the trie by ``CooccurrenceTeacher``; shallow
        fusion, trie search only); ``rank`` then needs each example's history."""
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token; decoding needs one to end an index")
        if prior is not None and (softmax, mode, search) != ("trie", "trie", "trie"):
            raise DataError("a prior over items (--index_prior) needs the trie softmax and the trie search, "
                            f"got softmax {softmax!r}, decoding {mode!r}, beam search {search!r}")
        pad = eos if pad is None else pad
        item_ids = {item: tokenizer.convert_tokens_to_ids(toks) for item, toks in indices.items()}
        if fusion_weight < 0 or (fusion_weight > 0 and fusion_inters is None):
            raise ValueError(f"fusion needs a weight >= 0 and the interactions to count, got {fusion_weight}")
        if fusion_weight > 0 and (mode, search) != ("trie", "trie"):
            raise DataError(f"--fusion_weight {fusion_weight} needs the trie search (--decoding trie --beam_search "
                            f"trie), got decoding {mode!r}, beam search {search!r}")
        weights = None if prior is None else [prior[item] for item in item_ids]
        trie = IndexTrie(list(item_ids.values()), eos, pad, weights)
        fusion = None
        if fusion_weight > 0:
            from item_teacher import CONTEXT, DAMPING, DECAY, WINDOW, CooccurrenceTeacher

            settings = {"context": CONTEXT, "window": WINDOW, "decay": DECAY, "damping": DAMPING,
                        **(fusion_settings or {})}
            fusion = CooccurrenceTeacher.build(fusion_inters, list(item_ids), trie, list(item_ids.values()), **settings)
        if device is not None:
            trie.to(device)
            if fusion is not None:
                fusion.to(device)
        return cls(trie, {tuple(v): k for k, v in item_ids.items()}, eos, pad, mode, filter_items,
                   {"".join(toks): item for item, toks in indices.items()}, share_prefill, search, softmax, tree,
                   score_eos, fusion=fusion, fusion_weight=float(fusion_weight),
                   position_of={item: k for k, item in enumerate(item_ids)})

    def generation_config(self, num_beams: int) -> GenerationConfig:
        # do_sample=False explicitly: recent transformers may otherwise sample from the model's defaults.
        # Only what the ranking reads is kept: beam search's sequences_scores (which transformers only
        # returns with output_scores), greedy search's raw logits. min_length=0 and no
        # min_new_tokens: any min_new_tokens, even 0, adds a length processor that copies the scores
        # every step (evaluate_checkpoint replaces the checkpoint's generation config, so none comes from it).
        return GenerationConfig(
            num_beams=num_beams, num_return_sequences=num_beams, do_sample=False, early_stopping=False,
            max_new_tokens=self.trie.index_len + 1, output_scores=num_beams > 1, output_logits=num_beams == 1,
            return_dict_in_generate=True,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, length_penalty=1.0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
        )

    def item_of_string(self, index: str) -> str | None:
        """The item of a ground-truth index string such as ``<a_1><b_2><c_3>``."""
        return self.item_of_str.get(index)

    def item_for(self, generated: list[int]) -> str | None:
        """The item whose index is exactly ``generated`` up to the first EOS/pad, else None."""
        ends = [i for i, t in enumerate(generated) if t in (self.eos_token_id, self.pad_token_id)]
        return self.item_of.get(tuple(generated[: ends[0]] if ends else generated))

    def excluded_states(self, exclude: Sequence[Iterable[str]]) -> torch.BoolTensor:
        """Per example, item ids to leave out -> the trie's ``excluded_states`` (ids of no item are ignored)."""
        if self.mode != "trie":
            raise DataError(f"leaving items out needs the trie decoding (--decoding trie), got {self.mode!r}")
        tokens_of = {item: ids for ids, item in self.item_of.items()}
        return self.trie.excluded_states([[tokens_of[i] for i in items if i in tokens_of] for items in exclude])

    def fusion_bonus(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """Per example, its history's item ids (oldest first) -> ``fusion_weight`` x the log-mass the
        co-occurrence ranker puts below each trie state [batch, num_states] (ids of no item are ignored)."""
        q = self.fusion.next_item([[self.position_of[str(i)] for i in h if str(i) in self.position_of]
                                   for h in histories])
        return self.fusion_weight * self.fusion.state_log_mass(q)

    @torch.no_grad()
    def rank(self, model, encodings: dict[str, torch.Tensor], num_beams: int,
             exclude: Sequence[Iterable[str]] | None = None,
             histories: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str | None, float]]]:
        """Beam-search one left-padded batch; per example, (item or None, score) best first.
        ``exclude``: per example, item ids that must not be returned (the search ranks the others).
        ``histories``: per example, the item ids of its history, oldest first (needed with ``fusion``)."""
        input_ids, attention_mask = encodings["input_ids"], encodings["attention_mask"]
        excluded = None if exclude is None else self.excluded_states(exclude)
        bonus = None
        if self.fusion is not None:
            if histories is None or len(histories) != input_ids.shape[0]:
                raise ValueError("fusion with the co-occurrence ranker needs one history per example")
            if not takes_cache(model):
                raise DataError("--fusion_weight needs the trie search, which this model cannot run")
            bonus = self.fusion_bonus(histories)
        if self.mode == "trie" and self.search == "trie" and takes_cache(model):
            tokens, scores = trie_beam_search(model, self.trie, input_ids, attention_mask, num_beams, self.eos_token_id,
                                              self.softmax, excluded, self.tree, self.score_eos, self.prefixes,
                                              bonus)
            return self.ranked(tokens.flatten(0, 1).tolist(), scores.flatten().tolist(), num_beams)
        prompt_len = input_ids.shape[1]
        kwargs = {}
        if self.mode == "trie":
            kwargs["logits_processor"] = LogitsProcessorList([TrieLogitsProcessor(self.trie, prompt_len,
                                                                                  inplace=num_beams > 1,
                                                                                  excluded=excluded)])
        elif self.mode == "position":
            seqs = [list(k) for k in self.item_of]
            kwargs["prefix_allowed_tokens_fn"] = position_allowed_tokens_fn(seqs, prompt_len, self.eos_token_id,
                                                                            self.pad_token_id)
        if self.share_prefill and can_share_prefill(model, input_ids):
            kwargs["cache"] = shared_prefill(model, input_ids, attention_mask, num_beams)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             generation_config=self.generation_config(num_beams), **kwargs)
        generated = out.sequences[:, prompt_len:].tolist()  # [batch * beams, new]
        if num_beams > 1:  # beam search: summed log-probabilities / length (all items have one length)
            scores = out.sequences_scores.float().tolist()
        else:  # greedy: the same score, from the raw logits of the chosen tokens
            step = torch.stack(out.logits, 1).float().log_softmax(-1)  # [batch, new, vocab]
            chosen = out.sequences[:, prompt_len:prompt_len + step.shape[1]]
            scores = (step.gather(2, chosen[..., None]).squeeze(-1).sum(1) / step.shape[1]).tolist()
        return self.ranked(generated, scores, num_beams)

    def ranked(self, generated: list[list[int]], scores: list[float],
               num_beams: int) -> list[list[tuple[str | None, float]]]:
        """Rows b * num_beams ... of ``generated``/``scores`` -> example b's distinct items, best first.
        Beams scored -inf (no item left to reach) are dropped."""
        ranked = []
        for b in range(len(scores) // num_beams):
            beams = sorted(range(b * num_beams, (b + 1) * num_beams), key=lambda r: -scores[r])
            seen, items = set(), []
            for r in beams:
                if not scores[r] > -math.inf:  # also NaN: generate's beams with nothing left to reach
                    continue
                item = self.item_for(generated[r])
                if item is None and self.filter_items:
                    continue
                if item is not None and item in seen:
                    continue
                seen.add(item)
                items.append((item, scores[r]))
            ranked.append(items)
        return ranked


def rank_batch_with_backoff(decoder: Decoder, model, encodings, num_beams: int, oom_backoff: bool,
                            on_backoff: Callable[[int, int], None] | None = None,
                            exclude: Sequence[Iterable[str]] | None = None,
                            histories: Sequence[Sequence[str]] | None = None):
    """``decoder.rank`` that, with ``oom_backoff``, retries the batch on CUDA out-of-memory with
    half the beams (down to 1). Returns (ranked, beams used)."""
    beams = num_beams
    while True:
        try:
            return decoder.rank(model, encodings, beams, exclude=exclude, histories=histories), beams
        except torch.cuda.OutOfMemoryError:
            if not oom_backoff or beams == 1:
                raise
        # outside the except block the failed attempt's tensors (held by its traceback) are freed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        new = max(1, beams // 2)
        log.warning("CUDA out of memory with %d beams on a batch of %d; retrying it with %d beams",
                    beams, encodings["input_ids"].shape[0], new)
        if on_backoff is not None:
            on_backoff(beams, new)
        beams = new


def scoring_softmax(index_softmax: str) -> str:
    """The scoring that matches a training loss (finetune.py --index_softmax none|level|trie)."""
    return "full" if index_softmax in (None, "none") else index_softmax
