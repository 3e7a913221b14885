"""--prompt_templates: the file's checks, and convert/original_prompts.py on a synthetic prompt.py of the
original repository's shape, whose templates test.py then uses."""
import json
import logging

import pytest

import collator
import data
import original_prompts
import prompt
from arguments import parse_args
from checkpoint_record import RECORD_KEY, training_record
from dataset_files import load_indices
from evaluation import evaluate_checkpoint
from fixtures import make_dataset, make_tiny_model, train_tokenizer
from modeling import add_index_tokens
from utils import DataError

# The original's layout (a module-level wrapper whose response follows the header with no newline,
# per-task lists filled one dict at a time, all_prompt[task] = list, commented-out templates), in
# this test's own words. Code that the converter must never run sits at the top.
SYNTHETIC_PROMPT_PY = r'''
import os
raise SystemExit("this file was executed")

sft_prompt = "A synthetic preamble for the test." \
             "\n\n### Instruction:\n{instruction}\n\n### Response:{response}"

all_prompt = {}

seqrec_prompt = []

#####——0
prompt = {}
prompt["instruction"] = "History {inters}; next one?"
prompt["response"] = "{item}"
seqrec_prompt.append(prompt)

# prompt = {}
# prompt["instruction"] = "A template left out: {inters}"
# prompt["response"] = "{item}"
# seqrec_prompt.append(prompt)

#####——1
prompt = {}
prompt["instruction"] = "Second wording with items {inters}, literal {{braces}}."
prompt["response"] = "{item}"
seqrec_prompt.append(prompt)

all_prompt["seqrec"] = seqrec_prompt

item2index_prompt = []
prompt = {}
prompt["instruction"] = "Which item is \"{title}\"?"
prompt["response"] = "{item}"
item2index_prompt.append(prompt)
all_prompt["item2index"] = item2index_prompt

fusionseqrec_prompt = []
prompt = {}
prompt["instruction"] = "Titles {inter_titles}: what next?"
prompt["response"] = "{item}"
fusionseqrec_prompt.append(prompt)
prompt = {}
prompt["instruction"] = "Items {inters}: describe the next."
prompt["response"] = "{description}"
fusionseqrec_prompt.append(prompt)
all_prompt["fusionseqrec"] = fusionseqrec_prompt
'''


@pytest.fixture
def converted(tmp_path):
    src = tmp_path / "prompt.py"
    src.write_text(SYNTHETIC_PROMPT_PY, encoding="utf-8")
    out = tmp_path / "templates" / "original.json"
    original_prompts.main([str(src), "--output", str(out)])
    return out


def test_converter_reads_the_original_shape_without_running_it(converted):
    obj = json.loads(converted.read_text())
    assert obj["wrapper"].endswith("### Response:{response}") and obj["wrapper"].startswith("A synthetic preamble")
    seqrec = obj["templates"]["seqrec"]
    assert [t["instruction"] for t in seqrec] == ["History {history}; next one?",
                                                  "Second wording with items {history}, literal {{braces}}."]
    assert obj["templates"]["fusionseqrec"][0]["instruction"] == "Titles {title_history}: what next?"
    prompts = prompt.load_prompt_set(str(converted))
    assert prompts.item_output_ids("fusionseqrec") == [0] and prompts.sha256 != prompt.BUILTIN.sha256


def save_checkpoint(tmp_path):
    """(data_path, tokenizer) of 6 users / 24 items and a tiny checkpoint in tmp_path/ckpt that records
    this repository's templates."""
    data_path = make_dataset(tmp_path / "data", n_users=6, n_items=24)
    indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
    tok = train_tokenizer()
    add_index_tokens(tok, indices)
    model = make_tiny_model(len(tok), seed=1)
    train_args = parse_args("train", ["--data_path", str(data_path), "--dataset", "Tiny"])
    setattr(model.config, RECORD_KEY, training_record(train_args, indices, prompt.BUILTIN))  # trained with ours
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    return data_path, tok


def test_test_py_uses_the_converted_templates(converted, tmp_path, monkeypatch, caplog):
    """The prompts the model is given: the file's wrapper, its instruction, the history as this
    repository formats it, and nothing (no newline) after the response header."""
    data_path, tok = save_checkpoint(tmp_path)
    seen = []
    encode = collator.TestCollator.encode
    monkeypatch.setattr(collator.TestCollator, "encode", lambda self, text: (seen.append(text), encode(self, text))[1])
    argv = ["--ckpt_path", str(tmp_path / "ckpt"), "--dataset", "Tiny", "--data_path", str(data_path),
            "--results_file", str(tmp_path / "r.json"), "--num_beams", "5", "--metrics", "hit@5",
            "--test_prompt_ids", "all", "--prompt_templates", str(converted)]
    with caplog.at_level(logging.WARNING, logger="lcrec.eval"):
        results = evaluate_checkpoint(parse_args("test", argv))
    notes = [r.message for r in caplog.records if r.message.startswith("prompt templates:")]
    assert len(notes) == 1 and "trained with built-in" in notes[0] and str(converted) in notes[0]
    assert results["prompt_ids"] == [0, 1] and results["prompt_templates_sha256"] == prompt.load_prompt_set(
        str(converted)).sha256
    assert len(seen) == 2 * 6
    test_set = data.load_test_dataset(parse_args("test", argv), "seqrec", 0)
    history = test_set.fields(test_set.examples[0], None)["history"]
    assert seen[0] == ("A synthetic preamble for the test.\n\n### Instruction:\n"
                       f"History {history}; next one?\n\n### Response:")
    assert all(p.endswith("### Response:") for p in seen)
    assert seen[6].endswith(", literal {braces}.\n\n### Response:")
    # the model sees the header's last token right before the index, as the original trained it
    ids = collator.encode_prompt(tok, seen[0])
    assert tok.decode(ids[-2:]).endswith("Response:")


