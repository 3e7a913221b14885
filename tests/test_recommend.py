"""recommend.py: the three kinds of request on a tiny checkpoint, from the command line, over
HTTP, and in a real headless browser."""
import json
import os
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


def test_copy_prompt_cache_flag_gives_each_beam_its_own_cache_with_the_same_answer(ckpt_and_data, capsys,
                                                                                  monkeypatch):
    import generation

    ckpt, data_path, titles, _ = ckpt_and_data
    real, trees = generation.tree_forward, []
    monkeypatch.setattr(generation, "tree_forward", lambda *a, **kw: trees.append(1) or real(*a, **kw))
    answers = []
    for extra in ((), ("--copy_prompt_cache",)):
        trees.clear()
        answers.append(run_json(ckpt, data_path, capsys, "--user", "3", "--k", "5", "--cpu_bf16", "off", *extra))
        assert bool(trees) == (not extra)  # the tree steps run only without the flag
    assert [r["item"] for r in answers[0]["items"]] == [r["item"] for r in answers[1]["items"]]
    assert_real_distinct(answers[1], 5, titles)


def test_eos_is_scored_only_with_score_eos(ckpt_and_data, capsys, monkeypatch):
    import generation

    ckpt, data_path, titles, _ = ckpt_and_data
    real, steps = generation.tree_forward, []
    monkeypatch.setattr(generation, "tree_forward", lambda *a, **kw: steps.append(1) or real(*a, **kw))
    index_len = len(next(iter(json.loads((data_path / "Tiny" / "Tiny.index.json").read_text()).values())))
    for extra, forwards in (((), index_len - 1), (("--score_eos",), index_len)):
        steps.clear()
        out = run_json(ckpt, data_path, capsys, "--user", "3", "--k", "5", "--cpu_bf16", "off", *extra)
        assert len(steps) == forwards  # after the prompt: one forward per later index token, and EOS's
        assert_real_distinct(out, 5, titles)


def test_prompt_prefixes_are_cached_for_each_request_kind_unless_switched_off(ckpt_and_data):
    """The words every prompt of a kind starts with are run once at start-up: a request then runs
    only the rest of its prompt and answers as the whole prompt does (fp32); --no_prefix_cache
    runs every prompt whole."""
    from arguments import parse_args
    from recommender import Recommender

    ckpt, data_path, titles, _ = ckpt_and_data
    widths = []
    answers = {}
    for extra in ((), ("--no_prefix_cache",)):
        rec = Recommender(parse_args("recommend", base_args(ckpt, data_path, "--cpu_bf16", "off", *extra)))
        hook = rec.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
        requests = (({"user": "3"}, rec.user_history("3")[0], None), ({"query": "a story"}, [], "a story"),
                    ({"history_ids": "1,2", "query": "a story"}, ["1", "2"], "a story"))
        for request, history, query in requests:
            widths.clear()
            out = rec.answer(**request, k=5)
            assert_real_distinct(out, 5, titles)
            whole = len(rec.collate.encode(rec.build_prompt(history, query))[0])
            answers.setdefault(str(request), []).append([(r["item"], r["score"]) for r in out["items"]])
            if extra:
                assert rec.decoder.prefixes is None and widths[0] == whole
            else:
                assert 0 < widths[0] < whole  # the prompt's first words came from the cache
                index_ids = {i for toks in rec.indices.values() for i in rec.tokenizer.convert_tokens_to_ids(toks)}
                assert len(rec.decoder.prefixes.entries) == 3  # history, query, history and query
                assert not any(set(ids.tolist()) & index_ids for ids, _ in rec.decoder.prefixes.entries)
        hook.remove()
    for cached, whole in answers.values():
        assert [i for i, _ in cached] == [i for i, _ in whole]
        assert all(abs(a - b) <= 1.5e-4 for (_, a), (_, b) in zip(cached, whole))  # scores rounded to 4 places


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


