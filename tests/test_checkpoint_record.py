"""A fine-tuned checkpoint records what it was trained on; the evaluation scripts and a resume check it."""
import json
import logging
import shutil
import sys

import pytest

import finetune
import prompt
import recommend
import test_ddp
from arguments import parse_args
from checkpoint_record import RECORD_KEY, index_sha256
from dataset_files import load_indices
from evaluation import evaluate_checkpoint
from fixtures import make_dataset
from utils import DataError

N_STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_model):
    """(data_path, output_dir) of a 2-step run with --max_his_len 3 and a checkpoint at step 1, and a
    copy of the index file whose codes are permuted among the items (same tokens, other items)."""
    root = tmp_path_factory.mktemp("record")
    data_path = make_dataset(root / "data", n_users=8, n_items=24)
    out = root / "out"
    finetune.main(train_argv(tiny_base_model, data_path, out, "--save_and_eval_strategy", "steps",
                             "--save_and_eval_steps", "1", "--max_steps", str(N_STEPS)))
    indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
    items = list(indices)
    permuted = {item: indices[items[(k + 1) % len(items)]] for k, item in enumerate(items)}
    (data_path / "Tiny" / "Tiny.perm.index.json").write_text(json.dumps(permuted))
    return data_path, out


def train_argv(base, data_path, out, *extra):
    return ["--base_model", str(base), "--data_path", str(data_path), "--dataset", "Tiny", "--output_dir", str(out),
            "--per_device_batch_size", "2", "--gradient_accumulation_steps", "1", "--only_train_response",
            "--tasks", "seqrec,item2index", "--train_prompt_sample_num", "1,1", "--train_data_sample_num", "6,6",
            "--max_his_len", "3", "--logging_step", "1", *extra]


def eval_argv(ckpt, data_path, results, *extra):
    return ["--ckpt_path", str(ckpt), "--dataset", "Tiny", "--data_path", str(data_path), "--results_file",
            str(results), "--num_beams", "5", "--sample_num", "3", "--metrics", "hit@5", *extra]


def test_finetune_records_index_prompt_settings_tasks_and_templates(trained):
    data_path, out = trained
    for folder in (out, out / "checkpoint-1"):
        record = json.loads((folder / "config.json").read_text())[RECORD_KEY]
        indices = load_indices(data_path / "Tiny" / "Tiny.index.json")
        assert record["index_sha256"] == index_sha256(indices) and record["num_items"] == len(indices) == 24
        assert (record["max_his_len"], record["his_sep"], record["add_prefix"]) == (3, ", ", False)
        assert record["tasks"] == ["seqrec", "item2index"] and record["train_data_sample_num"] == [6, 6]
        assert record["prompt_templates_sha256"] == prompt.BUILTIN.sha256
    perm = load_indices(data_path / "Tiny" / "Tiny.perm.index.json")
    assert index_sha256(perm) != record["index_sha256"]


def test_permuted_index_is_refused_by_test_py(trained, tmp_path, caplog):
    data_path, out = trained
    res = tmp_path / "r.json"
    with pytest.raises(DataError, match=r"Tiny\.perm\.index\.json.*Tiny\.index\.json.*--allow_index_mismatch"):
        evaluate_checkpoint(parse_args("test", eval_argv(out, data_path, res, "--index_file", ".perm.index.json")))
    assert not res.exists()
    with caplog.at_level("WARNING"):
        results = evaluate_checkpoint(parse_args("test", eval_argv(out, data_path, res, "--index_file",
                                                                   ".perm.index.json", "--allow_index_mismatch")))
    assert results["num_examples"] == 3 and res.is_file()
    # the deliberate case still says which two indices differ
    assert any("--allow_index_mismatch" in r.message and "Tiny.perm.index.json" in r.message for r in caplog.records)


def test_permuted_index_is_refused_by_test_ddp(trained, tmp_path, monkeypatch, capsys):
    data_path, out = trained
    res = tmp_path / "r.json"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = eval_argv(out, data_path, res, "--index_file", ".perm.index.json")
    monkeypatch.setattr(sys, "argv", ["test_ddp.py", *argv])
    with pytest.raises(SystemExit) as e:
        test_ddp.main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Tiny.perm.index.json" in err[0] and "was trained with" in err[0]
    assert not res.exists()


