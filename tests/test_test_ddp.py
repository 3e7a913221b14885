"""test.py and test_ddp.py: the shared evaluation loop end to end on a tiny random checkpoint."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arguments import parse_args
from dataset_files import load_indices
from fixtures import make_dataset, make_tiny_model, train_tokenizer
from evaluation import evaluate_checkpoint, predictions_path
from modeling import add_index_tokens
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]
N_USERS = 15  # odd: 2 ranks get shards of 7 and 8


@pytest.fixture(scope="module")
def ckpt_and_data(tmp_path_factory):
    """A tiny random model saved with the index tokens added, and a dataset of 15 users / 24 items."""
    root = tmp_path_factory.mktemp("eval")
    data_path = make_dataset(root / "data", n_users=N_USERS, n_items=24)
    indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
    tok = train_tokenizer()
    add_index_tokens(tok, indices)
    model = make_tiny_model(len(tok), seed=5)
    with torch.no_grad():  # wider (tied) embeddings: beam scores without near-ties
        model.get_input_embeddings().weight.normal_(0, 1.0)
    model.save_pretrained(root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    return root, data_path


def _args(ckpt, data_path, results, *extra):
    return ["--ckpt_path", str(ckpt), "--dataset", "Tiny", "--data_path", str(data_path), "--results_file",
            str(results), "--test_batch_size", "1", "--num_beams", "20", "--index_file", ".index.json", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_equals_single_device(ckpt_and_data):
    root, data_path = ckpt_and_data
    extra = ("--test_prompt_ids", "0,3", "--save_predictions")
    single = evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, root / "single.json", *extra)))
    assert single["num_examples"] == N_USERS and set(single["per_prompt"]) == {"0", "3"}

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "test_ddp.py"), *_args(root / "ckpt", data_path, root / "ddp.json", *extra)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((root / "ddp.json").read_text())
    assert ddp["world_size"] == 2 and ddp["num_examples"] == single["num_examples"]
    assert ddp["per_prompt"] == single["per_prompt"]
    assert {k: ddp[k] for k in ("mean", "min", "max")} == {k: single[k] for k in ("mean", "min", "max")}
    # every example scored exactly once, with the same ranked items
    rows = [json.loads(line) for line in predictions_path(root / "ddp.json").read_text().splitlines()]
    ref = [json.loads(line) for line in predictions_path(root / "single.json").read_text().splitlines()]
    assert [(r["prompt_id"], r["position"]) for r in rows] == [(p, i) for p in (0, 3) for i in range(N_USERS)]
    assert [(r["user"], r["items"], r["rank"]) for r in rows] == [(r["user"], r["items"], r["rank"]) for r in ref]
    indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
    assert all(len(r["items"]) == 20 and set(r["items"]) <= set(indices) for r in rows)


def test_two_decodings_share_one_load_and_write_two_labelled_tables(ckpt_and_data, tmp_path, capsys, monkeypatch):
    """--decoding trie,position: one model load, the trie's results in --results_file and the original
    rule's in <stem>_position.json, each table printed under its label; a non-item beam is a miss."""
    import modeling
    from evaluation import DECODING_LABELS

    root, data_path = ckpt_and_data
    loads = []
    real_load = modeling.load_for_inference
    monkeypatch.setattr(modeling, "load_for_inference", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    extra = ("--test_prompt_ids", "0,3", "--save_predictions")
    both = evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, tmp_path / "lcrec.json", *extra,
                                                        "--decoding", "trie,position")))
    assert len(loads) == 1
    out = capsys.readouterr().out
    trie_file, position_file = tmp_path / "lcrec.json", tmp_path / "lcrec_position.json"
    marks = [DECODING_LABELS["trie"], f"results: {trie_file}", DECODING_LABELS["position"], f"results: {position_file}"]
    assert all(m in out for m in marks) and [out.index(m) for m in marks] == sorted(out.index(m) for m in marks)
    trie, position = json.loads(trie_file.read_text()), json.loads(position_file.read_text())
    assert both == trie and (trie["decoding"], position["decoding"]) == ("trie", "position")
    assert trie["num_examples"] == position["num_examples"] == N_USERS and position["per_user"]["users"]

    alone = evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, tmp_path / "alone.json", *extra)))
    assert alone["per_prompt"] == trie["per_prompt"]  # scoring two decodings does not change the first
    rows = [json.loads(line) for line in predictions_path(position_file).read_text().splitlines()]
    assert sum(None in r["items"] for r in rows) > 0  # the random model spells non-items under the original rule
    for r in rows:  # each keeps its place and never hits
        assert r["rank"] == (r["items"].index(r["target_item"]) + 1 if r["target_item"] in r["items"] else 0)


