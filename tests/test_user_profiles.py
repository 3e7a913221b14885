"""data_process/user_profiles.py: answer cleaning, resume after a crash, the user.json format,
the OpenAI-compatible backend against a local server, and the hf backend on a tiny model."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_process import profile_backends as backends
from data_process import profile_prompts as prompts
from data_process import user_profiles as up
from dataset_files import dataset_file, load_inters, load_items
from fixtures import make_dataset
from utils import DataError

# --------------------------------------------------------------------------- cleaning
MESSY = [
    ("Sure! Here is the user's preference:\n\n**Long-term preference:** The user loves gritty crime dramas.",
     "The user loves gritty crime dramas."),
    ('1. "The user enjoys light romantic comedies."', "The user enjoys light romantic comedies."),
    ("General preference: The user likes sci-fi epics and space operas.\n",
     "The user likes sci-fi epics and space operas."),
    ("### Answer\nThe user is into 90s thrillers lately.", "The user is into 90s thrillers lately."),
    ("<|im_start|>assistant\nI want a cozy mystery to read by the fire.<|im_end|>",
     "I want a cozy mystery to read by the fire."),
    ("The user enjoys dark psychological thrillers. They also like slow", "The user enjoys dark psychological thrillers."),
    ("The user likes Westerns, war films, and epics, especially those with a strong",
     "The user likes Westerns, war films, and epics."),
    ("This movie is a comedy-drama film about a medieval knight who", "This movie is a comedy-drama film about a medieval knight."),
    ("- Short-term: Lately drawn to upbeat musicals.", "Lately drawn to upbeat musicals."),
    ('Here\'s a one-sentence summary: "The user prefers character-driven indie dramas."',
     "The user prefers character-driven indie dramas."),
    ("1. Enjoys classic horror.\n2. Likes 80s slasher films.", "Enjoys classic horror. Likes 80s slasher films."),
    ("Sure, the user enjoys upbeat comedies.", "The user enjoys upbeat comedies."),
    ("Certainly! The user is a fan of hard science fiction.", "The user is a fan of hard science fiction."),
    ("User-related intention: I'd like a guitar tuner that clips onto the headstock.",
     "I'd like a guitar tuner that clips onto the headstock."),
    ('Answer: **"A warm, family-friendly animated adventure."**', "A warm, family-friendly animated adventure."),
    ("User-friendly tuner with a clear display.", "User-friendly tuner with a clear display."),
    ("I love noir. I love noir. I love noir.", "I love noir."),
]


@pytest.mark.parametrize("raw,expected", MESSY)
def test_clean_answer_messy(raw, expected):
    cleaned = prompts.clean_answer(raw)
    assert cleaned == expected
    assert "\n" not in cleaned


@pytest.mark.parametrize("raw", ["", "   \n ", "I'm sorry, but I cannot help with that.", "As an AI language model, no.",
                                 "the the the the the the the the the", "Sure! Here is the answer:", "<|im_end|>", "Ok."])
def test_clean_answer_rejects_unusable(raw):
    assert prompts.clean_answer(raw) is None


def test_clean_answer_masks_the_item_title():
    hidden = prompts._title_variants("Shining, The (1980)")
    assert "The Shining" in hidden and "Shining, The" in hidden
    out = prompts.clean_answer('The movie "The Shining" is a slow, icy horror story in a snowed-in hotel.', hidden)
    assert out == "This movie is a slow, icy horror story in a snowed-in hotel."
    assert prompts.clean_answer("Shining - a chilling tale of a hotel in winter.", hidden) == "A chilling tale of a hotel in winter."
    # Only whole words: "Brother" is masked, "brotherhood" is not.
    assert prompts.clean_answer("A film on brotherhood, unlike Brother itself.", prompts._title_variants("Brother (1997)")) == \
        "A film on brotherhood, unlike this one itself."
    assert "Seven" in prompts._title_variants("Seven (Se7en)")
    assert prompts.natural_title("Big Sleep, The (1946)") == "The Big Sleep (1946)"
    assert prompts.natural_title("Toy Story") == "Toy Story"


def test_default_domain():
    assert prompts.default_domain("ml-100k") == "movies"
    assert prompts.default_domain("Instruments") == "musical instruments"
    assert prompts.default_domain("Video_Games") == "video games"
    assert prompts.domain_verbs("movies") == ("watched", "watch")
    assert prompts.domain_verbs("video games")[1] == "play"


# --------------------------------------------------------------------------- fake backend
class ScriptedBackend:
    """Answers from a function of the prompt; can crash after a number of generate calls."""

    name = "scripted"

    def __init__(self, answer=None, crash_after: int | None = None):
        self.answer = answer or (lambda messages, sample: f"The user enjoys films number {len(messages[-1]['content'])}.")
        self.crash_after, self.calls, self.samples = crash_after, 0, 0

    def prompt_length(self, messages):
        return len(messages[-1]["content"])

    def generate(self, batch, sample=False):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.samples += len(batch) if sample else 0
        return [self.answer(m, sample) for m in batch]


def _load(data_path, name="Tiny"):
    return (load_inters(dataset_file(data_path, name, ".inter.json")),
            load_items(dataset_file(data_path, name, ".item.json")))


def test_resume_after_crash(tiny_data, tmp_path, monkeypatch):
    data_path, name = tiny_data
    inters, items = _load(data_path, name)
    out, journal_path = tmp_path / "u.json", tmp_path / "u.journal.jsonl"
    requested: list[str] = []
    real_user_requests = up.user_requests

    def spy(user, *a, **k):
        requested.append(user)
        return real_user_requests(user, *a, **k)

    monkeypatch.setattr(up, "user_requests", spy)
    run = lambda backend: up.build_profiles(backend, inters, items, {}, "movies", up.Journal(journal_path, {"m": 1}),  # noqa: E731
                                            out, batch_size=4)
    # Chunks of 4 users x 7 prompts = 7 calls each: the crash hits the second chunk.
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(ScriptedBackend(crash_after=10))
    assert not out.exists()
    first = [json.loads(line) for line in journal_path.read_text().splitlines()][1:]
    assert [r["user"] for r in first] == ["0", "1", "2", "3"]
    with open(journal_path, "a") as f:  # a write torn by the crash
        f.write('{"user": "4", "explicit": ["The user li')

    requested.clear()
    stats = run(ScriptedBackend())
    assert sorted(requested, key=int) == [str(u) for u in range(4, 15)]  # nobody twice, nobody lost
    assert stats.users_resumed == 4 and stats.users_generated == 11
    records = [json.loads(line) for line in journal_path.read_text().splitlines()][1:]
    assert sorted(r["user"] for r in records) == sorted(inters)  # the torn line is gone, no duplicates
    profiles = json.loads(out.read_text())
    up.validate_user_profiles(profiles, inters)
    assert set(profiles["user_explicit_preference"]) == set(inters)

    # A finished run regenerates nothing; changed interactions make only that user stale.
    requested.clear()
    inters["5"] = inters["5"][:-1] + [inters["5"][0]]
    stats = run(ScriptedBackend())
    assert requested == ["5"] and stats.stale == 1
    # Other settings than the journal's: a clear error, not a silent mix.
    with pytest.raises(DataError, match="other settings"):
        up.build_profiles(ScriptedBackend(), inters, items, {}, "movies", up.Journal(journal_path, {"m": 2}), out)


def test_max_users_is_first_users_by_id(tiny_data, tmp_path):
    data_path, name = tiny_data
    inters, items = _load(data_path, name)
    out = tmp_path / "u.json"
    up.build_profiles(ScriptedBackend(), inters, items, {}, "movies", up.Journal(tmp_path / "j.jsonl", {}), out,
                      max_users=11, batch_size=8)
    profiles = json.loads(out.read_text())
    assert sorted(profiles["user_explicit_preference"], key=int) == [str(u) for u in range(11)]


def test_unusable_answers_are_retried_then_replaced(tiny_data, tmp_path):
    data_path, name = tiny_data
    inters, items = _load(data_path, name)
    out = tmp_path / "u.json"
    backend = ScriptedBackend(answer=lambda m, sample: "Sure! Here is the answer:" if not sample else "<|im_end|>")
    stats = up.build_profiles(backend, inters, items, {}, "movies", up.Journal(tmp_path / "j.jsonl", {}), out,
                              max_users=3, batch_size=8, retries=1)
    assert backend.samples == 21 and stats.retried == 21
    assert sum(stats.fallbacks.values()) == 21 and all(v == 3 for v in stats.fallbacks.values())
    profiles = json.loads(out.read_text())
    up.validate_user_profiles(profiles, inters)
    for split in ("train", "test"):
        for user, entry in profiles["user_vague_intention"][split].items():
            title = items[str(entry["item"])]["title"]
            assert all(title not in q for q in entry["querys"])  # the fallback does not name the item


def test_reviews_feed_the_intentions(tiny_data, tmp_path):
    data_path, name = tiny_data
    inters, items = _load(data_path, name)
    review_file = tmp_path / "r.json"
    seq = inters["0"]
    review_file.write_text(json.dumps({f"(0, {seq[-3]})": {"review": "Sturdy and loud, my band loves it.",
                                                             "summary": "Great for gigs"}}))
    reviews = up.load_reviews(review_file)
    reqs = up.user_requests("0", seq, items, reviews, "musical instruments", 20, 5)
    by_field = {r.field: r.messages[-1]["content"] for r in reqs}
    assert "Great for gigs" in by_field["train_user"] and "Sturdy and loud" in by_field["train_user"]
    assert items[str(seq[-3])]["title"] not in by_field["train_user"]
    assert "Great for gigs" not in by_field["test_user"]  # no review: the item's own text
    assert items[str(seq[-1])]["description"] in by_field["test_user"]


# --------------------------------------------------------------------------- format
def _valid_profiles(inters):
    users = sorted(inters)[:3]
    return {
        "user_explicit_preference": {u: ["Likes noir.", "Long into westerns.", "Lately comedies."] for u in users},
        "user_vague_intention": {
            "train": {u: {"item": inters[u][-3], "inters": inters[u][:-3], "querys": ["I want a thrill.", "A chase."]}
                      for u in users},
            "test": {u: {"item": inters[u][-1], "inters": inters[u][:-1], "querys": ["I want to laugh.", "A farce."]}
                     for u in users},
        },
    }


def test_validate_user_profiles(tiny_data):
    data_path, name = tiny_data
    inters, _ = _load(data_path, name)
    good = _valid_profiles(inters)
    up.validate_user_profiles(good, inters)
    up.validate_user_profiles(json.loads(dataset_file(data_path, name, ".user.json").read_text()), inters)

    def broken(edit):
        bad = copy.deepcopy(good)
        edit(bad)
        return bad

    cases = {
        "missing key": broken(lambda p: p.pop("user_vague_intention")),
        "empty string": broken(lambda p: p["user_explicit_preference"]["0"].__setitem__(1, " ")),
        "newline": broken(lambda p: p["user_explicit_preference"]["0"].__setitem__(0, "a\nb")),
        "one query": broken(lambda p: p["user_vague_intention"]["train"]["0"]["querys"].pop()),
        "wrong item": broken(lambda p: p["user_vague_intention"]["test"]["0"].__setitem__("item", inters["0"][-2])),
        "wrong history": broken(lambda p: p["user_vague_intention"]["train"]["0"].__setitem__("inters", inters["0"])),
        "string item": broken(lambda p: p["user_vague_intention"]["train"]["0"].__setitem__("item", "3")),
        "user sets differ": broken(lambda p: p["user_vague_intention"]["test"].pop("0")),
        "no list": broken(lambda p: p["user_explicit_preference"].__setitem__("0", "Likes noir.")),
    }
    for what, bad in cases.items():
        with pytest.raises(DataError):
            up.validate_user_profiles(bad, inters)
            pytest.fail(f"accepted: {what}")


# --------------------------------------------------------------------------- openai backend
class TinyChatServer:
    """/v1/chat/completions on 127.0.0.1 (free port), answered by a tiny real model; the first
    requests can be made to fail with given HTTP statuses."""

    def __init__(self, model_dir, fail_with=()):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.fail_with, self.requests, self.lock = list(fail_with), [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    status = server.fail_with.pop(0) if server.fail_with else 200
                if self.path != "/v1/chat/completions":
                    status = 404
                if status != 200:
                    self._send(status, {"error": {"message": f"status {status}", "type": "test"}}, {"Retry-After": "0"})
                    return
                self._send(200, server.complete(body))

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def complete(self, body):
        import torch

        enc = self.tokenizer(backends.plain_prompt(body["messages"]), return_tensors="pt")
        with self.lock, torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=min(body.get("max_tokens") or 8, 8), do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_openai_backend_retries_then_answers(tiny_base_model):
    waits = []
    with TinyChatServer(tiny_base_model, fail_with=[500, 429]) as server:
        backend = backends.OpenAIBackend(server.url, "tiny", max_new_tokens=6, max_retries=3, retry_delay=0.01,
                                   concurrency=1, sleep=waits.append)
        msgs = [[{"role": "user", "content": f"Describe the {w} films."}] for w in ("red", "blue", "night")]
        answers = backend.generate(msgs)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert len(server.requests) == 5 and backend.retries_done == 2
    assert waits[1] > waits[0] > 0  # exponential backoff
    assert all(r["model"] == "tiny" and r["max_tokens"] == 6 for r in server.requests)
    assert server.requests[-1]["messages"] == msgs[-1]


def test_openai_backend_gives_up_clearly(tiny_base_model):
    msgs = [[{"role": "user", "content": "Describe the red films."}]]
    with TinyChatServer(tiny_base_model, fail_with=[400]) as server:
        backend = backends.OpenAIBackend(server.url, "tiny", max_retries=3, retry_delay=0.01, sleep=lambda s: None)
        with pytest.raises(RuntimeError, match="request failed"):
            backend.generate(msgs)
        assert len(server.requests) == 1  # a client error is not retried
    with TinyChatServer(tiny_base_model, fail_with=[503] * 3) as server:
        backend = backends.OpenAIBackend(server.url, "tiny", max_retries=2, retry_delay=0.01, sleep=lambda s: None)
        with pytest.raises(RuntimeError, match="after 2 retries"):
            backend.generate(msgs)
        assert len(server.requests) == 3


def test_openai_backend_end_to_end(tiny_data, tiny_base_model, capsys):
    data_path, name = tiny_data
    dataset_file(data_path, name, ".user.json").unlink()
    with TinyChatServer(tiny_base_model, fail_with=[502]) as server:
        up.main(["--dataset", name, "--data_path", str(data_path), "--backend", "openai", "--api_base", server.url,
                 "--model_name", "tiny", "--max_users", "2", "--batch_size", "4", "--max_new_tokens", "6",
                 "--retry_delay", "0.01"])
    inters, _ = _load(data_path, name)
    profiles = json.loads(dataset_file(data_path, name, ".user.json").read_text())
    up.validate_user_profiles(profiles, inters)
    assert sorted(profiles["user_explicit_preference"]) == ["0", "1"]
    assert "users: 2 selected" in capsys.readouterr().out


# --------------------------------------------------------------------------- hf backend
def test_hf_backend_tiny_model_end_to_end(tiny_data, tiny_base_model, capsys):
    backend = backends.HFBackend(tiny_base_model, max_new_tokens=5)
    assert not backend.has_chat_template  # the trained tokenizer has none: plain prompt format
    msgs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "red night"}],
            [{"role": "user", "content": "the blue river king of the summer city and its iron road"}]]
    assert backend.render(msgs[0]) == "System: Be brief.\n\nUser: red night\n\nAssistant:"
    batched = backend.generate(msgs)
    alone = [backend.generate([m])[0] for m in msgs]
    assert batched == alone  # left padding: the short prompt is not disturbed by the long one

    data_path, name = tiny_data
    up.main(["--dataset", name, "--data_path", str(data_path), "--model_path", str(tiny_base_model),
             "--max_users", "3", "--batch_size", "8", "--max_new_tokens", "5", "--restart"])
    inters, _ = _load(data_path, name)
    profiles = json.loads(dataset_file(data_path, name, ".user.json").read_text())
    up.validate_user_profiles(profiles, inters)
    assert len(profiles["user_explicit_preference"]) == 3
    assert all(t.strip() for texts in profiles["user_explicit_preference"].values() for t in texts)
    assert "replaced by a sentence built from the data" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input, model guard, settings
def _main_fails_writing_nothing(folder, capsys, argv) -> str:
    """user_profiles.main(argv) exits with 1 and one error line (returned), writing nothing in ``folder``."""
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        up.main(argv)
    assert exit_info.value.code == 1
    line = _one_error_line(capsys)
    assert sorted(p.name for p in folder.iterdir()) == before  # no journal, no output
    return line


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _break_malformed(data_path, name, tmp_path):
    dataset_file(data_path, name, ".inter.json").write_text('{"0": [1, 2,')
    return r"Tiny\.inter\.json: interaction file is not valid JSON"


def _break_few_interactions(data_path, name, tmp_path):
    path = dataset_file(data_path, name, ".inter.json")
    inters = json.loads(path.read_text())
    inters["4"] = inters["4"][:2]
    path.write_text(json.dumps(inters))
    return r"Tiny\.inter\.json: user '4' has 2 interactions; leave-one-out needs at least 3"


def _break_journal(data_path, name, tmp_path):
    journal = dataset_file(data_path, name, ".user.journal.jsonl")
    journal.write_text(json.dumps({"meta": {"dataset": name, "backend": "hf", "model": "another-model"}}) + "\n")
    return (r"Tiny\.user\.journal\.jsonl: this journal was written with other settings: "
            r"model 'another-model' \(journal\)")


@pytest.mark.parametrize("breaker", [_break_malformed, _break_few_interactions, _break_journal])
def test_main_bad_input_is_one_error_line(breaker, tiny_data, tiny_base_model, tmp_path, capsys):
    data_path, name = tiny_data
    dataset_file(data_path, name, ".user.json").unlink()
    pattern = breaker(data_path, name, tmp_path)
    line = _main_fails_writing_nothing(data_path / name, capsys, ["--dataset", name, "--data_path", str(data_path),
                                                                   "--model_path", str(tiny_base_model),
                                                                   "--max_new_tokens", "3"])
    assert re.search(pattern, line), line


def test_script_prints_one_error_line(tmp_path):
    root = make_dataset(tmp_path / "d")
    dataset_file(root, "Tiny", ".item.json").write_text("[1, 2]")  # valid JSON, wrong shape
    script = up.__file__
    proc = subprocess.run([sys.executable, script, "--dataset", "Tiny", "--data_path", str(root),
                           "--model_path", str(tmp_path / "unused")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {dataset_file(root, 'Tiny', '.item.json')}: expected a non-empty object "
                      "{item: {title, description}}"]
    assert "Traceback" not in proc.stderr


def test_require_instruct_refuses_a_model_without_chat_template(tiny_data, tiny_base_model, tmp_path, capsys):
    data_path, name = tiny_data
    line = _main_fails_writing_nothing(data_path / name, capsys, ["--dataset", name, "--data_path", str(data_path),
                                                                   "--model_path", str(tiny_base_model),
                                                                   "--require_instruct", "--restart"])
    assert f"--model_path {tiny_base_model}" in line and "no chat template" in line
    assert "--backend openai" in line and "$OPENAI_BASE_URL" in line and "$OPENAI_MODEL" in line

    # the same tokenizer with a chat template passes the check
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    chat_dir = tmp_path / "chat"
    tok.save_pretrained(chat_dir)
    up.check_instruct_model(chat_dir)
    with pytest.raises(DataError, match="no chat template"):
        up.check_instruct_model(tiny_base_model)


def test_generation_flags_reach_the_endpoint(tiny_data, tiny_base_model, monkeypatch, capsys):
    args = up.parse_args(["--dataset", "Tiny"])
    assert (args.max_new_tokens, args.temperature, args.require_instruct) == (32, 0.0, False)
    with pytest.raises(SystemExit):
        up.parse_args(["--dataset", "Tiny", "--temperature", "-0.1"])
    data_path, name = tiny_data
    with TinyChatServer(tiny_base_model) as server:
        # endpoint and model from the environment, the paper's generation settings from flags
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_MODEL", "tiny-instruct")
        assert up.parse_args(["--dataset", "Tiny", "--backend", "openai"]).max_new_tokens == 80
        up.main(["--dataset", name, "--data_path", str(data_path), "--backend", "openai", "--max_users", "1",
                 "--max_new_tokens", "512", "--temperature", "0.4", "--retries", "0", "--restart"])
    first = server.requests[:7]
    assert len(first) == 7 and all(r["model"] == "tiny-instruct" for r in first)
    assert all(r["max_tokens"] == 512 and r["temperature"] == 0.4 for r in first)
    header = json.loads(dataset_file(data_path, name, ".user.journal.jsonl").read_text().splitlines()[0])
    assert header["meta"]["max_new_tokens"] == 512 and header["meta"]["temperature"] == 0.4
    assert "max_new_tokens 512, temperature 0.4" in capsys.readouterr().out


# --------------------------------------------------------------------------- the original's sampling and answer style
def test_paragraph_style_asks_for_several_sentences_and_sentence_style_is_unchanged(tiny_data):
    data_path, name = tiny_data
    inters, items = _load(data_path, name)
    seq = inters["0"]
    one = up.user_requests("0", seq, items, {}, "movies", 20, 5)
    few = up.user_requests("0", seq, items, {}, "movies", 20, 5, prompts.ANSWER_STYLES["paragraph"])
    assert len(one) == len(few) == len(prompts.FIELDS)
    assert all(r.messages[0]["content"] == "Answer with one short sentence." for r in one)
    assert all("one sentence" in r.messages[1]["content"] or "one first-person sentence" in r.messages[1]["content"]
               for r in one)
    for r in few:
        system, user = r.messages[0]["content"], r.messages[1]["content"]
        assert "one" not in system.lower().split() and "sentences" in system
        assert "one sentence" not in user and "one first-person sentence" not in user
        assert "a few sentences" in user or "a few first-person sentences" in user


@pytest.mark.parametrize("raw", [
    "Sure! Here is the user's profile:\n\nThe user loves gritty crime dramas. They also enjoy slow, moody mysteries "
    "with morally grey leads.\n\nOverall, dark stories appeal to them.",
    "1. The user loves gritty crime dramas.\n2. They also enjoy slow, moody mysteries.\n3. Dark stories appeal.",
])
def test_clean_answer_keeps_every_sentence_of_a_longer_answer(raw):
    text = prompts.clean_answer(raw)
    assert text.startswith("The user loves gritty crime dramas.") and text.count(".") >= 3 and "\n" not in text


@pytest.mark.parametrize("raw", ["", "   ", "**", "Answer:", '""', "...", "<|im_end|>", "1.\n2.\n", "- \n* ",
                                 "Heat.", "The movie Heat (1995).", "Sure! Here is the answer:", "\u200b",
                                 "Summary:\n\n"])
def test_clean_answer_never_returns_an_empty_string(raw):
    text = prompts.clean_answer(raw, hidden_titles=("Heat (1995)", "Heat"))
    assert text is None or (text.strip(" .") and len(text.split()) >= 3)


def _generation_config_of(backend, monkeypatch):
    """The GenerationConfig and stopping criteria the backend's next generate call passes to the model."""
    seen = {}
    real = backend.model.generate

    def spy(*a, generation_config=None, stopping_criteria=None, **k):
        seen["config"], seen["stop"] = generation_config, list(stopping_criteria or [])
        return real(*a, generation_config=generation_config, stopping_criteria=stopping_criteria, **k)

    monkeypatch.setattr(backend.model, "generate", spy)
    backend.generate([[{"role": "user", "content": "red night"}]])
    return seen["config"], seen["stop"]


