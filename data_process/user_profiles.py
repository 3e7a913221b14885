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

Answers are one sentence, greedy, at most 32 new tokens (hf) or 80 (openai) by default, the hf
back-end with a repetition penalty of 1.1 and, when sampling, top_p 0.95. The original's profiles
came from an OpenAI instruction model sampled with temperature 0.4, top_p 1, no repetition
penalty and answers of several sentences: ``--max_new_tokens 512 --temperature 0.4 --top_p 1
--repetition_penalty 1 --answer_style paragraph`` (run.sh's paper profile).

Every finished user is appended to a JSONL journal, so a rerun resumes where it stopped; the
final step validates and writes user.json atomically. Answers are cleaned; an unusable answer
is retried once with sampling and then replaced by a sentence built from the data.

    python data_process/user_profiles.py --dataset ml-100k --data_path ./data --max_users 40

The prompts and the cleaning of answers are data_process/profile_prompts.py, the back-ends
data_process/profile_backends.py; this file is the command line, the journal and the driver.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_process.profile_backends import BackendError, HFBackend, OpenAIBackend
from data_process.profile_writer import chat_template_in, no_chat_template_message
from data_process.profile_prompts import (ANSWER_STYLES, FIELDS, PREF_FIELDS, AnswerStyle, Request, clean_answer,
                                          default_domain, intention_requests, natural_title, one_line,
                                          preference_requests)
from dataset_files import dataset_file, intention_target, load_inters, load_items, load_json, validate_user_profiles
from utils import DataError, exit_on_data_error, write_json_atomic

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
                  pref_len: int, recent_len: int, style: AnswerStyle = ANSWER_STYLES["sentence"]) -> list[Request]:
    """The seven requests of one user, in FIELDS order."""
    def title(i: int) -> str:
        return natural_title(one_line(items[str(i)].get("title") or f"item {i}", 120))

    titles = [title(i) for i in intention_target(seq, "train")[1][-pref_len:]]
    reqs = preference_requests(user, titles, domain, recent_len, style)
    for split in ("train", "test"):
        item = intention_target(seq, split)[0]
        reqs += intention_requests(user, split, items[str(item)], reviews.get((user, item)), domain, style)
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
                   retries: int = 1, pref_len: int = 20, recent_len: int = 5, restart: bool = False,
                   style: AnswerStyle = ANSWER_STYLES["sentence"]) -> Stats:
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
            reqs = {u: user_requests(u, inters[u], items, reviews, domain, pref_len, recent_len, style) for u in group}
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
    write_json_atomic(profiles, output_file, what="the user profiles")
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
    p.add_argument("--top_p", type=float, default=None,
                   help="nucleus sampling when sampling (default 0.95 for hf, the server's own for openai; "
                        "the original: 1)")
    p.add_argument("--answer_style", choices=tuple(ANSWER_STYLES), default="sentence",
                   help="sentence: one sentence (default; hf stops a row at its first complete sentence); "
                        "paragraph: a few sentences, as the original's profiles")
    p.add_argument("--require_instruct", action="store_true",
                   help="refuse an hf model whose tokenizer has no chat template (not instruction-tuned)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--backend", choices=("hf", "openai"), default="hf")
    g = p.add_argument_group("hf backend")
    g.add_argument("--model_path", type=str, default=None, help="HF folder (default: the embedded SmolLM2 Instruct)")
    g.add_argument("--repetition_penalty", type=float, default=1.1, help="1 = none (the original)")
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
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        p.error(f"--repetition_penalty must be a number > 0 (1 = none), got {args.repetition_penalty}")
    if args.backend == "openai" and not args.model_name:
        p.error("--backend openai needs --model_name or $OPENAI_MODEL (the model the endpoint serves)")
    return args


def check_instruct_model(model_path: str | os.PathLike) -> None:
    """Refuse a model that is not instruction-tuned, judged by its tokenizer's chat template.

    A local folder's files are read (profile_writer.chat_template_in); a Hub id loads only the
    tokenizer, so a refused 7B base model costs a second, not a load.
    """
    template = chat_template_in(model_path)
    if template is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as e:
            raise DataError(f"--model_path {model_path}: cannot load its tokenizer ({one_line(str(e), 200)})") from e
        template = bool(getattr(tokenizer, "chat_template", None))
    if not template:
        raise DataError(no_chat_template_message(model_path))


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
                             args.max_retries, args.retry_delay, args.request_timeout, args.batch_size,
                             top_p=args.top_p)
    model_path = model_path or resolve_model_path(args)
    if args.require_instruct:
        check_instruct_model(model_path)
    return HFBackend(model_path, args.max_new_tokens, args.temperature, args.repetition_penalty, top_p=args.top_p,
                     stop_at_sentence=ANSWER_STYLES[args.answer_style].one_sentence)


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
            "temperature": args.temperature, "top_p": args.top_p, "answer_style": args.answer_style}
    if args.backend == "hf":
        meta["repetition_penalty"] = args.repetition_penalty
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
          f"temperature {args.temperature}, top_p {'default' if args.top_p is None else args.top_p}"
          + (f", repetition_penalty {args.repetition_penalty}" if args.backend == "hf" else "")
          + f", answers: {args.answer_style}")
    stats = build_profiles(backend, inters, items, reviews, domain, journal, output_file,
                           args.max_users, args.batch_size, args.retries, args.pref_len, args.recent_len, args.restart,
                           ANSWER_STYLES[args.answer_style])
    print_summary(stats, output_file)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_data_error(BackendError):  # the journal keeps what was finished
        run(args)


if __name__ == "__main__":
    main()
