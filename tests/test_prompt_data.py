"""Templates, task datasets, splits and collators."""
import json
import random

import pytest
import torch

import collator
import data
import prompt
from arguments import ALL_TASKS, parse_args
from dataset_files import dataset_file, index_tokens
from fixtures import make_dataset, train_tokenizer
from utils import DataError

EXPECTED_COUNTS = {"seqrec": 17, "item2index": 19, "index2item": 17, "fusionseqrec": 12, "itemsearch": 11,
                   "preferenceobtain": 11}


def train_args(data_path, dataset="Tiny", *extra, tasks=ALL_TASKS, prompt_nums=None, data_nums=None):
    prompt_nums = prompt_nums or [1] * len(tasks)
    data_nums = data_nums or [0] * len(tasks)
    return parse_args("train", ["--data_path", str(data_path), "--dataset", dataset, "--tasks", ",".join(tasks),
                                "--train_prompt_sample_num", ",".join(map(str, prompt_nums)),
                                "--train_data_sample_num", ",".join(map(str, data_nums)), *extra])


def test_template_counts_and_fields(tiny_data):
    assert {t: len(v) for t, v in prompt.TEMPLATES.items()} == EXPECTED_COUNTS
    args = train_args(*tiny_data)
    for task in ALL_TASKS:
        ds = data.TASK_DATASETS[task](args, "train", prompt_sample_num=0)
        fields = ds.fields(ds.examples[-1], random.Random(0))
        assert set(fields) >= set(prompt.FIELDS[task]), task
        for tid, template in enumerate(ds.templates):
            assert prompt.template_fields(template) <= set(prompt.FIELDS[task]), (task, tid)
            p, r = prompt.render(template, fields)
            assert "{" not in p + r and r, (task, tid)
            assert p.startswith(prompt.PREAMBLE) and p.endswith(f"{prompt.RESPONSE_HEADER}\n")
    # item2index: 6 from the title, 6 from the description, then 7 from both (the original's split)
    uses = [prompt.template_fields(t) - {"item"} for t in prompt.TEMPLATES["item2index"]]
    assert uses == [{"title"}] * 6 + [{"description"}] * 6 + [{"title", "description"}] * 7
    # fusionseqrec: 4 title, 4 description, then 4 index outputs (the testable ones)
    responses = [t["response"] for t in prompt.TEMPLATES["fusionseqrec"]]
    assert responses == ["{title}"] * 4 + ["{description}"] * 4 + ["{item}"] * 4
    assert data.test_prompt_ids("fusionseqrec") == [8, 9, 10, 11]
    assert data.test_prompt_ids("seqrec") == list(range(17))
    assert data.test_prompt_ids("itemsearch") == list(range(11))
    with pytest.raises(DataError, match="not a test task"):
        data.test_prompt_ids("item2index")


def test_history_format(tiny_data):
    args = train_args(*tiny_data, "--max_his_len", "3", "--add_prefix", "--his_sep", " | ")
    ds = data.SeqRecDataset(args, "test", prompt_id=0)
    seq = ds.files.inters["0"]
    expected = " | ".join(f"{k}. {ds.files.index_str(i)}" for k, i in enumerate(seq[-4:-1], 1))
    assert ds.fields(ds.examples[0], random.Random(0))["history"] == expected
    assert expected in ds[0]["prompt"]
    assert ds[0]["target"] == ds.files.index_str(seq[-1]) and ds[0]["user"] == "0"


