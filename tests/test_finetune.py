"""finetune.py and lora_finetune.py on a tiny model: the three CPU modes, reloading, LoRA, memorisation
and the command-line errors."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import collator
import data
import finetune
import lora_finetune
from modeling import check_index_tokens, load_for_inference, load_tokenizer
from utils import DataError, dataset_file, parse_args

ROOT = Path(__file__).resolve().parents[1]


def cli(base, data_path, out, *extra):
    return ["--base_model", str(base), "--data_path", str(data_path), "--dataset", "Tiny", "--output_dir", str(out),
            "--max_steps", "2", "--per_device_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--only_train_response", "--logging_step", "1", *extra]


def indices_of(data_path):
    return json.loads(dataset_file(data_path, "Tiny", ".index.json").read_text())


def assert_reloads(out, data_path, base):
    """The saved folder has the tokenizer with every index token as one id and matching embeddings."""
    indices = indices_of(data_path)
    model, tok = load_for_inference(str(out), indices)  # raises if a token is split or rows are missing
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > len(load_tokenizer(base))
    ids = tok("".join(indices["3"]), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == indices["3"]
    return model


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(script, argv, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", free_port(),
           str(ROOT / script), *argv]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_single_process_eval_save_and_best(tiny_data, tiny_base_model, tmp_path):
    data_path, _ = tiny_data
    out = tmp_path / "out"
    finetune.main(cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "steps",
                      "--save_and_eval_steps", "1"))
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    state = json.loads((out / "trainer_state.json").read_text())
    assert sum("eval_loss" in h for h in state["log_history"]) == 2 and state["best_model_checkpoint"]
    model = assert_reloads(out, data_path, tiny_base_model)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied

    # resuming from the first checkpoint restores its state (marked here) and runs only step 2
    ckpt_state = out / "checkpoint-1" / "trainer_state.json"
    marked = json.loads(ckpt_state.read_text())
    marked["log_history"][0]["loss"] = 123.0
    ckpt_state.write_text(json.dumps(marked))
    resumed = tmp_path / "resumed"
    finetune.main(cli(tiny_base_model, data_path, resumed, "--save_and_eval_strategy", "no",
                      "--resume_from_checkpoint", str(out / "checkpoint-1")))
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2] and history[0]["loss"] == 123.0


def test_torchrun_ddp_gloo(tiny_data, tiny_base_model, tmp_path):
    data_path, _ = tiny_data
    out = tmp_path / "ddp"
    proc = torchrun("finetune.py", cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no"), tmp_path)
    assert "saved model and tokenizer" in proc.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert_reloads(out, data_path, tiny_base_model)


def test_torchrun_deepspeed_zero3_bf16(tiny_data, tiny_base_model, tmp_path):
    data_path, _ = tiny_data
    out = tmp_path / "z3"
    torchrun("finetune.py", cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no", "--deepspeed",
                                str(ROOT / "config/ds_z3_bf16.json"), "--bf16"), tmp_path)
    assert not list(out.glob("global_step*"))  # consolidated into a plain HF folder
    model = assert_reloads(out, data_path, tiny_base_model)
    # the consolidated weights are trained ones, not the base model's
    base_weights = load_file(str(Path(tiny_base_model) / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(model.state_dict()[key].float(), base_weights[key].float())


def eval_loss(model, tokenizer, dataset, batch_size):
    """Sample-weighted mean of batch losses, as the Trainer's evaluation loop computes it."""
    collate = collator.TrainCollator(tokenizer, only_train_response=True)
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            total += model(**collate(batch)).loss.item() * len(batch)
            n += len(batch)
    return total / n


def test_lora_trains_and_adapter_reloads(tiny_data, tiny_base_model, tmp_path):
    data_path, _ = tiny_data
    out = tmp_path / "lora"
    argv = cli(tiny_base_model, data_path, out, "--max_steps", "3", "--learning_rate", "1e-2",
               "--save_and_eval_strategy", "steps", "--save_and_eval_steps", "3")
    lora_finetune.main(argv)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert any("embed_tokens" in k for k in adapter)  # the resized embeddings travel with the adapter
    state = json.loads((out / "trainer_state.json").read_text())
    trained_loss = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h][-1]

    model, tok = load_for_inference(str(out), indices_of(data_path), lora=True, base_model=str(tiny_base_model))
    args = parse_args("train", argv)
    _, valid = data.load_datasets(args)
    assert eval_loss(model, tok, valid, 2) == pytest.approx(trained_loss, abs=1e-4)


def test_overfit_reproduces_responses(tiny_data, tiny_base_model, tmp_path):
    """Loss falls and greedy decoding gives back the 8 training responses (labels, EOS and padding right)."""
    data_path, _ = tiny_data
    argv = cli(tiny_base_model, data_path, tmp_path / "fit", "--max_steps", "100", "--learning_rate", "1e-2",
               "--per_device_batch_size", "8", "--warmup_ratio", "0", "--lr_scheduler_type", "constant",
               "--save_and_eval_strategy", "no", "--logging_step", "10")
    args = parse_args("train", argv)
    train = data.SeqRecDataset(args, "train", prompt_id=0, sample_num=8)
    assert len(train) == 8
    model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))
    trainer = finetune.build_trainer(args, finetune.training_arguments(args, disable_tqdm=True), model, tok,
                                     data.MultiTaskDataset([train]), None)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.05 and losses[0] > 1.0

    model.eval()
    batch = [{"prompt": x["prompt"], "target": x["response"]} for x in train]
    enc, targets = collator.TestCollator(tok)(batch)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = gen[:, enc["input_ids"].shape[1]:]
    for row, target in zip(new.tolist(), targets):
        expected = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row[: len(expected)] == expected  # the index, then EOS: the model learned to stop


def test_cli_errors(tiny_data, tiny_base_model, tmp_path, capsys):
    data_path, _ = tiny_data
    base = cli(tiny_base_model, data_path, tmp_path / "x")
    with pytest.raises(SystemExit) as e:
        finetune.main(base + ["--tasks", "seqrec,item2index", "--train_prompt_sample_num", "1",
                              "--train_data_sample_num", "0,0"])
    assert e.value.code == 2 and "one entry per task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        finetune.main(base + ["--tasks", "seqrec,itemsarch", "--train_prompt_sample_num", "1,1",
                              "--train_data_sample_num", "0,0"])
    assert e.value.code == 2 and "unknown task" in capsys.readouterr().err

    # a base folder without tokenizer files
    bare = tmp_path / "bare"
    shutil.copytree(tiny_base_model, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(DataError, match="no tokenizer files"):
        finetune.main(cli(bare, data_path, tmp_path / "y"))

    # a checkpoint whose tokenizer lacks the index tokens: they split into several ids
    indices = indices_of(data_path)
    with pytest.raises(DataError, match="do not encode to exactly one id"):
        check_index_tokens(load_tokenizer(tiny_base_model), indices)
    with pytest.raises(DataError, match="do not encode to exactly one id"):
        load_for_inference(str(tiny_base_model), indices)

    # a tokenizer with the tokens but a model whose vocabulary was never resized
    small = tmp_path / "small"
    shutil.copytree(tiny_base_model, small)
    tok = load_tokenizer(small)
    tok.add_tokens(sorted({t for v in indices.values() for t in v}))
    tok.save_pretrained(small)
    with pytest.raises(DataError, match="embedding rows"):
        load_for_inference(str(small), indices)