def test_history_items_are_left_out_by_the_search_unless_kept(ckpt_and_data, capsys):
    """K = every item not in the history: the search must return exactly those (more than
    --num_beams 10), so leaving the history out cannot be a filter on the top K. --keep_history
    brings the history's items back, marked."""
    ckpt, data_path, titles, inters = ckpt_and_data
    history = {str(i) for i in inters["3"][:-1]}
    left = N_ITEMS - len(history)
    assert left > 10  # more than the beams
    out = run_json(ckpt, data_path, capsys, "--user", "3", "--k", str(left))
    assert_real_distinct(out, left, titles)
    assert {r["item"] for r in out["items"]} == set(titles) - history and not any(r["in_history"] for r in out["items"])
    assert out["keep_history"] is False

    out = run_json(ckpt, data_path, capsys, "--history_ids", ",".join(sorted(history)), "--k", "5")
    assert_real_distinct(out, 5, titles)
    assert not {r["item"] for r in out["items"]} & history

    out = run_json(ckpt, data_path, capsys, "--user", "3", "--k", str(N_ITEMS), "--keep_history")
    assert_real_distinct(out, N_ITEMS, titles)
    assert {r["item"] for r in out["items"] if r["in_history"]} == history and out["keep_history"] is True

    with pytest.raises(RequestError, match=f"K is {left + 1} but only {left} items are not in the history"):
        recommend.main(base_args(ckpt, data_path, "--user", "3", "--k", str(left + 1)))


def test_table_cuts_long_titles_and_json_keeps_them(ckpt_and_data, capsys, tmp_path):
    ckpt, data_path, _, _ = ckpt_and_data
    long_data = tmp_path / "data"
    shutil.copytree(data_path, long_data)
    item_file = long_data / "Tiny" / "Tiny.item.json"
    items = json.loads(item_file.read_text())
    for i, fields in items.items():
        fields["title"] = f"A very long title {i} " + "x" * 100_000
    item_file.write_text(json.dumps(items))
    recommend.main(base_args(ckpt, long_data, "--user", "3", "--k", "5", "--title_width", "40"))
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if "<a_" in line]
    assert len(rows) == 5 and max(len(r) for r in rows) < 40 + 80 and "…" in rows[0], table
    assert max(len(line) for line in table.splitlines()) < 5 * 45 + 60  # the history line: 5 cut titles
    recommend.main(base_args(ckpt, long_data, "--user", "3", "--k", "5"))  # the default width, 60
    rows = [line for line in capsys.readouterr().out.splitlines() if "<a_" in line]
    assert len(rows) == 5 and max(len(r) for r in rows) < 60 + 80
    out = run_json(ckpt, long_data, capsys, "--user", "3", "--k", "5", "--title_width", "40")
    assert all(len(r["title"]) > 100_000 for r in out["items"])


def test_every_core_by_default_and_threads_flag(ckpt_and_data, capsys, monkeypatch):
    from generation import Decoder

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    probe = "import os, recommend; print(os.environ.get('OMP_NUM_THREADS'))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stderr[-2000:]  # nothing pins one thread

    ckpt, data_path, _, _ = ckpt_and_data
    seen, real = [], Decoder.rank
    monkeypatch.setattr(Decoder, "rank", lambda self, *a, **kw: seen.append(torch.get_num_threads()) or real(self, *a, **kw))
    torch.set_num_threads(2)
    run_json(ckpt, data_path, capsys, "--user", "3", "--k", "3", "--threads", "1")
    assert seen == [1]


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


def post_raw(url, data, content_type="application/json", path="/api/recommend"):
    """POST bytes (or an iterable of bytes: sent chunked, without Content-Length); (status, answer, seconds)."""
    headers = {"Content-Type": content_type} if content_type is not None else {}
    req = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - start