def test_permuted_index_is_refused_by_recommend(trained, tmp_path, capsys):
    data_path, out = trained
    argv = ["--ckpt_path", str(out), "--dataset", "Tiny", "--data_path", str(data_path), "--user", "1",
            "--num_beams", "5", "--k", "3", "--json"]
    with pytest.raises(DataError, match=r"Tiny\.perm\.index\.json.*Tiny\.index\.json"):
        recommend.main(argv + ["--index_file", ".perm.index.json"])
    capsys.readouterr()
    recommend.main(argv + ["--index_file", ".perm.index.json", "--allow_index_mismatch"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "--allow_index_mismatch" in line]
    assert len(notes) == 1 and "Tiny.perm.index.json" in notes[0] and "Tiny.index.json" in notes[0]


def test_permuted_index_is_refused_when_resuming_with_the_learning_curve(trained, tiny_base_model, tmp_path):
    data_path, out = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoint-1", run / "checkpoint-1")
    with pytest.raises(DataError, match=r"the index file: .* in the checkpoint, .* now.*--force_resume"):
        finetune.main(train_argv(tiny_base_model, data_path, run, "--resume_from_checkpoint", "true",
                                 "--index_file", ".perm.index.json", "--curve_steps", "1", "--curve_users", "3",
                                 "--max_steps", str(N_STEPS), "--save_and_eval_strategy", "no"))
    assert not (run / "learning_curve.json").exists() and not (run / "config.json").exists()


def test_prompt_settings_come_from_the_checkpoint_and_a_flag_wins_with_a_note(trained, tmp_path, caplog):
    data_path, out = trained
    with caplog.at_level(logging.WARNING, logger="lcrec.eval"):
        res = evaluate_checkpoint(parse_args("test", eval_argv(out, data_path, tmp_path / "a.json")))
    assert res["max_his_len"] == 3 and not [r for r in caplog.records if "given by hand" in r.message]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcrec.eval"):
        res = evaluate_checkpoint(parse_args("test", eval_argv(out, data_path, tmp_path / "b.json",
                                                               "--max_his_len", "5")))
    assert res["max_his_len"] == 5
    notes = [r.message for r in caplog.records if "given by hand" in r.message]
    assert len(notes) == 1 and "--max_his_len 5" in notes[0] and "trained with 3" in notes[0]


def test_checkpoint_without_a_record_loads_with_a_note(trained, tmp_path, caplog):
    data_path, out = trained
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((old / "config.json").read_text())
    del config[RECORD_KEY]
    (old / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="lcrec.eval"):
        res = evaluate_checkpoint(parse_args("test", eval_argv(old, data_path, tmp_path / "r.json",
                                                               "--index_file", ".perm.index.json")))
    assert res["max_his_len"] == 20  # nothing recorded: the training default
    assert any("records nothing of its training" in r.message and "could not be checked" in r.message
               for r in caplog.records)


def test_resume_with_other_tasks_is_refused_and_force_resume_accepted(trained, tiny_base_model, tmp_path, capsys):
    data_path, out = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoint-1", run / "checkpoint-1")
    other = ["--tasks", "seqrec,index2item", "--max_his_len", "4", "--max_steps", str(N_STEPS),
             "--save_and_eval_strategy", "no", "--resume_from_checkpoint", "true"]
    argv = train_argv(tiny_base_model, data_path, run) + other
    with pytest.raises(DataError) as e:
        finetune.main(argv)
    message = str(e.value)
    assert "--tasks: seqrec,item2index in the checkpoint, seqrec,index2item now" in message
    assert "--max_his_len: 3 in the checkpoint, 4 now" in message and "--force_resume" in message
    assert not (run / "config.json").exists()

    finetune.main(argv + ["--force_resume"])
    assert "--force_resume" in capsys.readouterr().out
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == N_STEPS and finetune.final_model_complete(run)
