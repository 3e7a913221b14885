"""Write <D>.user.json: each user's explicit preferences and vague intentions, by an instruction LLM.

For every user (items sorted by time):
  - explicit preferences, from the titles of ``items[:-3]`` (the last ``--pref_len`` of them):
    a general one (the whole window), a long-term one (the window without its most recent
    ``--recent_len`` items) and a short-term one (those recent items);
  - vague intentions, each a pair [user-related, item-related]: train about ``items[-3]``
    (history ``items[:-3]``), test about ``items[-1]`` (history ``items[:-1]``). They are written
    from the user's review of the item where ``<D>.review.json`` exists, else from the item's
    own title and description.

Backends: ``hf`` (a local transformers causal LM, the embedded SmolLM2-135M-Instruct by default)
and ``openai`` (any OpenAI-compatible chat-completions endpoint; base URL, model and key default
to $OPENAI_BASE_URL, $OPENAI_MODEL and $OPENAI_API_KEY). ``--require_instruct`` refuses an hf
model whose tokenizer has no chat template (a base model, not instruction-tuned).

Answers are one sentence, greedy, at most 32 new tokens (hf) or 80 (openai) by default; the
paper's profiles came from an OpenAI instruction model with ``--max_new_tokens 512
--temperature 0.4``.

Every finished user is appended to a JSONL journal, so a rerun resumes where it stopped; the
final step validates and writes user.json atomically. Answers are cleaned; an unusable answer
is retried once with sampling and then replaced by a sentence built from the data.

    python data_process/user_profiles.py --dataset ml-100k --data_path ./data --max_users 40

Bad input (a malformed or missing data file, a user with fewer than 3 interactions, a journal
written with other settings, a refused model, a failing endpoint) prints one ``error: ...`` line
and exits with status 1. The output file is never half-written; the journal keeps only users
that were finished before the error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from dataset_files import dataset_file, intention_target, load_inters, load_items, load_json, validate_user_profiles
from utils import DataError, default_dtype, exit_on_data_error, get_device, write_json_atomic

PREF_FIELDS = ("general", "long_term", "short_term")
INTENT_FIELDS = ("train_user", "train_item", "test_user", "test_item")
FIELDS = PREF_FIELDS + INTENT_FIELDS
Messages = list[dict[str, str]]

# Amazon Reviews 2018 categories used by the paper, as nouns a prompt can use.
AMAZON_DOMAINS = {
    "Instruments": "musical instruments",
    "Arts": "arts and crafts supplies",
    "Games": "video games",
    "Scientific": "scientific and industrial supplies",
    "Office": "office products",
    "Pet": "pet supplies",
}


def default_domain(dataset: str) -> str:
    """"movies" for MovieLens, the Amazon category otherwise ("Video_Games" -> "video games")."""
    if dataset.lower().startswith(("ml-", "ml_", "movielens")):
        return "movies"
    if dataset in AMAZON_DOMAINS:
        return AMAZON_DOMAINS[dataset]
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", dataset).replace("_", " ").replace("-", " ")
    return " ".join(words.split()).lower() or "items"


def domain_verbs(domain: str) -> tuple[str, str]:
    """(past, base) of how a user meets an item of this domain: ("watched", "watch") for movies."""
    d = domain.lower()
    if "game" in d:
        return "played", "play"
    if any(w in d for w in ("movie", "film", "show", "video", "tv")):
        return "watched", "watch"
    if any(w in d for w in ("book", "comic", "novel")):
        return "read", "read"
    if any(w in d for w in ("music", "song", "album")) and "instrument" not in d:
        return "listened to", "listen to"
    return "bought", "buy"


class BackendError(RuntimeError):
    """A backend that cannot answer (endpoint down, bad key, unknown model): ends the run cleanly."""


# --------------------------------------------------------------------------- prompts
SYSTEM_PROMPT = "Answer with one short sentence."


@dataclass
class Request:
    """One prompt for one field of one user, with what the answer must not reveal."""

    user: str
    field: str
    messages: Messages
    fallback: str
    hidden_titles: tuple[str, ...] = ()
    answer: str | None = None
    used_fallback: bool = False
    attempts: int = 0


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _title_list(titles: Sequence[str]) -> str:
    return "\n".join(titles)


def _join_titles(titles: Sequence[str]) -> str:
    titles = [f'"{t}"' for t in titles]
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " and " + titles[-1]


def _chat(user_text: str) -> Messages:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_text}]


def preference_requests(user: str, titles: list[str], domain: str, recent_len: int) -> list[Request]:
    """General, long-term and short-term preference prompts from the (already cut) title window."""
    verb = domain_verbs(domain)[0]
    recent = titles[-recent_len:]
    older = titles[:-recent_len] or titles  # a short window: long-term falls back to all of it
    general = _chat(
        f"A user {verb} these {domain}, oldest first:\n{_title_list(titles)}\n"
        f"In one sentence, describe the kinds of {domain} this user enjoys (genres, moods, themes), "
        "without listing titles."
    )
    long_term = _chat(
        f"A user {verb} these {domain} long ago:\n{_title_list(older)}\n"
        f"In one sentence, describe the user's long-standing taste in {domain}, without listing titles."
    )
    short_term = _chat(
        f"A user {verb} these {domain} most recently:\n{_title_list(recent)}\n"
        f"In one sentence, describe the kind of {domain} the user is into at the moment, without listing titles."
    )
    spread = [titles[0], titles[len(titles) // 2], titles[-1]] if len(titles) >= 3 else titles
    fallbacks = (
        f"Enjoys {domain} such as {_join_titles(list(dict.fromkeys(spread)))}.",
        f"Has long liked {domain} like {_join_titles(older[:2])}.",
        f"Lately into {domain} like {_join_titles(recent[-2:])}.",
    )
    return [Request(user, f, m, fb) for f, m, fb in zip(PREF_FIELDS, (general, long_term, short_term), fallbacks)]


def intention_requests(user: str, split: str, item: dict[str, Any], review: dict[str, str] | None,
                       domain: str) -> list[Request]:
    """User-related and item-related vague intention prompts for one item of one user.

    The user-related prompt never shows the title (small models copy it); the item-related one
    does, and any copy of the title in its answer is masked by ``clean_answer``.
    """
    verb, base = domain_verbs(domain)
    title = natural_title(_one_line(item.get("title", ""), 200))
    desc = _one_line(item.get("description", ""), 400)
    item_text = f"Title: {title}" + (f"\nDescription: {desc}" if desc else "")
    ask_item = "In one sentence, describe what it is like (kind, mood, main features) without giving its title."
    if review and (review.get("review") or review.get("summary")):
        said = _one_line(review.get("summary", ""), 150)
        body = _one_line(review.get("review", ""), 600)
        user_text = (
            f"A user {verb} one of the {domain} and wrote this review: \"{said}\" {body}\n"
            "Write, in the first person, one sentence saying what the user was looking for."
        )
        item_ask = f"One of the {domain}:\n{item_text}\nA user's review: \"{said}\"\n{ask_item}"
        user_fallback = f"I want {domain} that live up to this: {said or body}"
    else:
        user_text = (
            f"{desc or title}\nAs someone who wants to {base} {domain} like this, say in one first-person "
            "sentence which kind, genre and mood you are looking for."
        )
        item_ask = f"One of the {domain}:\n{item_text}\n{ask_item}"
        user_fallback = f"I want {domain} that fit my taste right now."
    item_fallback = f"Something matching this description: {desc}" if desc else f"Something among {domain} like what I enjoyed before."
    hidden = _title_variants(title)
    return [
        Request(user, f"{split}_user", _chat(user_text), _finish(user_fallback), hidden),
        Request(user, f"{split}_item", _chat(item_ask), _finish(item_fallback), hidden),
    ]


def _finish(sentence: str) -> str:
    sentence = " ".join(sentence.split())
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


_ARTICLES = "The|A|An|Les|La|Le|L'|Il|Das|Der|Die|El"


def natural_title(title: str) -> str:
    """MovieLens writes "Big Sleep, The (1946)"; prompts read better as "The Big Sleep (1946)"."""
    m = re.match(rf"^(.*?), ({_ARTICLES})(\s*\(\d{{4}}\))?$", title.strip())
    if not m:
        return title
    sep = "" if m.group(2).endswith("'") else " "
    return f"{m.group(2)}{sep}{m.group(1)}{m.group(3) or ''}"


def _title_variants(title: str) -> tuple[str, ...]:
    """The title and its common shortenings ("Shining, The (1980)" -> "The Shining")."""
    out = {title}
    core = re.sub(r"\s*\(\d{4}\)\s*$", "", title).strip()
    out.add(core)
    m = re.match(rf"^(.*), ({_ARTICLES})$", core)
    if m:
        out.add(f"{m.group(2)} {m.group(1)}")
        out.add(m.group(1))
    out.add(re.sub(r"\s*\([^()]*\)\s*$", "", core).strip())  # "Seven (Se7en)" -> "Seven"
    natural = natural_title(title)
    out.update({natural, re.sub(r"\s*\(\d{4}\)\s*$", "", natural).strip()})
    return tuple(sorted((t for t in out if len(t) >= 4), key=len, reverse=True))


# --------------------------------------------------------------------------- cleaning
_LABEL_BODY = (
    r"(?:the\s+)?(?:user'?s?\s+)?(?:"
    r"(?:general|long[- ]term|short[- ]term|overall|explicit|vague|user[- ]related|item[- ]related|final|"
    r"one[- ]sentence)[\s-]*(?:preferences?|intentions?|answer|response|summary|query|sentence|description)?"
    r"|preferences?|intentions?|answer|response|summary|output|query|sentence|description|request|assistant|user|system)"
)
# "Label:" or "Label - "; a bare hyphen is not a separator ("User-friendly" stays).
_LABEL = re.compile(rf"^\s*{_LABEL_BODY}\s*(?:\(\w+\))?(?:\s*:|\s+[-–—])\s*", re.IGNORECASE)
_LABEL_ONLY = re.compile(rf"^\s*{_LABEL_BODY}\s*:?\s*$", re.IGNORECASE)
_INTERJECTION = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|absolutely|great|alright|got it|no problem)(?: thing)?\s*[!.,]\s*",
    re.IGNORECASE,
)
_LEAD_IN = re.compile(r"^(?:here(?:'s| is| are)|below is|this is)\b[^:\n]{0,100}:\s*", re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:[-*•+]|\d{1,2}[.)]|\(\d{1,2}\)|[a-c][.)])\s+")
_REFUSAL = re.compile(
    r"\b(i'?m (?:so |very )?sorry|i am (?:so |very )?sorry|as an ai|i cannot|i can'?t (?:help|assist|provide)|"
    r"language model|not enough information)\b",
    re.IGNORECASE,
)
_DANGLING = re.compile(
    r"\s+(?:of|a|an|the|and|or|but|with|that|to|who|which|where|in|on|for|by|as|at|from|into|its|their|his|her|"
    r"is|are|was|were|like|than)\s*$",
    re.IGNORECASE,
)
_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|<unk>|\[/?INST\]")
_QUOTES = "\"'“”‘’`«»"


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES + ".":
        inner = text[1:-1] if text[-1] in _QUOTES else text[1:-2] + "."
        if any(q in inner for q in "\"“”"):  # "a" and "b": not one quoted answer
            break
        text = inner.strip()
    if text and text[0] in "\"“" and text.count(text[0]) + text.count("”") == 1:
        text = text[1:].strip()  # opening quote whose end was cut off
    return text


def _clean_line(line: str) -> str:
    """Peel list markers, "Sure!", "Here is ...:", labels and wrapping quotes off one line."""
    for _ in range(5):  # '1. Sure! **General preference:** "..."' has several layers
        before = line
        for pattern in (_NUMBERING, _INTERJECTION, _LEAD_IN, _LABEL):
            line = pattern.sub("", line, count=1).strip()
        line = _strip_quotes(line)
        if line == before:
            break
    return line


def clean_answer(text: str | None, hidden_titles: Sequence[str] = (), min_words: int = 3) -> str | None:
    """One clean line from a raw LLM answer, or None when nothing usable is left.

    Drops special tokens, markdown, "Sure! Here is ..." preambles, labels such as
    "Long-term preference:", list numbering and wrapping quotes; joins lines; keeps complete
    sentences when the answer was cut off; masks the item's own title; rejects refusals,
    degenerate repetition and answers shorter than ``min_words`` words.
    """
    if not text:
        return None
    text = _SPECIAL.sub("\n", text)
    text = re.sub(r"\*\*|__|~~|`+|^\s*#+\s*", "", text, flags=re.MULTILINE)
    lines = []
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw or _LABEL_ONLY.match(raw):
            continue  # blank, or a heading such as "Answer" / "assistant"
        if raw.endswith(":") and len(raw.split()) <= 12:
            continue  # a lead-in line: "Sure! Here is the user's preference:"
        line = _clean_line(raw)
        if line:
            lines.append(line)
    text = re.sub(r"\s+", " ", " ".join(lines)).strip(" -–—:;,")
    text = _strip_quotes(text)
    # Sentences repeated word for word (a common loop of small models) are kept once.
    text = " ".join(dict.fromkeys(re.split(r"(?<=[.!?])\s+", text)))
    if not text or _REFUSAL.search(text) or _looping(text):
        return None
    # A cut-off answer: keep the complete sentences when there is at least one.
    if text[-1] not in ".!?\"”')":
        ends = [m.end() for m in re.finditer(r"[.!?][\"”')]?(?=\s)", text)]
        clause = text.rfind(", ")
        if ends and len(text[: ends[-1]].split()) >= min_words:
            text = text[: ends[-1]]
        elif clause > 0 and len(text[:clause].split()) >= 2 * min_words:
            text = text[:clause] + "."  # drop the dangling half-clause
        else:
            text = text.rstrip(" ,;:-")
            for _ in range(3):  # "... set against a backdrop of" -> "... set against a backdrop"
                text = _DANGLING.sub("", text)
            text += "."
    for title in hidden_titles:  # the intention must not give the item away
        text = re.sub(f"[\"“'‘]?(?<![\\w]){re.escape(title)}(?![\\w])[\"”'’]?", "this one", text, flags=re.IGNORECASE)
    text = re.sub(r"\b([Tt]he|[Tt]his) (\w+) this one\b", r"this \2", text)  # "The movie <title>"
    text = re.sub(r"^this one\s*[-–—:]\s*", "", text)  # "<title> - a gritty thriller ..."
    text = re.sub(r"(^|[.!?] )this one\b", lambda m: m.group(1) + "This one", text)
    if not text.strip(" ."):
        return None
    text = text[0].upper() + text[1:]
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", text)
    if len(words) < min_words or _looping(text):
        return None
    return text


def _looping(text: str) -> bool:
    """ "the the the ..." or a phrase repeating: few distinct words among many."""
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]*", text)]
    return len(words) >= 8 and len(set(words)) / len(words) < 0.35


# --------------------------------------------------------------------------- backends
def plain_prompt(messages: Messages) -> str:
    """Prompt format for tokenizers without a chat template: role-labelled paragraphs."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


