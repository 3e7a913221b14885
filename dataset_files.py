"""The dataset files of SPEC section 4 and how they are read: paths, the loaders and validators
of the interaction, item, index and user-profile files, the spelling of index tokens, and the
leave-one-out split of a user's items.

Every loader raises DataError with the file and what was expected, so a bad file is named once,
before any model is loaded.
"""
from __future__ import annotations

import json
import os
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any

from utils import DataError

MIN_INTERACTIONS = 3  # leave-one-out needs a train, a validation and a test item
LEVEL_PREFIXES = string.ascii_lowercase  # index tokens: level 0 -> <a_..>, level 1 -> <b_..>, ...
_INDEX_TOKEN = re.compile(r"<([a-z]+)_(\d+)>")


def dataset_file(data_path: str | os.PathLike, dataset: str, suffix: str) -> Path:
    """``<data_path>/<D>/<D><suffix>``, e.g. suffix ``.inter.json`` or ``.index.json``."""
    return Path(data_path) / dataset / f"{dataset}{suffix}"


def load_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {what} file is not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                        "expected JSON in UTF-8 (re-save it as UTF-8)") from e


def load_inters(path: str | os.PathLike) -> dict[str, list[int]]:
    """``{"<user>": [item, ...]}`` with integer items and at least 3 interactions per user."""
    data = load_json(path, "interaction")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object {{user: [item, ...]}}")
    inters: dict[str, list[int]] = {}
    for user, items in data.items():
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise DataError(f"{path}: user {user!r} must map to a list of integer item ids")
        if len(items) < MIN_INTERACTIONS:
            raise DataError(
                f"{path}: user {user!r} has {len(items)} interactions; leave-one-out needs at least {MIN_INTERACTIONS}"
            )
        inters[str(user)] = items
    return inters


