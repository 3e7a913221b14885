"""Amazon Reviews 2018 (raw per-category files) to the LC-Rec dataset files.

Reads ``<input_path>/<Category>.json.gz`` (reviews, one JSON object per line) and
``<input_path>/meta_<Category>.json.gz`` (item metadata; lines written as Python dict
literals are accepted too) and writes ``<output_path>/<dataset>/<dataset>.inter.json``,
``.item.json`` and ``.review.json``.

    python data_process/amazon18.py --dataset Instruments --input_path raw/ --output_path ./data

Steps: keep reviews of items whose cleaned title is not empty; keep the earliest review of
each (user, item) pair; filter to the (user_k, item_k)-core, repeatedly until stable; sort
each history by time (ties keep file order). Users are renumbered "0".."U-1" in the order
of their reviewer ids, items 0..I-1 in the order of their ASINs. Text is cleaned (HTML
unescaped, tags stripped, whitespace collapsed).
"""
from __future__ import annotations

import argparse
import ast
import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from data_process.common import (
    build_sequences, check_not_empty, clean_text, dedup_first, k_core, write_and_report)
from dataset_files import MIN_INTERACTIONS
from utils import DataError, exit_on_data_error

# The paper's short dataset names and the 2018 category file names they come from.
CATEGORIES = {
    "Instruments": "Musical_Instruments",
    "Arts": "Arts_Crafts_and_Sewing",
    "Games": "Video_Games",
    "Scientific": "Industrial_and_Scientific",
    "Office": "Office_Products",
    "Pantry": "Prime_Pantry",
}


# --------------------------------------------------------------------------- reading
def find_raw_file(input_path: Path, names: list[str], what: str) -> Path:
    """The first of ``<input_path>/<name>.json.gz`` / ``.json`` that exists."""
    tried = [input_path / f"{n}{ext}" for n in dict.fromkeys(names) for ext in (".json.gz", ".json")]
    for path in tried:
        if path.is_file():
            return path
    raise DataError(f"{what} file not found; tried: {', '.join(str(p) for p in tried)}")


def read_objects(path: Path, desc: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line of a (gzipped) JSON-lines file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(tqdm(f, desc=desc, unit=" lines", mininterval=2), start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    try:  # some 2018 meta dumps hold Python dict literals (single quotes)
                        obj = ast.literal_eval(line)
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        raise DataError(f"{path}, line {line_no}: not a JSON object (nor a Python dict literal)") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}, line {line_no}: expected an object, got {type(obj).__name__}")
                yield line_no, obj
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as {'gzip-compressed ' if opener is gzip.open else ''}UTF-8 text ({e})") from e


def _field(obj: dict, name: str, path: Path, line_no: int) -> Any:
    value = obj.get(name)
    if value is None or value == "":
        raise DataError(f"{path}, line {line_no}: missing field {name!r}")
    return value


def read_meta(path: Path) -> dict[str, dict[str, Any]]:
    """{asin: item features} for items whose cleaned title is not empty (first line wins)."""
    items: dict[str, dict[str, Any]] = {}
    for line_no, obj in read_objects(path, "meta"):
        asin = str(_field(obj, "asin", path, line_no))
        title = clean_text(obj.get("title"))
        if not title or asin in items:
            continue
        categories = obj.get("category", obj.get("categories")) or []
        if categories and isinstance(categories[0], list):  # 2014 style: a list of paths
            categories = categories[0]
        items[asin] = {
            "title": title,
            "description": clean_text(obj.get("description")),
            "brand": clean_text(obj.get("brand")),
            "categories": [c for c in (clean_text(c) for c in categories) if c],
        }
    return items


def read_reviews(path: Path, titled: dict[str, Any]) -> list[tuple[str, str, float, int]]:
    """(reviewer, asin, unix time, line number) of every review of an item in ``titled``."""
    records = []
    for line_no, obj in read_objects(path, "reviews"):
        user = str(_field(obj, "reviewerID", path, line_no))
        asin = str(_field(obj, "asin", path, line_no))
        raw_time = _field(obj, "unixReviewTime", path, line_no)
        try:
            ts = float(raw_time)
        except (TypeError, ValueError):
            raise DataError(f"{path}, line {line_no}: unixReviewTime {raw_time!r} is not a number") from None
        if asin in titled:
            records.append((user, asin, ts, line_no))
    return records


def read_review_texts(path: Path, wanted: dict[int, str]) -> dict[str, dict[str, str]]:
    """Second pass: {key: {"review", "summary"}} for the lines in ``wanted`` ({line: key}).
    Texts are read only for kept reviews, so the first pass stays small."""
    out = {}
    for line_no, obj in read_objects(path, "review texts"):
        key = wanted.get(line_no)
        if key is not None:
            out[key] = {"review": clean_text(obj.get("reviewText")), "summary": clean_text(obj.get("summary"))}
    return out


# --------------------------------------------------------------------------- pipeline
def build(dataset: str, input_path: Path, output_path: Path, category: str | None = None,
          user_k: int = 5, item_k: int = 5) -> dict:
    names = [n for n in (category, CATEGORIES.get(dataset), dataset) if n]
    review_path = find_raw_file(input_path, names, "review")
    category = review_path.name.split(".json")[0]
    meta_path = find_raw_file(input_path, [f"meta_{category}"], "metadata")

    items_raw = read_meta(meta_path)
    records = read_reviews(review_path, items_raw)
    n_read = len(records)
    records = dedup_first(records)
    print(f"{n_read} reviews of {len(items_raw)} titled items; {n_read - len(records)} repeated (user, item) pairs dropped")
    # Leave-one-out needs 3 interactions per user whatever --user_k says.
    records = k_core(records, max(user_k, MIN_INTERACTIONS), item_k)
    check_not_empty(records, f"{review_path} (after the {user_k}/{item_k}-core filter)")

    inters, user_map, item_map = build_sequences(records)
    items = {str(new): items_raw[asin] for asin, new in item_map.items()}
    wanted = {line_no: f"({user_map[user]}, {item_map[asin]})" for user, asin, _, line_no in records}
    reviews = read_review_texts(review_path, wanted)
    return write_and_report(output_path, dataset, inters, items, {".review.json": reviews})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=str, default="Instruments", help="output name, e.g. Instruments, Arts, Games")
    parser.add_argument("--input_path", type=Path, default=Path("./raw"), help="folder with the raw .json.gz files")
    parser.add_argument("--category", type=str, default=None,
                        help="raw file stem, e.g. Musical_Instruments (default: from --dataset, see CATEGORIES)")
    parser.add_argument("--output_path", "--data_path", dest="output_path", type=Path, default=Path("./data"),
                        help="data_path: files go to <output_path>/<dataset>/")
    parser.add_argument("--user_k", type=int, default=5, help="minimum interactions per user (at least 3 are kept)")
    parser.add_argument("--item_k", type=int, default=5, help="minimum interactions per item")
    args = parser.parse_args(argv)
    if args.user_k < 1 or args.item_k < 1:
        parser.error("--user_k and --item_k must be positive")
    with exit_on_data_error():
        build(args.dataset, args.input_path, args.output_path, args.category, args.user_k, args.item_k)


if __name__ == "__main__":
    main()
