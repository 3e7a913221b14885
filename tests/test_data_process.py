"""Dataset builders (movielens.py, amazon18.py) and item text embeddings (text_emb.py)."""
from __future__ import annotations

import gzip
import json
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_process import amazon18, movielens, text_emb
from data_process.base_model import DEFAULT_CACHE, fetch_wheel
from data_process.common import clean_text
from dataset_files import load_inters, load_items
from utils import DataError


# --------------------------------------------------------------------------- MovieLens
@pytest.fixture(scope="module")
def recbole_wheel():
    try:
        return fetch_wheel(movielens.RECBOLE_SPEC, movielens.RECBOLE_GLOB, DEFAULT_CACHE / "wheels")
    except (subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
        pytest.skip(f"the {movielens.RECBOLE_SPEC} wheel could not be fetched: {e}")


def test_ml100k_statistics_order_and_text(recbole_wheel, tmp_path):
    stats = movielens.build("ml-100k", tmp_path)
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    inters = load_inters(tmp_path / "ml-100k" / "ml-100k.inter.json")
    items = load_items(tmp_path / "ml-100k" / "ml-100k.item.json")
    assert len(inters) == 943 and len(items) == 1682

    # Independent check: ml-100k ids are 1..943 and 1..1682, so id order gives new = old - 1;
    # every history is the stable time sort of the user's rows in file order.
    with zipfile.ZipFile(recbole_wheel) as zf:
        rows = zf.read("recbole/dataset_example/ml-100k/ml-100k.inter").decode().splitlines()[1:]
    by_user: dict[int, list[tuple[float, int]]] = {}
    for row in rows:
        user, item, _, ts = row.split("\t")
        by_user.setdefault(int(user), []).append((float(ts), int(item)))
    ties = sum(len(v) - len({t for t, _ in v}) for v in by_user.values())
    assert ties > 0  # the check below is about ties for real
    for user, events in by_user.items():
        assert inters[str(user - 1)] == [item - 1 for _, item in sorted(events, key=lambda e: e[0])]

    assert items["0"]["title"] == "Toy Story"
    assert items["0"]["description"] == "Released in 1995. Genres: Animation, Children's, Comedy."
    assert items["11"]["title"] == "The Usual Suspects"


def write_atomic(folder: Path, name: str, inter_rows: list[str], item_rows: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "\n".join(inter_rows) + "\n")
    (folder / f"{name}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "\n".join(item_rows) + "\n")


def test_movielens_small_atomic_folder(tmp_path):
    raw = tmp_path / "raw"
    write_atomic(raw, "toy", [
        "10\t5\t4\t100", "10\t3\t1\t100", "10\t9\t5\t50", "10\t4\t3\t100",  # ties at 100 keep file order
        "2\t3\t4\t7", "2\t9\t2\t5", "2\t5\t3\t9",
        "1\t3\t4\t1", "1\t5\t4\t2",                 # 2 interactions: dropped
        "2\t8\t1\t1",                               # item 8 has no title: interaction dropped
    ], [
        "3\tUsual Suspects, The\t1995\tCrime Thriller",
        "4\tBlue Angel, The (Blaue Engel, Der)\t1930\tDrama",
        "5\tToy &amp; Story\t1995\tAnimation Children's Comedy",
        "9\tGood Morning\tunknown\tunknown",
        "8\t \t1990\tDrama",
        "11\tNever Watched\t1990\tDrama",           # no interactions: not an item of the dataset
    ])
    stats = movielens.build("toy", tmp_path / "out", raw_dir=raw)
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 4, 7)
    inters = json.loads((tmp_path / "out/toy/toy.inter.json").read_text())
    items = json.loads((tmp_path / "out/toy/toy.item.json").read_text())
    # users by raw id: 2 -> "0", 10 -> "1"; items by raw id: 3 -> 0, 4 -> 1, 5 -> 2, 9 -> 3
    assert inters == {"0": [3, 0, 2], "1": [3, 2, 0, 1]}
    assert items["0"] == {"title": "The Usual Suspects", "description": "Released in 1995. Genres: Crime, Thriller.",
                          "year": "1995", "genres": ["Crime", "Thriller"]}
    assert items["1"]["title"] == "The Blue Angel (Der Blaue Engel)"
    assert items["2"]["title"] == "Toy & Story"
    assert items["3"]["description"] == ""


def test_movielens_errors_leave_no_output(tmp_path):
    raw = tmp_path / "raw"
    write_atomic(raw, "few", ["1\t1\t4\t1", "1\t2\t4\t2", "2\t1\t3\t3"], ["1\tA\t1995\tDrama", "2\tB\t1995\tDrama"])
    with pytest.raises(DataError, match="no interactions are left"):
        movielens.build("few", tmp_path / "out", raw_dir=raw)
    assert not (tmp_path / "out" / "few").exists() or not any((tmp_path / "out" / "few").iterdir())

    write_atomic(raw, "bad", ["1\t1\t4\t1", "1\t2\t4"], ["1\tA\t1995\tDrama"])
    with pytest.raises(DataError, match=r"bad\.inter, line 3: expected 4 tab-separated fields"):
        movielens.build("bad", tmp_path / "out", raw_dir=raw)
    with pytest.raises(DataError, match=r"missing\.inter: RecBole atomic inter file not found"):
        movielens.build("missing", tmp_path / "out", raw_dir=raw)


# --------------------------------------------------------------------------- Amazon 2018
def write_jsonl_gz(path: Path, lines: list) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def review(user: str, asin: str, t: int, text: str = "fine", summary: str = "ok") -> dict:
    return {"overall": 5.0, "reviewerID": user, "asin": asin, "unixReviewTime": t, "reviewText": text,
            "summary": summary, "reviewTime": "01 1, 2015"}


CORE_USERS = [f"U{k}" for k in range(6)]   # U0..U5 review the six core items: a 6x6 block
CORE_ITEMS = [f"B00{k}" for k in range(6)]  # B000..B005


def amazon_fixture(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    reviews = []
    for u, user in enumerate(CORE_USERS):
        for k, asin in enumerate(CORE_ITEMS):
            reviews.append(review(user, asin, 1000 + 10 * ((k + u) % 6), text=f"{user} on {asin}"))
    # U0 reviews B000 again, later: the repeat is dropped and the first text kept
    reviews.append(review("U0", "B000", 5000, text="second time"))
    # U0's B003 and B004 share a time with each other (ties keep file order)
    reviews = [r if not (r["reviewerID"] == "U0" and r["asin"] in ("B003", "B004")) else {**r, "unixReviewTime": 777}
               for r in reviews]
    # DUP: 5 rows but only 4 distinct items -> fewer than 5 after de-duplication
    reviews += [review("DUP", a, 2000 + k) for k, a in enumerate(["B000", "B001", "B002", "B003", "B003"])]
    # SPARSE has 4 reviews: dropped in round 1; then ZZZ (5 reviewers) falls to 4, then CASC to 4
    reviews += [review("SPARSE", a, 3000 + k) for k, a in enumerate(["ZZZ", "B000", "B001", "B002"])]
    reviews += [review("CASC", a, 3100 + k) for k, a in enumerate(["ZZZ", "B000", "B001", "B002", "B003"])]
    reviews += [review(u, "ZZZ", 3200) for u in ("U0", "U1", "U2")]
    # NOTITLE would be a core item but has no title (only tags); NOMETA has no metadata at all
    reviews += [review(u, "NOTITLE", 4000) for u in CORE_USERS]
    reviews += [review(u, "NOMETA", 4100) for u in CORE_USERS]
    write_jsonl_gz(folder / "Musical_Instruments.json.gz", reviews)

    meta = [{"asin": a, "title": f"Item {a}", "description": [f"About {a}."], "brand": "Acme",
             "category": ["Musical Instruments", "Guitars"]} for a in CORE_ITEMS[1:]]
    meta.append(str({"asin": "B000", "title": "Guitar &amp; Strings <b>Pro</b>\n  Pack",
                     "description": ["<p>Bright&nbsp;tone.</p>", "Nickel   wound."], "brand": "Acme"}))  # dict literal
    meta += [{"asin": "ZZZ", "title": "Rare item", "description": ""},
             {"asin": "NOTITLE", "title": "<span></span>", "description": "No name."},
             {"asin": "B001", "title": "A later duplicate meta line is ignored"}]
    write_jsonl_gz(folder / "meta_Musical_Instruments.json.gz", meta)


def test_amazon18_core_order_text_and_reviews(tmp_path):
    raw = tmp_path / "raw"
    amazon_fixture(raw)
    stats = amazon18.build("Instruments", raw, tmp_path / "out")
    assert (stats["users"], stats["items"], stats["interactions"]) == (6, 6, 36)

    folder = tmp_path / "out" / "Instruments"
    inters = load_inters(folder / "Instruments.inter.json")
    items = load_items(folder / "Instruments.item.json")
    reviews = json.loads((folder / "Instruments.review.json").read_text())
    # 5-core holds on the output, and no (user, item) pair repeats
    item_counts = Counter(i for seq in inters.values() for i in seq)
    assert min(len(seq) for seq in inters.values()) >= 5 and min(item_counts.values()) >= 5
    assert all(len(set(seq)) == len(seq) for seq in inters.values())
    # ids: users U0..U5 -> "0".."5", items B000..B005 -> 0..5 (sorted raw ids)
    assert [items[str(k)]["title"] for k in range(1, 6)] == [f"Item {a}" for a in CORE_ITEMS[1:]]
    assert items["0"]["title"] == "Guitar & Strings Pro Pack"
    assert items["0"]["description"] == "Bright tone. Nickel wound."  # &nbsp; is whitespace too
    assert items["1"]["categories"] == ["Musical Instruments", "Guitars"]
    # U0: times 1000 + 10 * (k % 6) except B003/B004 at 777, tied, in file order
    assert inters["0"] == [3, 4, 0, 1, 2, 5]
    # U2: times 1000 + 10 * ((k + 2) % 6): B004 (1000), B005, B000, B001, B002, B003
    assert inters["2"] == [4, 5, 0, 1, 2, 3]
    assert len(reviews) == 36
    assert reviews["(0, 0)"] == {"review": "U0 on B000", "summary": "ok"}  # the first review, not the repeat
    assert reviews["(3, 5)"]["review"] == "U3 on B005"


def test_amazon18_errors(tmp_path):
    raw = tmp_path / "raw"
    amazon_fixture(raw)
    with pytest.raises(DataError, match="no interactions are left"):
        amazon18.build("Instruments", raw, tmp_path / "out", user_k=7, item_k=7)
    assert not (tmp_path / "out" / "Instruments").exists() or not any((tmp_path / "out" / "Instruments").iterdir())

    with pytest.raises(DataError, match=r"review file not found; tried: .*Nope\.json\.gz"):
        amazon18.build("Nope", raw, tmp_path / "out")
    write_jsonl_gz(raw / "Arts_Crafts_and_Sewing.json.gz", [review("U0", "B000", 1)])
    with pytest.raises(DataError, match=r"metadata file not found; tried: .*meta_Arts_Crafts_and_Sewing\.json\.gz"):
        amazon18.build("Arts", raw, tmp_path / "out")

    write_jsonl_gz(raw / "meta_Bad.json.gz", [{"asin": "B000", "title": "x"}])
    write_jsonl_gz(raw / "Bad.json.gz", [review("U0", "B000", 1), "", '{"reviewerID": "U1", "asin": '])
    with pytest.raises(DataError, match=r"Bad\.json\.gz, line 3: not a JSON object"):
        amazon18.build("Bad", raw, tmp_path / "out")
    write_jsonl_gz(raw / "Bad.json.gz", [{"reviewerID": "U1", "asin": "B000"}])
    with pytest.raises(DataError, match=r"Bad\.json\.gz, line 1: missing field 'unixReviewTime'"):
        amazon18.build("Bad", raw, tmp_path / "out")


def test_amazon18_command_line_category(tmp_path, capsys):
    raw = tmp_path / "raw"
    amazon_fixture(raw)
    amazon18.main(["--dataset", "Guitars", "--category", "Musical_Instruments", "--input_path", str(raw),
                   "--output_path", str(tmp_path / "out"), "--user_k", "5", "--item_k", "5"])
    assert "users: 6  items: 6  interactions: 36" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "Guitars").iterdir()) == [
        "Guitars.inter.json", "Guitars.item.json", "Guitars.review.json"]