def test_recommend_uses_the_converted_templates(converted, tmp_path):
    from recommender import Recommender, RequestError

    data_path, _ = save_checkpoint(tmp_path)
    args = parse_args("recommend", ["--ckpt_path", str(tmp_path / "ckpt"), "--dataset", "Tiny", "--data_path",
                                    str(data_path), "--num_beams", "5", "--prompt_templates", str(converted)])
    rec = Recommender(args)
    text = rec.build_prompt(["1", "2"], None)
    assert text.startswith("A synthetic preamble") and text.endswith("next one?\n\n### Response:")
    assert len(rec.answer(user="1", k=3)["items"]) == 3
    with pytest.raises(RequestError, match="no itemsearch template"):  # the file has no itemsearch task
        rec.answer(query="something to watch", k=3)


def test_training_prompts_use_the_file(converted, tmp_path):
    data_path = make_dataset(tmp_path / "data", n_users=6, n_items=24)
    args = parse_args("train", ["--data_path", str(data_path), "--dataset", "Tiny", "--tasks", "seqrec,fusionseqrec",
                                "--train_prompt_sample_num", "1,0", "--train_data_sample_num", "0,0",
                                "--prompt_templates", str(converted)])
    train, _ = data.load_datasets(args)
    item = train.datasets[0][0]
    assert item["prompt"].startswith("A synthetic preamble") and item["prompt"].endswith("### Response:")
    responses = {train.datasets[1][i]["response"] for i in range(2)}  # fusionseqrec: both templates
    assert len(responses) == 2
    with pytest.raises(DataError, match=r"original\.json: templates: no templates for task 'itemsearch'"):
        data.load_datasets(parse_args("train", ["--data_path", str(data_path), "--dataset", "Tiny", "--tasks",
                                                "itemsearch", "--train_prompt_sample_num", "1",
                                                "--train_data_sample_num", "0", "--prompt_templates", str(converted)]))


BAD_FILES = [
    ("[1, 2]", "(top level)"),
    ('{"wrapper": "{instruction} {response}", "templates": {"seqrec": [{"instruction": "{history}", '
     '"response": "{item}"}]}, "extra": 1}', "extra: unknown key"),
    ('{"wrapper": "{instruction}", "templates": {}}', "wrapper: expected the placeholders"),
    ('{"wrapper": "{response} {instruction}", "templates": {}}', "wrapper: must end with {response}"),
    ('{"wrapper": "{instruction} {response}", "templates": {"seqrecc": [{"instruction": "{history}", '
     '"response": "{item}"}]}}', "templates.seqrecc: unknown task"),
    ('{"wrapper": "{instruction} {response}", "templates": {"seqrec": [{"instruction": "{inters}", '
     '"response": "{item}"}]}}', r"templates.seqrec\[0\].instruction: unknown placeholder \{inters\}"),
    ('{"wrapper": "{instruction} {response}", "templates": {"seqrec": [{"instruction": "{history", '
     '"response": "{item}"}]}}', r"templates.seqrec\[0\].instruction: not a format string"),
    ('{"wrapper": "{instruction} {response}", "templates": {"seqrec": [{"instruction": "{history}", '
     '"response": "It is {item}"}]}}', r"templates.seqrec\[0\].response: an answer with the item must be exactly"),
    ('{"wrapper": "{instruction} {response}", "templates": {"seqrec": [{"instruction": "{history} {item}", '
     '"response": "{item}"}]}}', r"templates.seqrec\[0\].instruction: shows \{item\}"),
    ('{"wrapper": "{instruction} {response}", "templates": {"fusionseqrec": [{"instruction": "{history}", '
     '"response": "{title}"}]}}', "templates.fusionseqrec: no template answers with {item}"),
    ('{"wrapper": "{instruction} {response}", "templates": {"seqrec": [{"instruction": "{history}"}]}}',
     r"templates.seqrec\[0\]: expected"),
    ("{not json", "not a JSON file"),
]


@pytest.mark.parametrize("text, match", BAD_FILES)
def test_bad_template_files_fail_with_one_line_naming_file_and_field(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        prompt.load_prompt_set(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_converter_refuses_a_file_without_the_original_names(tmp_path):
    src = tmp_path / "prompt.py"
    src.write_text('templates = {"seqrec": []}\n')
    with pytest.raises(DataError, match="no string sft_prompt"):
        original_prompts.convert(src)
    src.write_text("def broken(:\n")
    with pytest.raises(DataError, match="not a Python file"):
        original_prompts.convert(src)


def test_builtin_templates_pass_the_file_checks(tmp_path):
    path = tmp_path / "builtin.json"
    path.write_text(json.dumps(prompt.to_json(prompt.BUILTIN)))
    assert prompt.load_prompt_set(str(path)).sha256 == prompt.BUILTIN.sha256
