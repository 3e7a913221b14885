"""Top-K items from a trained model: for a user, a typed history, or a free-text request.

The model loads once (:class:`Recommender`); each request renders the same prompt templates
training used (seqrec template 0 for histories, an itemsearch template for requests) and
decodes with the trie-constrained beam search of test.py, so every returned item is a real
item. Items of the history are left out by the search itself (``keep_history`` keeps them), so K
new items come back. Bad input raises :class:`RequestError` with a message meant for the person
who typed it, quoting at most ``QUOTE`` characters of what was typed.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import threading
import time
from dataclasses import asdict, dataclass

import prompt
from arguments import cooccurrence_settings
from checkpoint_record import check_checkpoint
from dataset_files import held_out
from utils import DataError

QUOTE = 200  # characters of a request's text that an error message repeats


class RequestError(DataError):
    """A request that cannot be answered as asked (unknown user or title, empty history, bad K)."""


def shorten(text: str, width: int = QUOTE) -> str:
    """``text`` cut to ``width`` characters, the cut marked with an ellipsis (and the full length)."""
    text = str(text)
    return text if len(text) <= width else f"{text[:max(width - 1, 0)]}… ({len(text)} characters)"


@dataclass
class Recommendation:
    rank: int
    item: str
    title: str
    index: str
    score: float  # the beam's mean log-probability per index token (and EOS with --score_eos); higher is better
    in_history: bool


def match_title(text: str, titles: dict[str, str]) -> tuple[str, str | None]:
    """(item, note) for a typed title: exact, then case-insensitive, then the closest title (the
    note says which was taken). Unknown: RequestError listing the closest titles."""
    text = " ".join(text.split())
    exact = [i for i, t in titles.items() if t == text]
    if exact:
        return exact[0], None
    folded = [i for i, t in titles.items() if t.casefold() == text.casefold()]
    if folded:
        return folded[0], None
    by_title = {t.casefold(): i for i, t in titles.items()}
    close = difflib.get_close_matches(text.casefold(), list(by_title), n=5, cutoff=0.75)
    if close:
        item = by_title[close[0]]
        return item, f'"{shorten(text)}" matched to "{titles[item]}"'
    near = difflib.get_close_matches(text.casefold(), list(by_title), n=5, cutoff=0.3)
    hint = "; closest titles: " + "; ".join(f'"{titles[by_title[t]]}"' for t in near) if near else ""
    raise RequestError(f'unknown title "{shorten(text)}"{hint}')


class Recommender:
    """A checkpoint, its dataset's files and the decoder, loaded once; ``recommend`` per request."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from transformers import GenerationConfig

        import data
        from collator import TestCollator
        from evaluation import checkpoint_prior, checkpoint_softmax, prompt_budget
        from generation import Decoder
        from modeling import cast_linear_weights, load_for_inference, pack_linear_weights
        from utils import cpu_autocast_bf16, default_dtype, get_device

        if not args.ckpt_path:
            raise DataError("--ckpt_path is required: the fine-tuned checkpoint folder (or the LoRA adapter with --lora)")
        self.num_beams = int(args.num_beams)
        if self.num_beams < 1:
            raise DataError(f"--num_beams must be at least 1, got {self.num_beams}")
        self.files = data.load_files(args)
        self.indices = self.files.indices
        self.prompts = prompt.prompt_set(args)
        # before the weights load: prompt settings from the checkpoint, its index and templates checked
        check_checkpoint(args, self.indices, self.prompts, lambda msg: print(f"note: {msg}", file=sys.stderr))
        self.history_template = self.prompts.template_id("seqrec", {"history"})
        if self.history_template is None:
            raise DataError(f"{self.prompts.source}: templates.seqrec: no template asks for the next item from "
                            "{history} alone; recommend.py needs one")
        self.query_template = self.prompts.template_id("itemsearch", {"query"})
        self.history_query_template = self.prompts.template_id("itemsearch", {"history", "query"})
        self.seqrec = data.SeqRecDataset(args, "test", prompt_id=self.history_template)  # histories as in training
        self.max_his_len = self.seqrec.max_his_len
        self.titles = {item: self.seqrec.title_of(item) for item in self.indices if item in self.files.items}
        self.searchable = {item: title for item, title in self.titles.items() if title}  # what typed titles match
        device = get_device(args.gpu_id)
        self.model, self.tokenizer = load_for_inference(args.ckpt_path, self.indices, dtype=default_dtype(device),
                                                        device=device, lora=args.lora, base_model=args.base_model)
        self.model.generation_config = GenerationConfig(eos_token_id=self.tokenizer.eos_token_id,
                                                        pad_token_id=self.tokenizer.pad_token_id)
        self.decoder = Decoder.build(self.tokenizer, self.indices, device=device, tree=not args.copy_prompt_cache,
                                     score_eos=args.score_eos,
                                     softmax=checkpoint_softmax(args.score_softmax, self.model),
                                     prior=checkpoint_prior(args.score_prior, self.model, args, self.indices,
                                                            self.files.inters),
                                     fusion_inters=self.files.inters, fusion_weight=args.fusion_weight,
                                     fusion_settings=cooccurrence_settings(args))
        index_len = len(next(iter(self.indices.values())))
        self.collate = TestCollator(self.tokenizer, prompt_budget(args.model_max_length, index_len))
        self.device = device
        self.bf16_autocast = cpu_autocast_bf16(device, args.cpu_bf16)  # as test.py decodes (--cpu_bf16)
        if self.bf16_autocast:  # the casts autocast would make at every request, made once, laid out for oneDNN
            cast_linear_weights(self.model, torch.bfloat16)
            if not args.no_pack_weights:
                pack_linear_weights(self.model, rows=self.num_beams)
        self.decoder.prefixes = None if args.no_prefix_cache else self.prompt_prefixes()
        self.lock = threading.Lock()  # one request at a time on the model

    def prompt_prefixes(self) -> "PromptPrefixes":  # noqa: F821
        """The cached beginnings of the prompts ``build_prompt`` makes: for each kind of request, the
        tokens that two requests with other fields share (the wrapper and the template's first words)."""
        import torch

        from generation import PromptPrefixes, common_prefix

        prefixes = PromptPrefixes()
        items = list(self.indices)
        # two histories whose first index tokens differ, so the shared part ends where histories begin
        other = [i for i in items if self.indices[i][0] != self.indices[items[0]][0]] or items[1:]
        if not other:
            return prefixes
        first, others = items[:1], other[:2]
        pairs = [((first, None), (others, None))]
        if self.query_template is not None:
            pairs.append((([], "a comedy"), ([], "films about space travel")))
        if self.history_query_template is not None:
            pairs.append(((first, "a comedy"), (others, "films about space travel")))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_autocast):
            for pair in pairs:
                ids = [self.collate.encode(self.build_prompt(*fields))[0] for fields in pair]
                prefixes.add(self.model, common_prefix(ids))
        return prefixes

    # ------------------------------------------------------------------ inputs
    def user_history(self, user: str) -> tuple[list[str], str]:
        """The user's test-time history (all but the last interaction) and the held-out last item."""
        seq = self.files.inters.get(str(user).strip())
        if seq is None:
            users = list(self.files.inters)
            raise RequestError(f"unknown user {shorten(user)!r}; users are {users[0]} ... {users[-1]} "
                               f"({len(users)} in all)")
        history, item = held_out(seq, "test")
        return [str(i) for i in history], str(item)

    def history_from_titles(self, text: str) -> tuple[list[str], list[str]]:
        """'Title one; Title two' -> (items, notes on the closest matches taken)."""
        items, notes = [], []
        for part in (p.strip() for p in text.split(";")):
            if part:
                item, note = match_title(part, self.searchable)
                items.append(item)
                notes += [note] if note else []
        return items, notes

    def history_from_ids(self, ids: str | list) -> list[str]:
        parts = ids if isinstance(ids, list) else str(ids).split(",")
        items = [str(p).strip() for p in parts if str(p).strip()]
        unknown = [i for i in items if i not in self.indices]
        if unknown:
            shown = [shorten(i, 40) for i in unknown[:5]]
            raise RequestError(f"unknown item ids {shown}; ids are the keys of the index file "
                               f"({len(self.indices)} items)")
        return items

    # ------------------------------------------------------------------ the request
    def build_prompt(self, history: list[str], query: str | None) -> str:
        if query is not None and not query.strip():
            raise RequestError("the request text is empty")
        if query is None:
            if not history:
                raise RequestError("the history is empty; give at least one item")
            template = self.prompts.task("seqrec")[self.history_template]
            return self.prompts.wrap(template["instruction"].format(history=self.seqrec.format_history(history)))
        query = " ".join(query.split())
        tid = self.history_query_template if history else self.query_template
        if tid is None:
            what = "a history and a request" if history else "a request alone"
            raise RequestError(f"the prompt templates ({self.prompts.source}) have no itemsearch template for {what}")
        template = self.prompts.task("itemsearch")[tid]
        fields = {"query": query, "history": self.seqrec.format_history(history) if history else ""}
        return self.prompts.wrap(template["instruction"].format(**fields))

    def recommend(self, history: list[str], query: str | None = None, k: int = 10, keep_history: bool = False) -> dict:
        """Top-``k`` items for a history (oldest first) and/or a request text; the history's own
        items are left out unless ``keep_history``."""
        import torch

        if not 1 <= int(k) <= len(self.indices):
            raise RequestError(f"K must be between 1 and the number of items ({len(self.indices)}), got {k}")
        k = int(k)
        seen = set(history)
        left = len(self.indices) - len(seen & self.indices.keys())  # items the search may return
        if not keep_history and k > left:
            raise RequestError(f"K is {k} but only {left} items are not in the history; ask for fewer or keep "
                               "the history's items (--keep_history; keep_history in a web request)")
        notes = []
        if len(history) > self.max_his_len > 0:
            notes.append(f"the history has {len(history)} items; the model sees the most recent {self.max_his_len}")
        text = self.build_prompt(history, query)
        beams = max(self.num_beams, k) if keep_history else min(max(self.num_beams, k), left)
        start = time.perf_counter()
        with self.lock:
            encodings, _ = self.collate([{"prompt": text, "target": ""}])
            if self.collate.last_cut[0]:
                notes.append("the prompt was longer than --model_max_length; its oldest tokens were cut")
            encodings = {name: t.to(self.device) for name, t in encodings.items()}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_autocast):
                ranked = self.decoder.rank(self.model, encodings, beams, exclude=None if keep_history else [seen],
                                           histories=[history])[0]
        items = [Recommendation(rank, item, self.titles.get(item, ""), "".join(self.indices[item]), round(score, 4),
                                item in seen)
                 for rank, (item, score) in enumerate(((i, s) for i, s in ranked if i is not None), start=1)][:k]
        first_used = max(0, len(history) - self.max_his_len) if self.max_his_len > 0 else 0
        return {"items": [asdict(r) for r in items],
                "history": [{"item": i, "title": self.titles.get(i, ""), "in_prompt": n >= first_used}
                            for n, i in enumerate(history)],
                "query": query, "notes": notes, "num_beams": beams, "keep_history": bool(keep_history),
                "latency_ms": round(1000 * (time.perf_counter() - start), 1)}

    def answer(self, user: str | None = None, history: str | None = None, history_ids: str | list | None = None,
               query: str | None = None, k: int = 10, keep_history: bool = False) -> dict:
        """One request from the command line or the web page: exactly one of user / history /
        history_ids, or none of them with a query. The history's items are left out of the answer
        unless ``keep_history`` (the held-out item of a user is not in the history)."""
        given = [name for name, v in (("user", user), ("history", history), ("history_ids", history_ids))
                 if v not in (None, "", [])]
        if len(given) > 1:
            raise RequestError(f"give one of user, history or history_ids, not {' and '.join(given)}")
        if not given and query is None:
            raise RequestError("nothing to recommend from: give a user, a history (titles or item ids) or a request")
        held_out, notes = None, []
        if user not in (None, ""):
            items, held_out = self.user_history(str(user))
        elif history not in (None, ""):
            items, notes = self.history_from_titles(history)
            if not items:
                raise RequestError("the history is empty; give at least one title")
        elif history_ids not in (None, "", []):
            items = self.history_from_ids(history_ids)
        else:
            items = []
        out = self.recommend(items, query, k, keep_history)
        out["notes"] = notes + out["notes"]
        if held_out is not None:
            ranks = [r["rank"] for r in out["items"] if r["item"] == held_out]
            out["held_out"] = {"item": held_out, "title": self.titles.get(held_out, ""),
                               "rank": ranks[0] if ranks else None}
        return out
