"""The prompts of data_process/user_profiles.py and the cleaning of their answers.

Per user, three explicit-preference prompts (from the titles of the training window) and four
vague-intention prompts (train and test, user- and item-related), each with a fallback sentence
built from the data. The answers are asked for in one of two ``ANSWER_STYLES``: one sentence
(small local models stay on topic) or a few sentences (as the original's profiles were written).
An answer is cleaned to one plain line (labels, lead-ins, quotes and special tokens removed); a
refusal, a loop or an answer that names a hidden title is unusable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

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


# --------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class AnswerStyle:
    """How long an answer is asked to be: the system prompt and the phrases the prompts use."""

    system: str
    sentences: str      # "one sentence"
    first_person: str   # "one first-person sentence"
    one_sentence: bool  # the hf back-end may stop a row at its first complete sentence


ANSWER_STYLES = {
    "sentence": AnswerStyle("Answer with one short sentence.", "one sentence", "one first-person sentence", True),
    "paragraph": AnswerStyle("Answer in plain prose of two to four sentences, with no lists, headings or titles.",
                             "a few sentences", "a few first-person sentences", False),
}


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


def one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _title_list(titles: Sequence[str]) -> str:
    return "\n".join(titles)


def _join_titles(titles: Sequence[str]) -> str:
    titles = [f'"{t}"' for t in titles]
    return titles[0] if len(titles) == 1 else ", ".join(titles[:-1]) + " and " + titles[-1]


def _chat(user_text: str, style: AnswerStyle = ANSWER_STYLES["sentence"]) -> Messages:
    return [{"role": "system", "content": style.system}, {"role": "user", "content": user_text}]


def preference_requests(user: str, titles: list[str], domain: str, recent_len: int,
                        style: AnswerStyle = ANSWER_STYLES["sentence"]) -> list[Request]:
    """General, long-term and short-term preference prompts from the (already cut) title window."""
    verb = domain_verbs(domain)[0]
    recent = titles[-recent_len:]
    older = titles[:-recent_len] or titles  # a short window: long-term falls back to all of it
    general = _chat(
        f"A user {verb} these {domain}, oldest first:\n{_title_list(titles)}\n"
        f"In {style.sentences}, describe the kinds of {domain} this user enjoys (genres, moods, themes), "
        "without listing titles.", style
    )
    long_term = _chat(
        f"A user {verb} these {domain} long ago:\n{_title_list(older)}\n"
        f"In {style.sentences}, describe the user's long-standing taste in {domain}, without listing titles.", style
    )
    short_term = _chat(
        f"A user {verb} these {domain} most recently:\n{_title_list(recent)}\n"
        f"In {style.sentences}, describe the kind of {domain} the user is into at the moment, "
        "without listing titles.", style
    )
    spread = [titles[0], titles[len(titles) // 2], titles[-1]] if len(titles) >= 3 else titles
    fallbacks = (
        f"Enjoys {domain} such as {_join_titles(list(dict.fromkeys(spread)))}.",
        f"Has long liked {domain} like {_join_titles(older[:2])}.",
        f"Lately into {domain} like {_join_titles(recent[-2:])}.",
    )
    return [Request(user, f, m, fb) for f, m, fb in zip(PREF_FIELDS, (general, long_term, short_term), fallbacks)]


def intention_requests(user: str, split: str, item: dict[str, Any], review: dict[str, str] | None,
                       domain: str, style: AnswerStyle = ANSWER_STYLES["sentence"]) -> list[Request]:
    """User-related and item-related vague intention prompts for one item of one user.

    The user-related prompt never shows the title (small models copy it); the item-related one
    does, and any copy of the title in its answer is masked by ``clean_answer``.
    """
    verb, base = domain_verbs(domain)
    title = natural_title(one_line(item.get("title", ""), 200))
    desc = one_line(item.get("description", ""), 400)
    item_text = f"Title: {title}" + (f"\nDescription: {desc}" if desc else "")
    ask_item = f"In {style.sentences}, describe what it is like (kind, mood, main features) without giving its title."
    if review and (review.get("review") or review.get("summary")):
        said = one_line(review.get("summary", ""), 150)
        body = one_line(review.get("review", ""), 600)
        user_text = (
            f"A user {verb} one of the {domain} and wrote this review: \"{said}\" {body}\n"
            f"Write, in the first person, {style.sentences} saying what the user was looking for."
        )
        item_ask = f"One of the {domain}:\n{item_text}\nA user's review: \"{said}\"\n{ask_item}"
        user_fallback = f"I want {domain} that live up to this: {said or body}"
    else:
        user_text = (
            f"{desc or title}\nAs someone who wants to {base} {domain} like this, say in {style.first_person} "
            "which kind, genre and mood you are looking for."
        )
        item_ask = f"One of the {domain}:\n{item_text}\n{ask_item}"
        user_fallback = f"I want {domain} that fit my taste right now."
    item_fallback = f"Something matching this description: {desc}" if desc else f"Something among {domain} like what I enjoyed before."
    hidden = _title_variants(title)
    return [
        Request(user, f"{split}_user", _chat(user_text, style), _finish(user_fallback), hidden),
        Request(user, f"{split}_item", _chat(item_ask, style), _finish(item_fallback), hidden),
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