def test_sample_numbers_per_task(tiny_data):
    args = train_args(*tiny_data)
    inters = json.loads(dataset_file(*tiny_data, ".inter.json").read_text())
    n_seqrec = sum(len(s) - 3 for s in inters.values())  # prefixes of s[:-2] with >= 1 history item
    full, _ = data.load_datasets(args)
    sizes = dict(zip(full.tasks, (len(d) for d in full.datasets)))
    assert sizes["seqrec"] == sizes["fusionseqrec"] == n_seqrec
    assert sizes["item2index"] == sizes["index2item"] == 24
    assert sizes["itemsearch"] == 15 and sizes["preferenceobtain"] == 15  # one example per user

    args = train_args(*tiny_data, prompt_nums=[2, 0, 1, 3, 1, 1], data_nums=[10, 0, 5, 0, 4, 0])
    train, valid = data.load_datasets(args)
    sizes = dict(zip(train.tasks, (len(d) for d in train.datasets)))
    assert sizes == {"seqrec": 20, "item2index": 24 * 19, "index2item": 5, "fusionseqrec": n_seqrec * 3,
                     "itemsearch": 4, "preferenceobtain": 15}
    assert len(train) == sum(sizes.values())
    # 2 validation templates per user, on the second-to-last item
    assert len(valid) == 2 * len(inters)
    seqrec = train.datasets[0]
    assert len({seqrec.template_of(i)[1] for i in range(2)}) == 2  # k distinct templates per example
    assert all(v["response"] == seqrec.files.index_str(inters[str(u)][-2])
               for u, v in zip(sorted(inters, key=int), (valid[2 * j] for j in range(len(inters)))))
    # --valid_sample_num keeps a seeded subset of validation users
    args.valid_sample_num = 4
    _, small_valid = data.load_datasets(args)
    assert len(small_valid) == 2 * 4
    assert {ex["user"] for ex in small_valid.examples} < set(inters)


def test_templates_redrawn_each_epoch(tiny_data):
    train, _ = data.load_datasets(train_args(*tiny_data, tasks=["seqrec"]))
    ds = train.datasets[0]
    draw = lambda: [ds.template_of(i)[1] for i in range(len(ds))]  # noqa: E731
    first = draw()
    assert draw() == first  # same epoch, same draw (identical on every rank)
    train.set_epoch(1)
    second = draw()
    assert second != first and len(set(second)) > 3


def test_partial_and_missing_user_file(tmp_path):
    root = make_dataset(tmp_path / "d")
    path = dataset_file(root, "Tiny", ".user.json")
    user = json.loads(path.read_text())
    keep = {"1", "4", "7"}
    user["user_explicit_preference"] = {u: v for u, v in user["user_explicit_preference"].items() if u in keep}
    for split in ("train", "test"):
        user["user_vague_intention"][split] = {u: v for u, v in user["user_vague_intention"][split].items()
                                               if u in keep}
    path.write_text(json.dumps(user))
    train, _ = data.load_datasets(train_args(root))
    by_task = dict(zip(train.tasks, train.datasets))
    assert {ex["user"] for ex in by_task["itemsearch"].examples} == keep
    assert {ex["user"] for ex in by_task["preferenceobtain"].examples} == keep
    test_args = parse_args("test", ["--data_path", str(root), "--dataset", "Tiny"])
    assert sorted(x["user"] for x in data.load_test_dataset(test_args, "itemsearch", 3)) == sorted(keep)

    path.unlink()
    data._load_user_file.cache_clear()
    assert len(data.load_datasets(train_args(root, tasks=["seqrec", "item2index"]))[0]) > 0
    with pytest.raises(DataError, match=r"Tiny\.user\.json.*not found"):
        data.load_datasets(train_args(root, tasks=["seqrec", "itemsearch"]))