def _fails(argv, match, results):
    with pytest.raises(DataError, match=match):
        evaluate_checkpoint(parse_args("test", argv))
    assert not Path(results).exists()


def test_bad_inputs_fail_clearly(ckpt_and_data, tmp_path):
    root, data_path = ckpt_and_data
    res = tmp_path / "r.json"
    _fails(_args(root / "ckpt", data_path, res, "--num_beams", "30"), "larger than the number of items", res)
    _fails(_args(root / "ckpt", data_path, res, "--test_task", "index2item"), "--test_task", res)
    _fails(_args(root / "ckpt", data_path, res, "--test_prompt_ids", "0,99"), "--test_prompt_ids", res)
    _fails(_args(root / "ckpt", data_path, res, "--metrics", "recall@5"), "--metrics", res)

    no_tok = tmp_path / "no_tok"  # weights without the tokenizer files
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(root / "ckpt" / f, no_tok / f)
    _fails(_args(no_tok, data_path, res), "tokenizer files", res)

    small = tmp_path / "small"  # tokenizer with the index tokens, model without their embeddings
    tok = train_tokenizer()
    make_tiny_model(len(tok)).save_pretrained(small)
    add_index_tokens(tok, load_indices(data_path / "Tiny" / "Tiny.index.json"))
    tok.save_pretrained(small)
    _fails(_args(small, data_path, res), "embedding rows", res)


def test_lora_adapter_evaluates_like_its_merged_model(ckpt_and_data, tiny_base_model, tmp_path):
    """--lora --base_model: the adapter folder (with the index tokenizer) on the base model gives the
    same results as the merged model saved as a full checkpoint."""
    import torch

    from lora_finetune import add_lora
    from modeling import load_for_training

    _, data_path = ckpt_and_data
    indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
    model, tok = load_for_training(str(tiny_base_model), indices)
    model = add_lora(model, parse_args("train", []))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter whose scores have no near-ties (a random tiny model's do)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
            elif "modules_to_save" in name and "embed_tokens" in name:
                p.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")

    extra = ("--test_prompt_ids", "1", "--num_beams", "10", "--sample_num", "6", "--save_predictions")
    lora = evaluate_checkpoint(parse_args("test", _args(tmp_path / "adapter", data_path, tmp_path / "l.json", *extra,
                                                       "--lora", "--base_model", str(tiny_base_model))))
    full = evaluate_checkpoint(parse_args("test", _args(tmp_path / "merged", data_path, tmp_path / "f.json", *extra)))
    assert lora["num_examples"] == full["num_examples"] == 6
    a = [json.loads(x) for x in predictions_path(tmp_path / "l.json").read_text().splitlines()]
    b = [json.loads(x) for x in predictions_path(tmp_path / "f.json").read_text().splitlines()]
    assert [x["items"] for x in a] == [y["items"] for y in b]
    assert [s for x in a for s in x["scores"]] == pytest.approx([s for y in b for s in y["scores"]], abs=1e-4)
    assert lora["per_prompt"]["1"] == pytest.approx(full["per_prompt"]["1"])


def test_unwritable_results_folder_fails_before_the_evaluation(ckpt_and_data, tmp_path, monkeypatch):
    root, data_path = ckpt_and_data
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    import evaluation

    monkeypatch.setattr(evaluation, "evaluate_prompt", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(DataError, match="--results_file .* cannot be created or written"):
        evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, blocker / "sub" / "r.json")))


def test_failed_results_write_prints_the_metrics_first(ckpt_and_data, tmp_path, monkeypatch, capsys):
    root, data_path = ckpt_and_data
    import utils

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils.json, "dump", disk_full)  # the write into the temporary file fails
    results = tmp_path / "r.json"
    with pytest.raises(DataError, match=r"could not write the results .*printed above.* to .*r\.json: No space left on device; nothing half"):
        evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, results, "--sample_num", "3")))
    out = capsys.readouterr().out
    assert "hit@1" in out and "mean" in out and not results.exists()


def test_long_test_prompts_are_cut_like_training_prompts(ckpt_and_data, tmp_path):
    root, data_path = ckpt_and_data
    full = evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, tmp_path / "full.json",
                                                         "--save_predictions")))
    assert full["prompts_cut"] == 0
    short = evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, tmp_path / "cut.json",
                                                          "--model_max_length", "30", "--save_predictions",
                                                          "--test_task", "SeqRec")))
    assert short["test_task"] == "seqrec"  # case-insensitive, as in the original
    assert short["prompts_cut"] == short["num_examples"] == N_USERS and short["model_max_length"] == 30
    rows = [json.loads(line) for line in predictions_path(tmp_path / "cut.json").read_text().splitlines()]
    assert all(r["prompt_cut"] for r in rows) and all(len(r["items"]) == 20 for r in rows)