def test_hf_backend_samples_with_the_original_settings_when_asked(tiny_base_model, monkeypatch):
    default = backends.HFBackend(tiny_base_model, max_new_tokens=4, temperature=0.4)
    config, stop = _generation_config_of(default, monkeypatch)
    assert (config.top_p, config.repetition_penalty, len(stop)) == (0.95, 1.1, 1)  # unchanged defaults
    original = backends.HFBackend(tiny_base_model, max_new_tokens=4, temperature=0.4, repetition_penalty=1.0,
                                  top_p=1.0, stop_at_sentence=False)
    config, stop = _generation_config_of(original, monkeypatch)
    assert config.do_sample and (config.temperature, config.top_p, config.repetition_penalty) == (0.4, 1.0, 1.0)
    assert stop == []  # answers of several sentences run to their end


def test_original_settings_reach_the_endpoint_and_the_journal(tiny_data, tiny_base_model, capsys):
    args = up.parse_args(["--dataset", "Tiny"])
    assert (args.top_p, args.repetition_penalty, args.answer_style) == (None, 1.1, "sentence")
    for bad in (["--top_p", "0"], ["--top_p", "1.5"], ["--repetition_penalty", "0"], ["--answer_style", "essay"]):
        with pytest.raises(SystemExit):
            up.parse_args(["--dataset", "Tiny", *bad])
    data_path, name = tiny_data
    with TinyChatServer(tiny_base_model) as server:
        up.main(["--dataset", name, "--data_path", str(data_path), "--backend", "openai", "--api_base", server.url,
                 "--model_name", "tiny", "--max_users", "1", "--retries", "0", "--restart"])
        default = server.requests[:7]
        up.main(["--dataset", name, "--data_path", str(data_path), "--backend", "openai", "--api_base", server.url,
                 "--model_name", "tiny", "--max_users", "1", "--retries", "0", "--restart", "--temperature", "0.4",
                 "--top_p", "1", "--answer_style", "paragraph"])
        original = server.requests[7:14]
    assert all("top_p" not in r for r in default)  # the server's own default, as before
    assert all(r["top_p"] == 1.0 and r["temperature"] == 0.4 for r in original)
    assert all(r["messages"][0]["content"] == prompts.ANSWER_STYLES["paragraph"].system for r in original)
    header = json.loads(dataset_file(data_path, name, ".user.journal.jsonl").read_text().splitlines()[0])["meta"]
    assert (header["top_p"], header["answer_style"]) == (1.0, "paragraph")
    # a journal written with other answers is not resumed silently
    capsys.readouterr()
    with pytest.raises(SystemExit):
        up.main(["--dataset", name, "--data_path", str(data_path), "--backend", "openai", "--api_base", server.url,
                 "--model_name", "tiny", "--max_users", "1", "--temperature", "0.4", "--top_p", "1"])
    assert "answer_style 'paragraph' (journal) vs 'sentence' (now)" in _one_error_line(capsys)