def test_no_validation_or_test_item_in_training(tmp_path):
    root = make_dataset(tmp_path / "d", n_users=20, unique_items=True)
    args = train_args(root, prompt_nums=[0] * 6)  # every template of every example
    train, _ = data.load_datasets(args)
    files = train.datasets[0].files
    checked = 0
    for ds in train.datasets:
        if ds.task in ("item2index", "index2item"):
            continue  # item text only, no user
        for idx in range(len(ds)):
            ex_idx, _, _ = ds.template_of(idx)
            user = ds.examples[ex_idx]["user"]
            seq = files.inters[user]
            text = "".join(ds[idx].values())
            for held_out in seq[-2:]:
                assert files.index_str(held_out) not in text, (ds.task, user)
                assert f'"{files.items[str(held_out)]["title"]}"' not in text, (ds.task, user)
            checked += 1
    assert checked > 500
    # a user file whose train intention is about another position is refused
    path = dataset_file(root, "Tiny", ".user.json")
    user = json.loads(path.read_text())
    user["user_vague_intention"]["train"]["3"]["item"] = files.inters["3"][-1]
    path.write_text(json.dumps(user))
    data._load_user_file.cache_clear()
    with pytest.raises(DataError, match=r"user_vague_intention\['train'\]\['3'\]: expected item items\[-3\]"):
        data.load_datasets(train_args(root, tasks=["itemsearch"]))


def test_test_dataset_sampling(tiny_data):
    args = parse_args("test", ["--data_path", str(tiny_data[0]), "--dataset", "Tiny", "--sample_num", "6"])
    users = [[x["user"] for x in data.load_test_dataset(args, task, pid)]
             for task in ("seqrec", "fusionseqrec") for pid in data.test_prompt_ids(task)[:3]]
    assert len(users[0]) == 6 and all(u == users[0] for u in users)
    with pytest.raises(DataError, match="not an item-output template"):
        data.load_test_dataset(args, "fusionseqrec", 0)


def test_bad_dataset_files(tmp_path):
    root = make_dataset(tmp_path / "d")
    index_path = dataset_file(root, "Tiny", ".index.json")
    indices = json.loads(index_path.read_text())
    del indices["5"]
    index_path.write_text(json.dumps(indices))
    data._load_files.cache_clear()
    with pytest.raises(DataError, match=r"Tiny\.index\.json.*no index"):
        data.load_datasets(train_args(root, tasks=["seqrec"]))

    for bad, message in (({**indices, "5": ["<a_0>", "<b_0>"]}, "length 2"),
                         ({**indices, "5": indices["6"]}, "share the index")):
        index_path.write_text(json.dumps(bad))
        data._load_files.cache_clear()
        with pytest.raises(DataError, match=message):
            data.load_datasets(train_args(root, tasks=["seqrec"]))

    root = make_dataset(tmp_path / "e")
    inter_path = dataset_file(root, "Tiny", ".inter.json")
    inters = json.loads(inter_path.read_text())
    inters["2"] = inters["2"][:2]
    inter_path.write_text(json.dumps(inters))
    with pytest.raises(DataError, match=r"user '2' has 2 interactions"):
        data.load_datasets(train_args(root, tasks=["seqrec"]))


# ------------------------------------------------------------------ collators


@pytest.fixture(scope="module")
def tokenizer_with_indices(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("tok"))
    tok = train_tokenizer()
    tok.add_tokens(index_tokens(json.loads(dataset_file(root, "Tiny", ".index.json").read_text())))
    assert tok.pad_token_id == tok.eos_token_id  # the case that breaks id-based padding detection
    return tok, root


