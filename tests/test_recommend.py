"""recommend.py: the three kinds of request on a tiny checkpoint, from the command line, over
HTTP, and in a real headless browser."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import recommend
from dataset_files import load_indices
from fixtures import make_dataset, make_tiny_model, train_tokenizer
from modeling import add_index_tokens
from recommender import RequestError, match_title
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 24


@pytest.fixture(scope="module")
def ckpt_and_data(tmp_path_factory):
    """A tiny random model saved with the index tokens added, and a dataset of 15 users / 24 items."""
    root = tmp_path_factory.mktemp("rec")
    data_path = make_dataset(root / "data", n_users=15, n_items=N_ITEMS)
    indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
    tok = train_tokenizer()
    add_index_tokens(tok, indices)
    model = make_tiny_model(len(tok), seed=5)
    model.save_pretrained(root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    titles = {i: f["title"] for i, f in json.loads((data_path / "Tiny" / "Tiny.item.json").read_text()).items()}
    inters = json.loads((data_path / "Tiny" / "Tiny.inter.json").read_text())
    return root / "ckpt", data_path, titles, inters


def base_args(ckpt, data_path, *extra):
    return ["--ckpt_path", str(ckpt), "--dataset", "Tiny", "--data_path", str(data_path), "--num_beams", "10",
            "--max_his_len", "5", *extra]


def run_json(ckpt, data_path, capsys, *extra):
    recommend.main(base_args(ckpt, data_path, "--json", *extra))
    return json.loads(capsys.readouterr().out)


def assert_real_distinct(out, k, titles):
    items = [r["item"] for r in out["items"]]
    assert len(items) == k == len(set(items)) and all(i in titles for i in items)
    assert [r["rank"] for r in out["items"]] == list(range(1, k + 1))
    assert all(r["title"] == titles[r["item"]] for r in out["items"])
    scores = [r["score"] for r in out["items"]]
    assert scores == sorted(scores, reverse=True)


def test_cli_user_history_and_query_return_k_real_items(ckpt_and_data, capsys):
    ckpt, data_path, titles, inters = ckpt_and_data
    out = run_json(ckpt, data_path, capsys, "--user", "3", "--k", "7")
    assert_real_distinct(out, 7, titles)
    seq = [str(i) for i in inters["3"]]
    assert [h["item"] for h in out["history"]] == seq[:-1] and out["held_out"]["item"] == seq[-1]
    assert all(r["in_history"] == (r["item"] in seq[:-1]) for r in out["items"])

    typed = f"{titles['4']}; {titles['9'].upper()}"  # exact, then case-insensitive
    out = run_json(ckpt, data_path, capsys, "--history", typed, "--k", "5")
    assert_real_distinct(out, 5, titles)
    assert [h["item"] for h in out["history"]] == ["4", "9"] and out["notes"] == []

    out = run_json(ckpt, data_path, capsys, "--history_ids", "4,9,11", "--k", "5")
    assert_real_distinct(out, 5, titles)
    assert [h["item"] for h in out["history"]] == ["4", "9", "11"]

    out = run_json(ckpt, data_path, capsys, "--query", "a gripping story for tonight", "--k", "6")
    assert_real_distinct(out, 6, titles)
    assert out["history"] == [] and not any(r["in_history"] for r in out["items"])

    # more beams than asked are used when K exceeds --num_beams; the table view prints every item
    recommend.main(base_args(ckpt, data_path, "--user", "3", "--k", "12"))
    table = capsys.readouterr().out
    assert "held-out next item" in table and table.count("\n") >= 12


def test_cpu_bf16_flag_sets_the_decoding_precision(ckpt_and_data, capsys, monkeypatch):
    from generation import Decoder

    ckpt, data_path, titles, _ = ckpt_and_data
    seen = []
    real = Decoder.rank

    def spy(self, *a, **kw):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, *a, **kw)

    monkeypatch.setattr(Decoder, "rank", spy)
    for choice, autocast in (("on", True), ("off", False)):
        seen.clear()
        out = run_json(ckpt, data_path, capsys, "--user", "3", "--k", "5", "--cpu_bf16", choice)
        assert seen == [autocast]  # one request, decoded under bf16 autocast only with "on"
        assert_real_distinct(out, 5, titles)


def test_typed_titles_match_closest_or_fail_with_suggestions():
    titles = {"1": "Star Wars", "2": "Fargo", "3": "The Empire Strikes Back"}
    assert match_title("fargo", titles) == ("2", None)
    item, note = match_title("Empire Strikes Bak", titles)
    assert item == "3" and "matched to" in note
    with pytest.raises(RequestError, match='unknown title "Star Trek"; closest titles: "Star Wars"'):
        match_title("Star Trek", titles)


def test_cli_bad_input_gives_clear_errors(ckpt_and_data, capsys, tmp_path):
    ckpt, data_path, titles, _ = ckpt_and_data
    cases = [
        (["--user", "999"], "unknown user '999'"),
        (["--history", " ; "], "the history is empty"),
        (["--history", "Zzzzqx"], 'unknown title "Zzzzqx"'),
        (["--history_ids", "4,777"], "unknown item ids ['777']"),
        (["--user", "3", "--k", str(N_ITEMS + 1)], f"K must be between 1 and the number of items ({N_ITEMS})"),
        (["--user", "3", "--history_ids", "4"], "give one of user, history or history_ids"),
        (["--query", "  "], "the request text is empty"),
        ([], "give --user, --history, --history_ids or --query"),
    ]
    for extra, message in cases:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            recommend.main(base_args(ckpt, data_path, *extra))
    # a checkpoint without the index tokens
    plain = tmp_path / "plain"
    tok = train_tokenizer()
    make_tiny_model(len(tok), seed=1).save_pretrained(plain)
    tok.save_pretrained(plain)
    with pytest.raises(DataError, match="index token"):
        recommend.main(base_args(plain, data_path, "--user", "3"))
    # a long history: the most recent --max_his_len items are used, and the answer says so
    out = run_json(ckpt, data_path, capsys, "--history_ids", ",".join(str(i) for i in range(12)), "--k", "3")
    assert any("the model sees the most recent 5" in n for n in out["notes"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ckpt_and_data):
    """recommend_server on 127.0.0.1 in a thread: its base URL."""
    import uvicorn

    from recommend_server import create_app
    from recommender import Recommender
    from arguments import parse_args

    ckpt, data_path, _, _ = ckpt_and_data
    app = create_app(Recommender(parse_args("recommend", base_args(ckpt, data_path))))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def post(url, body):
    req = urllib.request.Request(url + "/api/recommend", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_the_three_requests_and_rejects_bad_input(server, ckpt_and_data):
    _, _, titles, _ = ckpt_and_data
    with urllib.request.urlopen(server + "/", timeout=30) as r:
        assert r.status == 200 and b"<form" in r.read()
    with urllib.request.urlopen(server + "/api/catalogue", timeout=30) as r:
        cat = json.loads(r.read())
    assert len(cat["users"]) == 15 and len(cat["items"]) == N_ITEMS and cat["num_items"] == N_ITEMS
    for body, k in (({"user": "2", "k": 4}, 4), ({"history": titles["5"], "k": 3}, 3),
                    ({"history_ids": ["1", "2"], "query": "something gripping", "k": 5}, 5),
                    ({"query": "a tale for tonight", "k": 2}, 2)):
        status, out = post(server, body)
        assert status == 200, out
        assert_real_distinct(out, k, titles)
        assert out["latency_ms"] > 0
    for body, message in (({"user": "nobody"}, "unknown user"), ({"history": ""}, "nothing to recommend from"),
                          ({"history": "; ;"}, "the history is empty"),
                          ({"user": "2", "k": 1000}, "K must be between 1"), ({"user": "2", "k": "many"}, "k:"),
                          ({"history": "Zzzzqx"}, "unknown title")):
        status, out = post(server, body)
        assert status == 400 and message in out["error"], (body, out)


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_page_in_a_headless_browser(server, tmp_path):
    """The page loads, submits the request given in its URL and shows the results table."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", server + "/?user=2&k=5"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-state="done"' in dom, dom[-2000:]
    body = dom.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr") == 5 and "held-out next item" in dom
    bad = subprocess.run(cmd[:-1] + [server + "/?user=nobody"], capture_output=True, text=True, timeout=120).stdout
    assert "unknown user" in bad and "Traceback" not in bad