BAD_BODIES = {  # name: (body, Content-Type, status, start of the error)
    "1 MB body": (json.dumps({"query": "x" * 2**20}).encode(), "application/json", 413,
                  "body: over the limit of 64 KB"),
    "1 MB of bad JSON, refused before parsing": (b"{" * 2**20, "application/json", 413, "body: over the limit"),
    "1 MB chunked, no length": ((b"x" * 2**16 for _ in range(16)), "application/json", 413, "body: over the limit"),
    "wrong content type": (b'{"user": "2"}', "text/plain", 400,
                           "Content-Type: expected application/json, got 'text/plain'"),
    "no content type": (b'{"user": "2"}', None, 400, "Content-Type: expected application/json"),
    "malformed JSON": (b'{"user": "2",', "application/json", 400, "body: not valid JSON"),
    "empty body": (b"", "application/json", 400, "body: empty"),
    "JSON nested too deeply": (b"[" * 50_000, "application/json", 400, "body: not valid JSON"),
    "not an object": (b'["2"]', "application/json", 400, "body: expected a JSON object"),
    "unknown field": (b'{"usr": "2"}', "application/json", 400, "usr: Extra inputs are not permitted"),
    "wrong type": (b'{"user": "2", "keep_history": "maybe"}', "application/json", 400, "keep_history:"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_server_refuses_a_bad_body_with_400_or_413_and_its_own_error(server, case):
    data, content_type, status, message = BAD_BODIES[case]
    code, out, seconds = post_raw(server, data, content_type)
    assert code == status and set(out) == {"error"} and out["error"].startswith(message), (code, out)
    assert seconds < 10
    with pytest.raises(urllib.error.HTTPError) as e:  # a wrong route answers in the same shape
        urllib.request.urlopen(server + "/api/nothing", timeout=30)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())


@pytest.mark.parametrize("body,message", [({"user": "u" * 50_000}, "unknown user"),
                                          ({"history": "Zz" * 25_000}, "unknown title"),
                                          ({"history_ids": ["9" * 50_000]}, "unknown item ids")])
def test_server_errors_quote_at_most_200_characters(server, body, message):
    code, out, _ = post_raw(server, json.dumps(body).encode())
    assert code == 400 and message in out["error"] and len(out["error"]) < 400, out["error"][:500]


def test_server_leaves_the_history_out_unless_asked_to_keep_it(server, ckpt_and_data):
    _, _, titles, inters = ckpt_and_data
    history = {str(i) for i in inters["2"][:-1]}
    k = N_ITEMS - len(history)
    code, out, _ = post_raw(server, json.dumps({"user": "2", "k": k}).encode())
    assert code == 200 and out["keep_history"] is False
    assert_real_distinct(out, k, titles)
    assert {r["item"] for r in out["items"]} == set(titles) - history
    code, out, _ = post_raw(server, json.dumps({"user": "2", "k": N_ITEMS, "keep_history": True}).encode())
    assert code == 200 and {r["item"] for r in out["items"] if r["in_history"]} == history


def start_serve(ckpt, data_path, port):
    cmd = [sys.executable, str(ROOT / "recommend.py"), *base_args(ckpt, data_path, "--serve", "--port", str(port))]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_on_a_port_in_use_exits_1_with_the_reason(ckpt_and_data):
    ckpt, data_path, _, _ = ckpt_and_data
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_serve(ckpt, data_path, port)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "serving on" not in out, (out, err)
    assert f"--port {port}: cannot listen there: Address already in use" in err and "Traceback" not in err, err


def test_serve_says_serving_on_only_once_the_port_is_bound(ckpt_and_data):
    ckpt, data_path, _, _ = ckpt_and_data
    proc = start_serve(ckpt, data_path, 0)  # any free port: the line must name the one bound
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2].rstrip("/")
        with urllib.request.urlopen(url + "/api/catalogue", timeout=30) as r:  # answering at once
            assert r.status == 200 and json.loads(r.read())["num_items"] == N_ITEMS
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_fusion_weight_ranks_by_what_followed_the_requests_history(ckpt_and_data, capsys):
    """--fusion_weight: the request's own history is the co-occurrence ranker's; a large weight puts
    the item that most often followed its last item first, and the history is still left out."""
    from item_teacher import CooccurrenceRanker

    ckpt, data_path, titles, inters = ckpt_and_data
    items = list(json.loads((data_path / "Tiny" / "Tiny.index.json").read_text()))
    ranker = CooccurrenceRanker.build(inters, items, context=1)
    position = {item: k for k, item in enumerate(items)}
    checked = 0
    for last in items:
        q = ranker.next_item([[position[last]]])[0]
        q[position[last]] = 0  # the history is left out of the answer
        best = q.topk(2).values
        if best[0] < 1.5 * best[1]:
            continue  # no clear first item
        out = run_json(ckpt, data_path, capsys, "--history_ids", last, "--k", "3", "--fusion_weight", "50",
                       "--fusion_context", "1")
        assert out["items"][0]["item"] == items[int(q.argmax())] and last not in [r["item"] for r in out["items"]]
        checked += 1
        if checked == 3:
            break
    assert checked > 0