def test_train_collator_labels(tokenizer_with_indices):
    tok, root = tokenizer_with_indices
    ds = data.SeqRecDataset(train_args(root), "train", prompt_sample_num=1)
    batch = [ds[0], ds[5], ds[9]]
    out = collator.TrainCollator(tok, only_train_response=True, model_max_length=2048)(batch)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    assert ids.shape == mask.shape == labels.shape
    for row, item in enumerate(batch):
        n_prompt = len(tok(item["prompt"])["input_ids"])
        response = tok(item["response"], add_special_tokens=False)["input_ids"]
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert n == n_prompt + len(response) + 1
        assert (labels[row, :n_prompt] == -100).all() and (labels[row, n:] == -100).all()
        assert labels[row, n_prompt:n].tolist() == response + [tok.eos_token_id]  # EOS stays a label
        assert len(response) == 3  # each index token is one id
    assert (ids[mask == 0] == tok.pad_token_id).all()

    full = collator.TrainCollator(tok, only_train_response=False)(batch)
    assert torch.equal(full["labels"][full["attention_mask"] == 1], full["input_ids"][full["attention_mask"] == 1])
    assert (full["labels"][full["attention_mask"] == 0] == -100).all()

    # too long: the oldest prompt tokens go, the response and its EOS stay
    short = collator.TrainCollator(tok, only_train_response=True, model_max_length=12)([batch[0]])
    assert short["input_ids"].shape[1] == 12 and short["labels"][0, -1] == tok.eos_token_id
    # a response longer than the limit is cut before its EOS, which always ends the sequence
    tiny = collator.TrainCollator(tok, only_train_response=True, model_max_length=2)([batch[0]])
    assert tiny["input_ids"].shape[1] == 2 and tiny["input_ids"][0, -1] == tok.eos_token_id
    assert tiny["labels"][0].tolist() == tok(batch[0]["response"], add_special_tokens=False)["input_ids"][:1] + [tok.eos_token_id]


def test_test_collator_matches_training_prompt(tokenizer_with_indices):
    tok, root = tokenizer_with_indices
    args = parse_args("test", ["--data_path", str(root), "--dataset", "Tiny"])
    test = data.load_test_dataset(args, "seqrec", 4)
    batch = [test[0], test[1], test[2]]
    enc, targets = collator.TestCollator(tok)(batch)
    assert targets == [b["target"] for b in batch]
    train_collate = collator.TrainCollator(tok, only_train_response=True)
    for row, item in enumerate(batch):
        mask = enc["attention_mask"][row]
        n = int(mask.sum())
        assert mask[-n:].all() and not mask[:-n].any()  # left padding
        ids, in_loss = train_collate.encode(item["prompt"], item["target"])
        n_prompt = in_loss.index(True)  # the response starts at the first label
        assert enc["input_ids"][row, -n:].tolist() == ids[:n_prompt]


# ------------------------------------------------------------------ task arguments, titles, draws


def test_empty_tasks_and_negative_sample_numbers_are_refused(tiny_data):
    args = train_args(*tiny_data)
    for field, value, flag in (("tasks", "", "--tasks"),
                               ("train_prompt_sample_num", "1,1,-1,1,1,1", "--train_prompt_sample_num"),
                               ("train_data_sample_num", "0,0,0,-5,0,0", "--train_data_sample_num"),
                               ("valid_prompt_sample_num", -2, "--valid_prompt_sample_num")):
        bad = train_args(*tiny_data)
        setattr(bad, field, value)
        if field == "tasks":  # all three lists empty: equal lengths, so only the emptiness check can catch it
            bad.train_prompt_sample_num = bad.train_data_sample_num = ""
        with pytest.raises(DataError, match=flag):
            data.load_datasets(bad)
    # the datasets themselves refuse negative counts instead of reading them as "all"
    for kwargs in ({"prompt_sample_num": -1}, {"sample_num": -3}):
        with pytest.raises(DataError, match="negative"):
            data.SeqRecDataset(args, "train", **kwargs)


def _blank_titles(root, items_to_blank):
    path = dataset_file(root, "Tiny", ".item.json")
    items = json.loads(path.read_text())
    for n, item in enumerate(items_to_blank):
        items[str(item)]["title"] = "" if n % 2 else "   "
    path.write_text(json.dumps(items))
    data._load_files.cache_clear()