class SentenceStop:
    """Per-row stopping criterion: a row is done once its answer has a complete sentence.

    Answers are asked to be one sentence; stopping here saves most of the decoding budget
    on CPU. A row stops at ". X" (the next word has started) or at a line break after text.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, min_words: int = 6):
        self.tokenizer, self.prompt_len, self.min_words = tokenizer, prompt_len, min_words
        self.end = re.compile(r"[.!?][\"”')]?\s+\S|\S\s*\n")

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = []
        for t in texts:
            m = self.end.search(t.lstrip())
            done.append(bool(m) and len(t.lstrip()[: m.start() + 1].split()) >= self.min_words)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """A local transformers causal LM; batched, left-padded generation."""

    def __init__(self, model_path: str | os.PathLike, max_new_tokens: int = 32, temperature: float = 0.0,
                 repetition_penalty: float = 1.1, device: Any = None, dtype: Any = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or get_device()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"  # generation continues right after each prompt
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype or default_dtype(self.device))
        self.model.to(self.device).eval()
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.max_new_tokens, self.temperature, self.repetition_penalty = max_new_tokens, temperature, repetition_penalty
        self.name = str(model_path)
        self._torch = torch

    def render(self, messages: Messages) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_prompt(messages)

    def prompt_length(self, messages: Messages) -> int:
        return len(self.tokenizer(self.render(messages), add_special_tokens=False).input_ids)

    def generate(self, batch: list[Messages], sample: bool = False) -> list[str]:
        from transformers import GenerationConfig, StoppingCriteriaList

        texts = [self.render(m) for m in batch]
        # The chat template already has its special tokens; a plain prompt gets the usual BOS.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.has_chat_template)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        do_sample = sample or self.temperature > 0
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=do_sample,
            temperature=max(self.temperature, 0.7 if sample else 0.0) if do_sample else None,
            top_p=0.95 if do_sample else None,
            top_k=None,
            repetition_penalty=self.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        prompt_len = enc["input_ids"].shape[1]
        stop = StoppingCriteriaList([SentenceStop(self.tokenizer, prompt_len)])
        with self._torch.inference_mode():
            out = self.model.generate(**enc, generation_config=config, stopping_criteria=stop)
        return self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint, with retries and exponential backoff.

    ``batch`` requests run concurrently (one thread each). Transient failures (connection
    errors, timeouts, HTTP 429 and 5xx) are retried up to ``max_retries`` times, waiting
    ``retry_delay * 2**attempt`` seconds (or the server's Retry-After, when longer); other
    HTTP errors (bad key, unknown model) stop the run at once with the server's message.
    """

    def __init__(self, api_base: str, model_name: str, api_key: str = "EMPTY", max_new_tokens: int = 80,
                 temperature: float = 0.0, max_retries: int = 5, retry_delay: float = 1.0, timeout: float = 120.0,
                 concurrency: int = 8, sleep: Callable[[float], None] = time.sleep):
        import openai

        self._openai = openai
        # Retries are ours (below): the client's own would hide them from the tests and the log.
        self.client = openai.OpenAI(base_url=api_base, api_key=api_key, max_retries=0, timeout=timeout)
        self.model_name, self.max_new_tokens, self.temperature = model_name, max_new_tokens, temperature
        self.max_retries, self.retry_delay, self.concurrency, self.sleep = max_retries, retry_delay, concurrency, sleep
        self.name = f"{api_base} {model_name}"
        self.retries_done = 0

    def prompt_length(self, messages: Messages) -> int:
        return sum(len(m["content"]) for m in messages)

    def _retry_wait(self, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the error is not transient."""
        o = self._openai
        if isinstance(error, (o.APIConnectionError, o.APITimeoutError)):  # timeout is a subclass
            status = None
        elif isinstance(error, o.APIStatusError):
            status = error.status_code
            if status != 429 and status < 500:
                return None
        else:
            return None
        wait = self.retry_delay * 2**attempt * (1 + 0.1 * random.random())
        headers = getattr(getattr(error, "response", None), "headers", None) or {}
        try:
            wait = max(wait, min(float(headers.get("retry-after", 0)), 60.0))
        except ValueError:
            pass
        return wait

    def _one(self, messages: Messages, sample: bool) -> str:
        temperature = max(self.temperature, 0.7) if sample else self.temperature
        for attempt in range(self.max_retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model_name, messages=messages, max_tokens=self.max_new_tokens, temperature=temperature
                )
                return (reply.choices[0].message.content or "") if reply.choices else ""
            except Exception as e:  # noqa: BLE001 -- sorted into transient / fatal just below
                wait = self._retry_wait(e, attempt)
                if wait is None:
                    raise BackendError(f"--api_base {self.client.base_url}: request failed: {e}") from e
                if attempt == self.max_retries:
                    raise BackendError(
                        f"--api_base {self.client.base_url}: still failing after {self.max_retries} retries: {e}"
                    ) from e
                self.retries_done += 1
                tqdm.write(f"request failed ({type(e).__name__}); retry {attempt + 1}/{self.max_retries} in {wait:.1f}s")
                self.sleep(wait)
        raise AssertionError("unreachable")

    def generate(self, batch: list[Messages], sample: bool = False) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(batch)))) as pool:
            return list(pool.map(lambda m: self._one(m, sample), batch))


# --------------------------------------------------------------------------- journal
class Journal:
    """Append-only JSONL: a header line with the settings, then one line per finished user."""

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any]):
        self.path, self.meta = Path(path), meta

    def load(self, inters: dict[str, list[int]]) -> tuple[dict[str, dict], int]:
        """Finished records whose items still match ``inters``, and the count of dropped ones."""
        records: dict[str, dict] = {}
        stale: set[str] = set()
        if not self.path.exists():
            return records, 0
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            # A crash during a write leaves a partial last line: cut it so appends stay valid.
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        for n, line in enumerate(raw.decode("utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path}: line {n + 1} is not valid JSON ({e}); delete the file or use --restart")
            if "meta" in rec:
                self._check_meta(rec["meta"])
                continue
            if _record_matches(rec, inters):
                records[rec["user"]] = rec
            else:
                stale.add(str(rec.get("user")))
        return records, len(stale - set(records))  # stale: written for interactions that changed since

    def _check_meta(self, old: Any) -> None:
        # Settings a journal's header lacks (written by an older version) are not compared, so
        # such journals still resume; a setting both have must be equal.
        old = old if isinstance(old, dict) else {}
        diff = [f"{k} {old[k]!r} (journal) vs {v!r} (now)" for k, v in self.meta.items() if k in old and old[k] != v]
        if diff:
            raise DataError(
                f"{self.path}: this journal was written with other settings: {'; '.join(diff)}; "
                "rerun with the same settings or pass --restart to discard it"
            )

    def check_settings(self) -> None:
        """Refuse a journal written with other settings, reading only its header line (cheap:
        called before a large model is loaded)."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            first = f.readline()
        try:
            header = json.loads(first) if first.strip() else {}
        except json.JSONDecodeError:
            return  # a torn header is reported by load()
        if isinstance(header, dict) and "meta" in header:
            self._check_meta(header["meta"])

    def start(self, restart: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if restart and self.path.exists():
            self.path.unlink()
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append({"meta": self.meta})

    def append(self, record: dict[str, Any]) -> None:
        self._append(record)

    def _append(self, obj: dict[str, Any]) -> None:
        # One write of one whole line, flushed and synced: a crash loses at most this line.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _record_matches(rec: dict[str, Any], inters: dict[str, list[int]]) -> bool:
    try:
        seq = inters.get(rec["user"])
        return (
            seq is not None
            and all((rec[s]["item"], rec[s]["inters"]) == intention_target(seq, s) for s in ("train", "test"))
            and len(rec["explicit"]) == len(PREF_FIELDS) and all(isinstance(s, str) and s for s in rec["explicit"])
            and all(len(rec[s]["querys"]) == 2 and all(isinstance(q, str) and q for q in rec[s]["querys"])
                    for s in ("train", "test"))
        )
    except (KeyError, TypeError, IndexError):
        return False


# --------------------------------------------------------------------------- driver
def load_reviews(path: Path) -> dict[tuple[str, int], dict[str, str]]:
    """``{"(<user>, <item>)": {...}}`` (keys as Python writes tuples, quotes optional), or nested
    ``{"<user>": {"<item>": {...}}}``; returns {(user, item): {"review", "summary"}}."""
    data = load_json(path, "review")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object keyed by \"(<user>, <item>)\"")
    out: dict[tuple[str, int], dict[str, str]] = {}
    key_re = re.compile(r"^\(\s*['\"]?([^'\",]+?)['\"]?\s*,\s*['\"]?(\d+)['\"]?\s*\)$")
    for key, value in data.items():
        m = key_re.match(key.strip())
        if m and isinstance(value, dict):
            out[(m.group(1), int(m.group(2)))] = value
        elif isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
            for item, rv in value.items():
                if not str(item).strip().isdigit():
                    raise DataError(f"{path}: user {key!r} has review key {item!r}; expected an integer item id")
                out[(str(key), int(item))] = rv
        else:
            raise DataError(f"{path}: key {key!r} is not \"(<user>, <item>)\" with a {{review, summary}} object")
    return out


def user_requests(user: str, seq: list[int], items: dict[str, dict], reviews: dict, domain: str,
                  pref_len: int, recent_len: int) -> list[Request]:
    """The seven requests of one user, in FIELDS order."""
    def title(i: int) -> str:
        return natural_title(_one_line(items[str(i)].get("title") or f"item {i}", 120))

    titles = [title(i) for i in intention_target(seq, "train")[1][-pref_len:]]
    reqs = preference_requests(user, titles, domain, recent_len)
    for split in ("train", "test"):
        item = intention_target(seq, split)[0]
        reqs += intention_requests(user, split, items[str(item)], reviews.get((user, item)), domain)
    return reqs


@dataclass
class Stats:
    users_selected: int = 0
    users_resumed: int = 0
    users_generated: int = 0
    users_skipped: int = 0
    stale: int = 0
    retried: int = 0
    fallbacks: dict[str, int] = field(default_factory=lambda: {f: 0 for f in FIELDS})
    seconds: float = 0.0


def run_requests(backend: Any, reqs: list[Request], batch_size: int, retries: int, bar: tqdm, stats: Stats) -> None:
    """Fill ``answer`` of every request: greedy first, then sampled retries, then the fallback."""
    pending = reqs
    for attempt in range(retries + 1):
        # Similar lengths in one batch waste less compute on padding.
        pending = sorted(pending, key=lambda r: backend.prompt_length(r.messages))
        for start in range(0, len(pending), batch_size):
            batch = pending[start: start + batch_size]
            answers = backend.generate([r.messages for r in batch], sample=attempt > 0)
            for r, a in zip(batch, answers):
                r.attempts += 1
                r.answer = clean_answer(a, r.hidden_titles)
            if attempt == 0:
                bar.update(len(batch))
        pending = [r for r in pending if r.answer is None]
        if not pending:
            return
        if attempt < retries:
            stats.retried += len(pending)
    for r in pending:
        r.answer, r.used_fallback = r.fallback, True
        stats.fallbacks[r.field] += 1


def make_record(user: str, seq: list[int], reqs: list[Request]) -> dict[str, Any]:
    by_field = {r.field: r for r in reqs}
    return {
        "user": user,
        "explicit": [by_field[f].answer for f in PREF_FIELDS],
        **{split: dict(zip(("item", "inters"), intention_target(seq, split)),
                       querys=[by_field[f"{split}_user"].answer, by_field[f"{split}_item"].answer])
           for split in ("train", "test")},
        "fallback": [r.field for r in reqs if r.used_fallback],
    }


def assemble(records: dict[str, dict], users: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"user_explicit_preference": {}, "user_vague_intention": {"train": {}, "test": {}}}
    for u in users:
        if u not in records:
            continue
        rec = records[u]
        out["user_explicit_preference"][u] = rec["explicit"]
        for split in ("train", "test"):
            out["user_vague_intention"][split][u] = {k: rec[split][k] for k in ("item", "inters", "querys")}
    return out


def select_users(inters: dict[str, list[int]], max_users: int | None) -> tuple[list[str], list[str]]:
    """(users to profile, users skipped): first ``max_users`` by id; a user needs items before items[-3]."""
    order = sorted(inters, key=lambda u: (int(u), u) if u.isdigit() else (math.inf, u))
    if max_users is not None and max_users > 0:
        order = order[:max_users]
    keep = [u for u in order if len(inters[u]) > 3]
    return keep, [u for u in order if len(inters[u]) <= 3]


def build_profiles(backend: Any, inters: dict[str, list[int]], items: dict[str, dict], reviews: dict, domain: str,
                   journal: Journal, output_file: Path, max_users: int | None = None, batch_size: int = 32,
                   retries: int = 1, pref_len: int = 20, recent_len: int = 5, restart: bool = False) -> Stats:
    """Generate what the journal lacks, then validate and write ``output_file`` atomically."""
    users, skipped = select_users(inters, max_users)
    stats = Stats(users_selected=len(users), users_skipped=len(skipped))
    records, stats.stale = ({}, 0) if restart else journal.load(inters)
    journal.start(restart)
    todo = [u for u in users if u not in records]
    stats.users_resumed = len(users) - len(todo)
    # Users go in chunks of `batch_size` (7 prompts each): batches of similar-length prompts,
    # and a crash loses at most one chunk.
    chunk = max(1, batch_size)
    t0 = time.time()
    with tqdm(total=len(todo) * len(FIELDS), desc="profiles (prompts)", unit="prompt", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), chunk):
            group = todo[start: start + chunk]
            reqs = {u: user_requests(u, inters[u], items, reviews, domain, pref_len, recent_len) for u in group}
            run_requests(backend, [r for u in group for r in reqs[u]], batch_size, retries, bar, stats)
            for u in group:
                rec = make_record(u, inters[u], reqs[u])
                journal.append(rec)
                records[u] = rec
                stats.users_generated += 1
            bar.set_postfix(users=f"{stats.users_resumed + stats.users_generated}/{len(users)}")
    stats.seconds = time.time() - t0
    profiles = assemble(records, users)
    validate_user_profiles(profiles, inters, source=str(output_file))
    write_json_atomic(profiles, output_file)
    return stats