def test_clean_text():
    assert clean_text("a &amp;amp; b<br/>c\n\t d") == "a & b c d"
    assert clean_text(["<p>One</p>", "Two"]) == "One Two"
    assert clean_text(None) == ""


# --------------------------------------------------------------------------- text embeddings
def direct_embedding(model, tokenizer, text: str) -> np.ndarray:
    """One text, no batch and no padding: the plain mean of its last hidden states."""
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).last_hidden_state[0].mean(0).numpy()


def test_text_emb_matches_unbatched(tiny_data, tiny_base_model):
    from transformers import AutoModel, AutoTokenizer

    data_path, name = tiny_data
    item_file = data_path / name / f"{name}.item.json"
    items = json.loads(item_file.read_text())
    items["3"]["description"] = ""  # embedded from the title alone
    items["5"]["title"] = items["5"]["title"] + " with a much longer title than all the others so batches pad"
    item_file.write_text(json.dumps(items))

    text_emb.main(["--dataset", name, "--data_path", str(data_path), "--plm_checkpoint", str(tiny_base_model),
                   "--plm_name", "tiny", "--batch_size", "5"])
    emb = np.load(data_path / name / f"{name}.emb-tiny-td.npy")
    model = AutoModel.from_pretrained(tiny_base_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_model)
    assert emb.shape == (len(items), model.config.hidden_size) and emb.dtype == np.float32
    for i in range(len(items)):  # every row, in item order
        fields = [items[str(i)]["title"]] + ([items[str(i)]["description"]] if items[str(i)]["description"] else [])
        expected = np.mean([direct_embedding(model, tokenizer, t) for t in fields], axis=0)
        np.testing.assert_allclose(emb[i], expected, rtol=1e-4, atol=1e-5, err_msg=f"item {i}")
    assert not np.allclose(emb[0], emb[1])


def test_text_emb_rejects_bad_items(tiny_data, tiny_base_model):
    data_path, name = tiny_data
    item_file = data_path / name / f"{name}.item.json"
    items = json.loads(item_file.read_text())
    items["2"] = {"title": "", "description": ""}
    item_file.write_text(json.dumps(items))
    with pytest.raises(SystemExit):
        text_emb.main(["--dataset", name, "--data_path", str(data_path), "--plm_checkpoint", str(tiny_base_model)])
    with pytest.raises(DataError, match="item 2 has neither a title nor a description"):
        text_emb.item_texts(items, item_file)
    assert not list((data_path / name).glob("*.npy"))