def test_title_history_leaves_out_items_without_title(tmp_path):
    root = make_dataset(tmp_path / "d", unique_items=True)
    inters = json.loads(dataset_file(root, "Tiny", ".inter.json").read_text())
    seq = inters["0"]
    untitled = seq[:2]  # two of user 0's training items lose their title
    _blank_titles(root, untitled)
    args = train_args(root, "Tiny", "--add_prefix")
    ds = data.FusionSeqRecDataset(args, "train", prompt_sample_num=0)
    history = seq[:-2]
    text = ds.format_history(history, by="title")
    titled = [i for i in history if i not in untitled]
    assert '""' not in text and text.count('"') == 2 * len(titled)
    assert text == ", ".join(f'{k}. "{ds.files.items[str(i)]["title"]}"' for k, i in enumerate(titled, 1))
    # index histories keep every item
    assert ds.format_history(history, by="index").count("<a_") == len(history)
    # an example whose whole window is untitled never gets a title-history template in training
    title_ids = {i for i, t in enumerate(prompt.TEMPLATES["fusionseqrec"])
                 if "title_history" in prompt.template_fields(t)}
    assert title_ids == {8, 9, 10, 11}
    first = next(j for j, ex in enumerate(ds.examples) if ex["user"] == "0" and ex["history"] == seq[:1])
    assert not set(ds.choices[first]) & title_ids
    assert all('""' not in ds[i]["prompt"] for i in range(len(ds)))
    # test prompts render no empty quotes either
    test_args = parse_args("test", ["--data_path", str(root), "--dataset", "Tiny"])
    assert all('""' not in x["prompt"] for x in data.load_test_dataset(test_args, "fusionseqrec", 8))


def test_preferenceobtain_one_example_per_user_sentence_drawn_per_epoch(tiny_data):
    args = train_args(*tiny_data, tasks=["preferenceobtain"])
    prefs = json.loads(dataset_file(*tiny_data, ".user.json").read_text())["user_explicit_preference"]
    ds = data.PreferenceObtainDataset(args, "train", prompt_sample_num=1)
    assert len(ds) == len(prefs) == 15
    assert sorted(ex["user"] for ex in ds.examples) == sorted(prefs)
    seen: dict[str, set[str]] = {u: set() for u in prefs}
    for epoch in range(8):
        ds.set_epoch(epoch)
        responses = [ds[i]["response"] for i in range(len(ds))]
        assert responses == [ds[i]["response"] for i in range(len(ds))]  # same epoch, same draw
        for ex, response in zip(ds.examples, responses):
            assert response in prefs[ex["user"]]
            seen[ex["user"]].add(response)
    # over the epochs, the draws reach both sentences of (nearly) every user
    assert sum(len(s) == 2 for s in seen.values()) >= 12


def test_itemsearch_template_structure():
    fields = [prompt.template_fields(t) for t in prompt.TEMPLATES["itemsearch"]]
    intentions = {"user_related_intention", "item_related_intention", "query"}
    assert fields[0] >= {"history", "explicit_preference"} and not fields[0] & intentions
    assert "user_related_intention" in fields[1] and not fields[1] & (intentions - {"user_related_intention"})
    assert "item_related_intention" in fields[2] and not fields[2] & (intentions - {"item_related_intention"})
    for f in fields[3:]:
        assert "query" in f and not f & {"user_related_intention", "item_related_intention"}
    query_alone = [i for i, f in enumerate(fields) if f == {"query", "item"}]
    assert len(query_alone) == 5 and min(query_alone) >= 3
    assert prompt.item_output_ids("itemsearch") == list(range(11)) == data.test_prompt_ids("itemsearch")


def _which_intention(text, querys):
    hits = [k for k, q in enumerate(querys) if data._sentence(q) in text]
    assert len(hits) == 1, (text, querys)
    return hits[0]