def print_summary(stats: Stats, output_file: Path) -> None:
    total_fb = sum(stats.fallbacks.values())
    print(f"users: {stats.users_selected} selected, {stats.users_resumed} from the journal, "
          f"{stats.users_generated} generated now, {stats.users_skipped} skipped (no history before the train item)")
    if stats.stale:
        print(f"journal: {stats.stale} stale records (interactions changed) were regenerated")
    print(f"answers: {stats.users_generated * len(FIELDS)} written, {stats.retried} retried, "
          f"{total_fb} replaced by a sentence built from the data "
          + ("(" + ", ".join(f"{k} {v}" for k, v in stats.fallbacks.items() if v) + ")" if total_fb else ""))
    if stats.users_generated:
        print(f"time: {stats.seconds:.1f}s, {stats.seconds / stats.users_generated:.2f}s per user")
    print(f"wrote {output_file}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=str, required=True)
    p.add_argument("--data_path", type=str, default="./data")
    p.add_argument("--domain", type=str, default=None, help="noun used in the prompts (default: from --dataset)")
    p.add_argument("--output_file", type=str, default=None, help="default <data_path>/<D>/<D>.user.json")
    p.add_argument("--journal", type=str, default=None, help="resume file, default <output_file stem>.journal.jsonl")
    p.add_argument("--restart", action="store_true", help="discard the journal and generate every user again")
    p.add_argument("--max_users", type=int, default=None, help="profile only the first N users by id")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per generate call (hf) / concurrent requests")
    p.add_argument("--retries", type=int, default=1, help="sampled retries of an unusable answer before the fallback")
    p.add_argument("--pref_len", type=int, default=20, help="last N titles of items[:-3] used for preferences")
    p.add_argument("--recent_len", type=int, default=5, help="most recent titles used for the short-term preference")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="answer length cap in tokens (default 32 for hf, 80 for openai: one sentence; "
                        "the paper used 512 with an OpenAI model)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default, reproducible); the paper used 0.4")
    p.add_argument("--require_instruct", action="store_true",
                   help="refuse an hf model whose tokenizer has no chat template (not instruction-tuned)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--backend", choices=("hf", "openai"), default="hf")
    g = p.add_argument_group("hf backend")
    g.add_argument("--model_path", type=str, default=None, help="HF folder (default: the embedded SmolLM2 Instruct)")
    g.add_argument("--repetition_penalty", type=float, default=1.1)
    g = p.add_argument_group("openai backend")
    g.add_argument("--api_base", type=str, default=os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1",
                   help="endpoint base URL (default $OPENAI_BASE_URL, else http://127.0.0.1:8000/v1)")
    g.add_argument("--model_name", type=str, default=os.environ.get("OPENAI_MODEL") or None,
                   help="model name the endpoint serves (default $OPENAI_MODEL)")
    g.add_argument("--api_key_env", type=str, default="OPENAI_API_KEY", help="env var with the key ('EMPTY' if unset)")
    g.add_argument("--max_retries", type=int, default=5)
    g.add_argument("--retry_delay", type=float, default=1.0, help="first backoff in seconds, doubled each retry")
    g.add_argument("--request_timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    if args.pref_len < 1 or args.recent_len < 1:
        p.error("--pref_len and --recent_len must be at least 1")
    if args.retries < 0 or args.max_retries < 0:
        p.error("--retries and --max_retries must be >= 0")
    if args.max_new_tokens is None:
        args.max_new_tokens = 80 if args.backend == "openai" else 32
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a number >= 0 (0 = greedy), got {args.temperature}")
    if args.backend == "openai" and not args.model_name:
        p.error("--backend openai needs --model_name or $OPENAI_MODEL (the model the endpoint serves)")
    return args


OPENAI_HINT = ("or use an OpenAI-compatible endpoint: --backend openai with $OPENAI_BASE_URL, $OPENAI_MODEL and "
               "$OPENAI_API_KEY set (or --api_base, --model_name, --api_key_env)")


def check_instruct_model(model_path: str | os.PathLike) -> None:
    """Refuse a model that is not instruction-tuned, judged by its tokenizer's chat template.

    Only the tokenizer is loaded, so a refused 7B base model costs a second, not a load.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise DataError(f"--model_path {model_path}: cannot load its tokenizer ({_one_line(str(e), 200)})") from e
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"--model_path {model_path}: the tokenizer has no chat template, so this is not an instruction-tuned "
            "model and --require_instruct refuses to write profiles with it; name an instruction model with "
            f"--model_path (run.sh: PROFILE_MODEL=...) {OPENAI_HINT}"
        )


def resolve_model_path(args: argparse.Namespace) -> str | None:
    """The hf model folder (the embedded default is built on first use); None for openai."""
    if args.backend == "openai":
        return None
    if args.model_path is not None:
        return args.model_path
    from data_process.base_model import build_base_model

    return str(build_base_model())


def backend_name(args: argparse.Namespace, model_path: str | None) -> str:
    """What the journal records as the model (known before anything is loaded)."""
    return f"{args.api_base} {args.model_name}" if args.backend == "openai" else str(model_path)


def make_backend(args: argparse.Namespace, model_path: str | None = None) -> Any:
    if args.backend == "openai":
        key = os.environ.get(args.api_key_env) or "EMPTY"  # local servers accept any key
        return OpenAIBackend(args.api_base, args.model_name, key, args.max_new_tokens, args.temperature,
                             args.max_retries, args.retry_delay, args.request_timeout, args.batch_size)
    model_path = model_path or resolve_model_path(args)
    if args.require_instruct:
        check_instruct_model(model_path)
    return HFBackend(model_path, args.max_new_tokens, args.temperature, args.repetition_penalty)


def run(args: argparse.Namespace) -> None:
    """Everything after argument parsing; bad input raises DataError before anything is written."""
    inters = load_inters(dataset_file(args.data_path, args.dataset, ".inter.json"))
    items = load_items(dataset_file(args.data_path, args.dataset, ".item.json"))
    missing = sorted({i for seq in inters.values() for i in seq if str(i) not in items})
    if missing:
        raise DataError(f"{dataset_file(args.data_path, args.dataset, '.item.json')}: "
                        f"{len(missing)} interacted items have no entry (first: {missing[:5]})")
    review_path = dataset_file(args.data_path, args.dataset, ".review.json")
    reviews = load_reviews(review_path) if review_path.exists() else {}
    output_file = Path(args.output_file) if args.output_file else dataset_file(args.data_path, args.dataset, ".user.json")
    journal_path = Path(args.journal) if args.journal else output_file.with_name(output_file.stem + ".journal.jsonl")
    domain = args.domain or default_domain(args.dataset)

    model_path = resolve_model_path(args)
    # Generation settings are part of the journal's settings: answers of one file share them.
    meta = {"dataset": args.dataset, "domain": domain, "backend": args.backend,
            "model": backend_name(args, model_path), "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature}
    journal = Journal(journal_path, meta)
    if not args.restart:
        journal.check_settings()  # before the model is loaded: a refusal should be instant

    import torch

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    backend = make_backend(args, model_path)
    if args.backend == "hf" and not backend.has_chat_template:
        print(f"warning: {model_path} has no chat template; prompts use a plain 'User:/Assistant:' format, and a "
              "model that is not instruction-tuned writes poor profiles (--require_instruct refuses it)",
              file=sys.stderr)
    print(f"{args.dataset}: {len(inters)} users, reviews {'yes' if reviews else 'no'}, domain {domain!r}, "
          f"backend {args.backend} ({backend.name}), max_new_tokens {args.max_new_tokens}, "
          f"temperature {args.temperature}")
    stats = build_profiles(backend, inters, items, reviews, domain, journal, output_file,
                           args.max_users, args.batch_size, args.retries, args.pref_len, args.recent_len, args.restart)
    print_summary(stats, output_file)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_data_error(BackendError):  # the journal keeps what was finished
        run(args)


if __name__ == "__main__":
    main()