def load_items(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{"<item>": {"title": str, "description": str, ...}}``."""
    data = load_json(path, "item")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object {{item: {{title, description}}}}")
    for item, feat in data.items():
        if not isinstance(feat, dict) or not isinstance(feat.get("title"), str):
            raise DataError(f"{path}: item {item!r} needs a string field 'title'")
        if not isinstance(feat.get("description", ""), str):
            raise DataError(f"{path}: item {item!r} field 'description' must be a string")
    return data


def load_indices(path: str | os.PathLike, required_items: Any = None) -> dict[str, list[str]]:
    """``{"<item>": ["<a_12>", "<b_200>", ...]}``: equal lengths, all distinct.

    ``required_items`` (ints or strings) must each have an index.
    """
    data = load_json(path, "index")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object {{item: [token, ...]}}")
    for item, tokens in data.items():
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise DataError(f"{path}: item {item!r} must map to a non-empty list of token strings")
    # The most common length is the norm, so the message blames the odd items, not the first one.
    lengths = Counter(len(v) for v in data.values())
    expected_len = lengths.most_common(1)[0][0]
    odd = [item for item, tokens in data.items() if len(tokens) != expected_len]
    if odd:
        shown = ", ".join(f"{item!r} (length {len(data[item])})" for item in odd[:5])
        raise DataError(f"{path}: {len(odd)} items have an index whose length differs from the other items' "
                        f"{expected_len}: {shown}{' ...' if len(odd) > 5 else ''}")
    seen: dict[tuple[str, ...], str] = {}
    for item, tokens in data.items():
        key = tuple(tokens)
        if key in seen:
            raise DataError(f"{path}: items {seen[key]!r} and {item!r} share the index {''.join(tokens)}; indices must be distinct")
        seen[key] = item
    if required_items is not None:
        missing = sorted({str(i) for i in required_items} - set(data), key=lambda s: (len(s), s))
        if missing:
            raise DataError(f"{path}: {len(missing)} items have no index (first: {missing[:5]})")
    return data


def index_token(level: int, code: int) -> str:
    """How code ``code`` of level ``level`` is spelled in an index file: ``<a_12>``."""
    return f"<{LEVEL_PREFIXES[level]}_{code}>"


def parse_index_token(token: str) -> tuple[str, int] | None:
    """(level prefix, code) of an index token such as ``<a_12>``; None for anything else."""
    m = _INDEX_TOKEN.fullmatch(token)
    return (m.group(1), int(m.group(2))) if m else None


def index_tokens(indices: dict[str, list[str]]) -> list[str]:
    """All distinct index tokens, sorted by level then code, for adding to a tokenizer."""
    def level_and_code(token: str) -> tuple:
        parsed = parse_index_token(token)
        return (*parsed, token) if parsed else (token, -1, token)

    return sorted({t for toks in indices.values() for t in toks}, key=level_and_code)


# --------------------------------------------------------------------------- the leave-one-out split
def train_part(seq: list[int]) -> list[int]:
    """``s[:-2]``: the items training may see; the last two are the validation and test items."""
    return seq[:-2]


def valid_item(seq: list[int]) -> int:
    """``s[-2]``, the validation target (its history is ``train_part``)."""
    return seq[-2]


def test_item(seq: list[int]) -> int:
    """``s[-1]``, the test target (its history is everything before it)."""
    return seq[-1]


def held_out(seq: list[int], mode: str) -> tuple[list[int], int]:
    """(history, target) of a user's validation ("valid": ``s[:-2] -> s[-2]``) or test
    ("test": ``s[:-1] -> s[-1]``) example."""
    if mode == "valid":
        return train_part(seq), valid_item(seq)
    return seq[:-1], test_item(seq)


def intention_target(seq: list[int], split: str) -> tuple[int, list[int]]:
    """(item, history) a user's vague intention is about: train, the last training item
    ``s[-3]`` after ``s[:-3]``; test, the test item ``s[-1]`` after ``s[:-1]``."""
    if split == "train":
        return train_part(seq)[-1], train_part(seq)[:-1]
    history, item = held_out(seq, "test")
    return item, history


# --------------------------------------------------------------------------- the user-profile file
def validate_user_profiles(profiles: Any, inters: dict[str, list[int]] | None = None,
                           source: str = "user.json") -> None:
    """Raise DataError unless ``profiles`` has the SPEC section 4 user.json format.

    With ``inters``, also check each intention's item and history against the interactions
    (train: items[-3] after items[:-3]; test: items[-1] after items[:-1]).
    """
    def fail(msg: str) -> None:
        raise DataError(f"{source}: {msg}")

    def text_ok(s: Any) -> bool:
        return isinstance(s, str) and s.strip() != "" and "\n" not in s and "\r" not in s

    if not isinstance(profiles, dict):
        fail("expected an object with keys 'user_explicit_preference' and 'user_vague_intention'")
    missing = {"user_explicit_preference", "user_vague_intention"} - set(profiles)
    if missing:
        fail(f"missing key(s) {sorted(missing)}")
    prefs = profiles["user_explicit_preference"]
    if not isinstance(prefs, dict):
        fail("'user_explicit_preference' must map user -> [str, ...]")
    for user, texts in prefs.items():
        if not isinstance(texts, list) or not texts or not all(text_ok(t) for t in texts):
            fail(f"user_explicit_preference[{user!r}] must be a non-empty list of non-empty one-line strings")
    intents = profiles["user_vague_intention"]
    if not isinstance(intents, dict) or set(intents) != {"train", "test"}:
        fail("'user_vague_intention' must have exactly the keys 'train' and 'test'")
    for split, offset in (("train", 3), ("test", 1)):  # offset: the intention's item is items[-offset]
        table = intents[split]
        if not isinstance(table, dict):
            fail(f"user_vague_intention[{split!r}] must map user -> {{item, inters, querys}}")
        for user, entry in table.items():
            where = f"user_vague_intention[{split!r}][{user!r}]"
            if not isinstance(entry, dict) or {"item", "inters", "querys"} - set(entry):
                fail(f"{where} must have the fields 'item', 'inters' and 'querys'")
            item, hist, querys = entry["item"], entry["inters"], entry["querys"]
            if not isinstance(item, int) or isinstance(item, bool):
                fail(f"{where}['item'] must be an integer item id")
            if not isinstance(hist, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in hist):
                fail(f"{where}['inters'] must be a list of integer item ids")
            if not isinstance(querys, list) or len(querys) != 2 or not all(text_ok(q) for q in querys):
                fail(f"{where}['querys'] must be [user_related, item_related], two non-empty one-line strings")
            if inters is not None:
                if user not in inters:
                    fail(f"{where}: user is not in the interaction file")
                seq = inters[user]
                if (item, hist) != intention_target(seq, split):
                    fail(f"{where}: expected item items[-{offset}] = {seq[-offset]} with history items[:-{offset}]")
    if not (set(prefs) == set(intents["train"]) == set(intents["test"])):
        fail("the users of user_explicit_preference, train and test intentions must be the same")


def load_user_profiles(path: str | os.PathLike, inters: dict[str, list[int]]) -> dict[str, Any]:
    """``<D>.user.json``, validated against the interactions ``inters``."""
    profiles = load_json(path, "user profile")
    validate_user_profiles(profiles, inters, source=str(path))
    return profiles