def test_test_collator_keeps_the_newest_prompt_tokens():
    from collator import TestCollator, encode_prompt

    tok = train_tokenizer()
    prompt = "The user has watched the following items in order. red blue night river king star city"
    ids = encode_prompt(tok, prompt)
    collate = TestCollator(tok, max_prompt_length=5)
    enc, _ = collate([{"prompt": prompt, "target": "x"}, {"prompt": "red", "target": "y"}])
    assert collate.last_cut == [True, len(encode_prompt(tok, "red")) > 5]
    assert enc["input_ids"][0].tolist() == ids[-5:]


def test_exclude_history_is_an_option_and_off_by_default(ckpt_and_data):
    """By default (the paper's protocol) the ranking may hold the user's history; --exclude_history
    leaves it out and still ranks --num_beams real items."""
    root, data_path = ckpt_and_data
    inters = json.loads((data_path / "Tiny" / "Tiny.inter.json").read_text())
    history = {u: {str(i) for i in seq[:-1]} for u, seq in inters.items()}
    runs = {}
    for name, extra in (("paper", ()), ("masked", ("--exclude_history",))):
        results = root / f"{name}.json"
        runs[name] = evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, results, "--num_beams",
                                                                  "10", "--save_predictions", *extra)))
        runs[name]["rows"] = [json.loads(line) for line in predictions_path(results).read_text().splitlines()]
    assert runs["paper"]["exclude_history"] is False and runs["masked"]["exclude_history"] is True
    assert sum(len(set(r["items"]) & history[r["user"]]) for r in runs["paper"]["rows"]) > 0
    for r in runs["masked"]["rows"]:
        assert len(r["items"]) == 10 == len(set(r["items"])) and not set(r["items"]) & history[r["user"]]


def test_fusion_weight_is_recorded_and_changes_the_ranking(ckpt_and_data):
    """test.py --fusion_weight: the results record the weight and the ranker's settings; a large weight ranks by
    the co-occurrence ranker, so the rankings move away from the model's own."""
    root, data_path = ckpt_and_data
    runs = {}
    for name, extra in (("plain", ()), ("fused", ("--fusion_weight", "50", "--fusion_context", "2"))):
        results = root / f"{name}.json"
        runs[name] = evaluate_checkpoint(parse_args("test", _args(root / "ckpt", data_path, results, "--num_beams",
                                                                  "5", "--save_predictions", *extra)))
        runs[name]["rows"] = [json.loads(line) for line in predictions_path(results).read_text().splitlines()]
    assert (runs["plain"]["fusion_weight"], runs["plain"]["fusion"]) == (0.0, None)
    assert runs["fused"]["fusion_weight"] == 50.0
    from arguments import COOCCURRENCE_DEFAULTS

    assert runs["fused"]["fusion"] == dict(zip(("context", "window", "decay", "damping"), (2, *COOCCURRENCE_DEFAULTS[1:])))
    assert sum(a["items"] != b["items"] for a, b in zip(runs["plain"]["rows"], runs["fused"]["rows"])) > 0
    from item_teacher import CooccurrenceRanker

    inters = json.loads((data_path / "Tiny" / "Tiny.inter.json").read_text())
    items = list(json.loads((data_path / "Tiny" / "Tiny.index.json").read_text()))
    ranker = CooccurrenceRanker.build(inters, items, context=2)
    position = {item: k for k, item in enumerate(items)}
    agree = 0
    for row in runs["fused"]["rows"]:
        q = ranker.next_item([[position[str(i)] for i in inters[row["user"]][:-1]]])[0]
        top2 = q.topk(2).values
        if top2[0] > 1.5 * top2[1]:  # a clear best item: the weight makes it first
            agree += row["items"][0] == items[int(q.argmax())]
            assert row["items"][0] == items[int(q.argmax())]
    assert agree > 0
    for flag, value in (("--fusion_weight", "-1"), ("--fusion_decay", "0"), ("--fusion_decay", "1.5"),
                        ("--fusion_damping", "-0.1"), ("--fusion_window", "0")):
        with pytest.raises(SystemExit):
            parse_args("test", _args(root / "ckpt", data_path, root / "x.json", flag, value))