# --------------------------------------------------------------------------- who writes the profiles (run.sh's check)
from data_process import profile_writer as pw  # noqa: E402


def _writer(argv, capsys):
    """profile_writer.main(argv): (exit status, stdout, stderr lines)."""
    code = 0
    try:
        pw.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_profile_writer_refuses_a_base_model_under_require_instruct_from_its_files(tiny_base_model, tmp_path, capsys,
                                                                                    monkeypatch):
    from transformers import AutoTokenizer

    user = tmp_path / "D.user.json"
    assert pw.chat_template_in(tiny_base_model) is False and pw.chat_template_in("org/some-hub-model") is None
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("the check loads no tokenizer"))
    code, out, err = _writer(["--user_file", str(user), "--model_path", str(tiny_base_model), "--require_instruct",
                              "--max_new_tokens", "512"], capsys)
    assert code == 2 and out == "" and len(err) == 1 and err[0].startswith("error: ")
    assert "no chat template" in err[0] and "PROFILE_MODEL" in err[0] and str(user) in err[0]
    with pytest.raises(DataError, match="no chat template"):  # user_profiles.py's own check reads the same files
        up.check_instruct_model(tiny_base_model)
    # without --require_instruct it is said, not refused; a ready user.json is used whatever the model
    code, out, _ = _writer(["--user_file", str(user), "--model_path", str(tiny_base_model)], capsys)
    assert code == 0 and "no chat template" in out
    user.write_text("{}")
    code, out, _ = _writer(["--user_file", str(user), "--model_path", str(tiny_base_model), "--require_instruct"],
                           capsys)
    assert code == 0 and out.strip() == f"user profiles: {user} exists and will be used (FORCE=1 writes it again)"
    assert _writer(["--user_file", str(user), "--model_path", str(tiny_base_model), "--require_instruct", "--force"],
                   capsys)[0] == 2