def test_itemsearch_query_drawn_from_both_intentions(tiny_data):
    intents = json.loads(dataset_file(*tiny_data, ".user.json").read_text())["user_vague_intention"]
    args = train_args(*tiny_data, tasks=["itemsearch"])
    ds = data.ItemSearchDataset(args, "train", prompt_id=6)  # the query alone
    drawn: dict[str, set[int]] = {ex["user"]: set() for ex in ds.examples}
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i, ex in enumerate(ds.examples):
            drawn[ex["user"]].add(_which_intention(ds[i]["prompt"], intents["train"][ex["user"]]["querys"]))
    assert sum(s == {0, 1} for s in drawn.values()) >= 12
    # templates 1 and 2 always name their own intention
    for tid, k in ((1, 0), (2, 1)):
        fixed = data.ItemSearchDataset(args, "train", prompt_id=tid)
        for epoch in range(3):
            fixed.set_epoch(epoch)
            assert all(_which_intention(fixed[i]["prompt"], intents["train"][ex["user"]]["querys"]) == k
                       for i, ex in enumerate(fixed.examples))


def test_itemsearch_test_draws_are_seeded(tiny_data):
    intents = json.loads(dataset_file(*tiny_data, ".user.json").read_text())["user_vague_intention"]["test"]
    prefs = json.loads(dataset_file(*tiny_data, ".user.json").read_text())["user_explicit_preference"]

    def render(seed, pid):
        args = parse_args("test", ["--data_path", str(tiny_data[0]), "--dataset", "Tiny", "--seed", str(seed)])
        return list(data.load_test_dataset(args, "itemsearch", pid))

    first = render(42, 5)
    assert render(42, 5) == first  # reproducible
    picked = [_which_intention(x["prompt"], intents[x["user"]]["querys"]) for x in first]
    assert set(picked) == {0, 1}  # the query is drawn per access, from both intentions
    assert all(any(p in x["prompt"] for p in prefs[x["user"]]) for x in first)
    assert render(7, 5) != first  # another seed, other draws
    assert [x["target"] for x in render(7, 5)] == [x["target"] for x in first]


def test_test_task_is_case_insensitive(tiny_data):
    assert data.test_prompt_ids("FusionSeqRec") == [8, 9, 10, 11]
    assert data.normalize_test_task(" ItemSearch ") == "itemsearch"
    args = parse_args("test", ["--data_path", str(tiny_data[0]), "--dataset", "Tiny"])
    assert list(data.load_test_dataset(args, "SEQREC", 3)) == list(data.load_test_dataset(args, "seqrec", 3))
    with pytest.raises(DataError, match="--test_task"):
        data.load_test_dataset(args, "Item2Index", 0)


def test_history_loss_labels_the_history_index_tokens(tiny_data, tiny_base_model):
    """--history_loss: the index tokens of the history are labels as well as the response; both
    padding sides give the same labels."""
    from modeling import load_tokenizer
    from dataset_files import index_tokens, load_indices

    data_path, _ = tiny_data
    indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
    tok = load_tokenizer(tiny_base_model)
    tok.add_tokens(index_tokens(indices))
    index_ids = set(tok.convert_tokens_to_ids(index_tokens(indices)))
    args = parse_args("train", ["--data_path", str(data_path), "--dataset", "Tiny", "--tasks", "seqrec",
                                "--train_prompt_sample_num", "1", "--train_data_sample_num", "0"])
    ds = data.SeqRecDataset(args, "train", prompt_id=0)
    batch = [ds[i] for i in (5, 12)]
    plain = collator.TrainCollator(tok, True, 2048)(batch)
    dense = collator.TrainCollator(tok, True, 2048, history_token_ids=index_ids)(batch)
    fast = collator.TrainCollator(tok, True, 2048, response_logits_only=True, history_token_ids=index_ids)(batch)
    for row in range(2):
        labels = dense["labels"][row][dense["attention_mask"][row] == 1]
        ids = dense["input_ids"][row][dense["attention_mask"][row] == 1]
        assert (labels != -100).sum() > (plain["labels"][row] != -100).sum()  # more labels than the response
        assert all((int(lab) == int(i)) == (int(i) in index_ids or int(lab) != -100) for i, lab in zip(ids, labels))
        kept = fast["labels"][row][fast["labels"][row] != -100].tolist()
        assert kept == labels[labels != -100].tolist()  # response-only logits keep every label