@pytest.mark.parametrize("template_file", ["chat_template.jinja", "tokenizer_config.json"])
def test_profile_writer_finds_a_chat_template_where_a_tokenizer_keeps_it(tmp_path, template_file, capsys):
    folder = tmp_path / "instruct"
    folder.mkdir()
    if template_file == "chat_template.jinja":
        (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
        (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    else:
        (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert pw.chat_template_in(folder) is True
    code, out, _ = _writer(["--user_file", str(tmp_path / "u.json"), "--model_path", str(folder),
                            "--require_instruct"], capsys)
    assert code == 0 and out.strip() == f"user profiles: written by the hf model {folder} (has a chat template)"


def test_profile_writer_needs_the_openai_variables(tmp_path, capsys, monkeypatch):
    for var in pw.OPENAI_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_MODEL", "some-instruct")
    argv = ["--user_file", str(tmp_path / "u.json"), "--backend", "openai"]
    code, out, err = _writer(argv, capsys)
    assert code == 2 and len(err) == 1
    assert "$OPENAI_BASE_URL, $OPENAI_API_KEY" in err[0] and "OPENAI_MODEL" not in err[0]
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "EMPTY")
    code, out, _ = _writer(argv, capsys)
    assert code == 0 and "http://127.0.0.1:9/v1, model some-instruct" in out
