"""finetune.py and lora_finetune.py on a tiny model: the three CPU modes, reloading, LoRA, memorisation
and the command-line errors."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import collator
import data
import finetune
import lora_finetune
from arguments import parse_args
from dataset_files import dataset_file
from modeling import index_token_ids, load_for_inference, load_tokenizer
from utils import DataError

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
    proc = torchrun("finetune.py", cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no",
                                       "--curve_steps", "1", "--curve_users", "4", "--curve_beams", "3"), tmp_path)
    assert "saved model and tokenizer" in proc.stdout
    curve = json.loads((out / "learning_curve.json").read_text())  # the main process scores, the other waits
    assert [p["step"] for p in curve["points"]] == [1, 2] and curve["points"][0]["examples"] == 4
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


def greedy_reproduces(model, tok, examples) -> bool:
    """Greedy decoding gives back every example's response followed by EOS."""
    was_training = model.training
    model.eval()
    batch = [{"prompt": x["prompt"], "target": x["response"]} for x in examples]
    enc, targets = collator.TestCollator(tok)(batch)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.train(was_training)
    new = gen[:, enc["input_ids"].shape[1]:].tolist()
    for row, target in zip(new, targets):
        expected = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if row[: len(expected)] != expected:
            return False
    return True


class StopWhenReproduced(TrainerCallback):
    """Checks every ``every`` steps whether greedy decoding reproduces the training responses."""

    def __init__(self, model, tok, examples, every: int = 10):
        self.model, self.tok, self.examples, self.every = model, tok, examples, every
        self.reproduced_at = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and greedy_reproduces(self.model, self.tok, self.examples):
            self.reproduced_at = state.global_step
            control.should_training_stop = True
        return control


def test_overfit_reproduces_responses(tiny_data, tiny_base_model, tmp_path):
    """Trained on 8 examples until greedy decoding gives back their responses (index, then EOS:
    labels, EOS and padding are right), within a generous step cap; the loss falls on the way."""
    data_path, _ = tiny_data
    cap = 600  # about 3x the steps this usually takes: the trajectory moves with CPU and thread count
    argv = cli(tiny_base_model, data_path, tmp_path / "fit", "--max_steps", str(cap), "--learning_rate", "1e-2",
               "--per_device_batch_size", "8", "--warmup_ratio", "0", "--lr_scheduler_type", "constant",
               "--save_and_eval_strategy", "no", "--logging_step", "10")
    args = parse_args("train", argv)
    train = data.SeqRecDataset(args, "train", prompt_id=0, sample_num=8)
    assert len(train) == 8
    model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))
    assert not greedy_reproduces(model, tok, train)  # an untrained model does not
    stop = StopWhenReproduced(model, tok, train)
    trainer = finetune.build_trainer(args, finetune.training_arguments(args, disable_tqdm=True), model, tok,
                                     data.MultiTaskDataset([train]), None)
    trainer.add_callback(stop)
    trainer.train()
    assert stop.reproduced_at is not None, f"responses not reproduced within {cap} steps"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.2 * losses[0]


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
    assert not (tmp_path / "y").exists()  # the refused run leaves no empty output folder behind
    (tmp_path / "kept").mkdir()  # a folder that was there before is kept
    with pytest.raises(DataError, match="no tokenizer files"):
        finetune.main(cli(bare, data_path, tmp_path / "kept"))
    assert (tmp_path / "kept").is_dir()

    # a checkpoint whose tokenizer lacks the index tokens: they split into several ids
    indices = indices_of(data_path)
    with pytest.raises(DataError, match="do not encode to exactly one id"):
        index_token_ids(load_tokenizer(tiny_base_model), indices)
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


# --------------------------------------------------------------------------- kills and resumes
KILLER = """
import os, signal, sys
import finetune, transformers
when, at_step = sys.argv[1], int(sys.argv[2])
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if when == "checkpoint":  # after the weights, before optimizer and trainer_state.json
    real = transformers.Trainer._save_optimizer_and_scheduler
    def save_opt(self, output_dir):
        if self.state.global_step == at_step:
            die()
        return real(self, output_dir)
    transformers.Trainer._save_optimizer_and_scheduler = save_opt
else:  # the final model written to its temporary folder, not yet published
    finetune.publish_folder = die
finetune.main(sys.argv[3:])
"""


def run_killed(when, at_step, argv, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", KILLER, when, str(at_step), *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]  # SIGKILL, not an error


def steps_logged(out):
    return [h["step"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_resume_skips_checkpoint_killed_during_save(tiny_data, tiny_base_model, tmp_path, capsys):
    data_path, _ = tiny_data
    out = tmp_path / "out"
    argv = cli(tiny_base_model, data_path, out, "--max_steps", "6", "--save_and_eval_strategy", "steps",
               "--save_and_eval_steps", "2")
    run_killed("checkpoint", 4, argv, tmp_path)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "trainer_state.json").exists()
    assert not finetune.final_model_complete(out)  # a killed run never looks finished

    finetune.main(argv + ["--resume_from_checkpoint", "true"])
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-4'}" in printed and f"from {out / 'checkpoint-2'}" in printed
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # steps 1-2 from the checkpoint, 3-6 trained now
    assert finetune.final_model_complete(out) and not (out / ".final.tmp").exists()
    assert_reloads(out, data_path, tiny_base_model)

    # an explicit incomplete folder is refused with a message, not a traceback
    shutil.rmtree(out / "checkpoint-6")
    (out / "checkpoint-6").mkdir()
    with pytest.raises(SystemExit, match="checkpoint-6 is incomplete"):
        finetune.main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-6")])


def test_resume_after_last_checkpoint_trains_no_extra_step(tiny_data, tiny_base_model, tmp_path, capsys):
    data_path, _ = tiny_data
    out = tmp_path / "out"
    argv = cli(tiny_base_model, data_path, out, "--max_steps", "4", "--save_and_eval_strategy", "steps",
               "--save_and_eval_steps", "2")
    run_killed("final", 0, argv, tmp_path)  # killed after the last checkpoint, during the final save
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    assert not finetune.final_model_complete(out)

    finetune.main(argv + ["--resume_from_checkpoint", "true"])
    assert "already reached step 4 of --max_steps 4" in capsys.readouterr().out
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and steps_logged(out) == [1, 2, 3, 4]
    model = assert_reloads(out, data_path, tiny_base_model)
    ckpt = load_file(str(out / "checkpoint-4" / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[key], ckpt[key])  # the checkpoint's weights, not retrained

    # once more on the finished folder: nothing to do, nothing trained
    finetune.main(argv + ["--resume_from_checkpoint", "true"])
    assert "is complete" in capsys.readouterr().out
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_publish_folder_moves_config_last(tmp_path, monkeypatch):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir(), out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        (tmp / name).write_text(name)
    moved = []
    real = os.replace
    monkeypatch.setattr(finetune.os, "replace", lambda a, b: (moved.append(Path(b).name), real(a, b)))
    finetune.publish_folder(tmp, out)
    assert moved[-1] == "config.json" and sorted(moved) == sorted(p.name for p in out.iterdir())
    assert not tmp.exists()


def test_unwritable_output_dir_fails_before_work(tiny_data, tiny_base_model, tmp_path):
    data_path, _ = tiny_data
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="--output_dir .* cannot be created or written"):
        finetune.main(cli(tiny_base_model, data_path, blocker / "out"))


def test_task_flag_errors(tiny_data, tiny_base_model, tmp_path, capsys):
    data_path, _ = tiny_data
    base = cli(tiny_base_model, data_path, tmp_path / "x")
    for extra, message in ((["--tasks", "", "--train_prompt_sample_num", "", "--train_data_sample_num", ""],
                            "--tasks: no task given"),
                           (["--tasks", "seqrec", "--train_prompt_sample_num", "1", "--train_data_sample_num", "-5"],
                            "--train_data_sample_num: [-5] are negative"),
                           (["--tasks", "seqrec", "--train_prompt_sample_num", "-1", "--train_data_sample_num", "0"],
                            "--train_prompt_sample_num: [-1] are negative"),
                           (["--valid_sample_num", "-3"], "--valid_sample_num: -3 is negative")):
        with pytest.raises(SystemExit) as e:
            finetune.main(base + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--load_in_8bit", "--load_in_4bit"])
def test_quantized_lora_trains_on_cpu(tiny_data, tiny_base_model, tmp_path, flag):
    """bitsandbytes quantises on CPU too: the base weights load quantised and the adapter trains."""
    data_path, _ = tiny_data
    out = tmp_path / "qlora"
    lora_finetune.main(cli(tiny_base_model, data_path, out, "--max_steps", "2", "--learning_rate", "1e-2",
                           "--save_and_eval_strategy", "no", flag))
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    args = parse_args("train", cli(tiny_base_model, data_path, out, flag))
    kwargs = lora_finetune.quantization_kwargs(args)
    assert kwargs["device_map"] == {"": 0 if torch.cuda.is_available() else "cpu"}
    with pytest.raises(DataError, match="exclusive"):
        lora_finetune.quantization_kwargs(parse_args("train", cli(tiny_base_model, data_path, out, "--load_in_8bit",
                                                                  "--load_in_4bit")))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_response_only_logits_give_the_same_loss_and_gradients(tiny_data, tiny_base_model, attn):
    """Left padding + logits_to_keep + position_ids == right padding with full logits (fp32)."""
    data_path, _ = tiny_data
    args = parse_args("train", cli(tiny_base_model, data_path, "unused", "--tasks", "seqrec,index2item",
                                   "--train_prompt_sample_num", "1,1", "--train_data_sample_num", "0,0"))
    train, _ = data.load_datasets(args)
    batch = [train[i] for i in (0, 3, len(train) - 1, len(train) - 5)]  # seqrec and title responses
    model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path), attn_implementation=attn)
    grads = {}
    for fast in (False, True):
        enc = collator.TrainCollator(tok, True, 2048, response_logits_only=fast)(batch)
        model.zero_grad()
        out = model(**enc)
        out.loss.backward()
        grads[fast] = (out.loss.item(), out.logits.shape[1], {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_full, width_full, g_full), (loss_fast, width_fast, g_fast) = grads[False], grads[True]
    assert width_fast < width_full  # fewer positions through the output layer
    assert loss_fast == pytest.approx(loss_full, rel=1e-5)
    for name, g in g_full.items():
        assert torch.allclose(g_fast[name], g, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("index_lr", [None, "1e-3"])
def test_default_optimizer_is_fused_adamw_with_the_looped_update(tiny_data, tiny_base_model, tmp_path, index_lr):
    """The Trainer's optimizer is AdamW in one fused pass (also with the index rows' own group), and three
    of its steps move the weights as the looped AdamW does (float rounding apart)."""
    data_path, _ = tiny_data
    extra = ("--index_lr", index_lr) if index_lr else ()
    args = parse_args("train", cli(tiny_base_model, data_path, tmp_path / "opt", *extra))
    assert args.optim == "adamw_torch_fused"
    train, valid = data.load_datasets(args)
    model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))
    trainer = finetune.build_trainer(args, finetune.training_arguments(args), model, tok, train, valid)
    trainer.create_optimizer()
    optimizer = trainer.optimizer
    assert optimizer.defaults["fused"] is True and len(optimizer.param_groups) == (3 if index_lr else 2)

    batch = trainer.data_collator([train[i] for i in range(4)])
    weights = {}
    for fused in (True, False):
        torch.manual_seed(0)
        net = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))[0]
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01, fused=fused)
        for _ in range(3):
            net(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        weights[fused] = {n: w.detach().clone() for n, w in net.named_parameters()}
    start = dict(finetune.load_for_training(str(tiny_base_model), indices_of(data_path))[0].named_parameters())
    assert any(not torch.equal(weights[True][n], start[n]) for n in start)  # the steps moved the weights
    for name, w in weights[False].items():
        assert torch.allclose(weights[True][name], w, atol=1e-5, rtol=1e-4), name


def test_cpu_bf16_is_detected_from_the_cpu_flags():
    from utils import cpu_supports_bf16

    assert cpu_supports_bf16("flags : fpu avx512f avx512_bf16 amx_tile")
    assert cpu_supports_bf16("Features : fp asimd bf16 i8mm")  # Arm
    assert not cpu_supports_bf16("flags : fpu avx2 avx512f avx512_vnni")


def test_learning_curve_is_logged_and_plotted(tiny_data, tiny_base_model, tmp_path):
    from plot_learning_curve import plot_learning_curve

    data_path, _ = tiny_data
    out = tmp_path / "curve"
    finetune.main(cli(tiny_base_model, data_path, out, "--max_steps", "3", "--save_and_eval_strategy", "no",
                      "--curve_steps", "2", "--curve_users", "6", "--curve_beams", "5"))
    curve = json.loads((out / "learning_curve.json").read_text())
    assert curve["users"] == 6 and [p["step"] for p in curve["points"]] == [2, 3]  # every 2 steps, and the end
    for p in curve["points"]:
        assert 0 <= p["ndcg@10"] <= p["hit@10"] <= 1 and 1 <= p["distinct_top1"] <= 6
        assert p["examples"] == p["step"] * 2 and p["train_seconds"] >= 0
        h = p["hit@10"]  # each user's hit is 0 or 1: its standard error follows from the mean
        assert p["stderr"]["hit@10"] == pytest.approx((h * (1 - h) / 5) ** 0.5, abs=1e-6)
        assert 0 <= p["stderr"]["ndcg@10"] <= 0.5
    assert set(curve["popularity"]) == {"hit@10", "ndcg@10"}
    png, _ = plot_learning_curve(out / "learning_curve.json", tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_learning_curve_scores_in_the_training_precision(tiny_data, tiny_base_model, tmp_path, monkeypatch):
    import evaluation

    data_path, _ = tiny_data
    seen = []
    real = evaluation.evaluate_prompt

    def spy(*a, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*a, **kw)

    monkeypatch.setattr(evaluation, "evaluate_prompt", spy)
    for flags, autocast in (((), False), (("--bf16",), True)):
        seen.clear()
        out = tmp_path / f"curve{int(autocast)}"
        finetune.main(cli(tiny_base_model, data_path, out, "--max_steps", "2", "--save_and_eval_strategy", "no",
                          "--curve_steps", "1", "--curve_users", "4", "--curve_beams", "3", *flags))
        curve = json.loads((out / "learning_curve.json").read_text())
        assert curve["bf16_autocast"] is autocast and len(curve["points"]) == 2
        assert len(seen) == 2 and all(on is autocast for on, _ in seen)  # a bf16 run decodes under bf16 autocast
        if autocast:
            assert all(dtype == torch.bfloat16 for _, dtype in seen)


def test_learning_curve_flags_reject_bad_values(tiny_data, tiny_base_model, tmp_path, capsys):
    data_path, _ = tiny_data
    for flag, value in (("--curve_steps", "-1"), ("--curve_users", "0"), ("--curve_beams", "-2")):
        with pytest.raises(SystemExit) as e:
            finetune.main(cli(tiny_base_model, data_path, tmp_path / "x", flag, value))
        assert e.value.code == 2 and f"{flag}: {value} is not allowed" in capsys.readouterr().err


def test_index_token_init_options(tiny_data, tiny_base_model):
    from modeling import load_for_training

    data_path, _ = tiny_data
    indices = indices_of(data_path)
    items = json.loads((data_path / "Tiny" / "Tiny.item.json").read_text())
    titles = {i: f["title"] for i, f in items.items()}
    base_rows = load_tokenizer(tiny_base_model).__len__()
    rows = {}
    inters = json.loads((data_path / "Tiny" / "Tiny.inter.json").read_text())
    for name, kwargs in (("mean", {}), ("normal", {"mean_resizing": False}), ("title", {"titles": titles}),
                         ("collab", {"inters": inters})):
        model, tok = load_for_training(str(tiny_base_model), indices, **kwargs)
        rows[name] = model.get_input_embeddings().weight[base_rows:].detach().clone()
        old = model.get_input_embeddings().weight[:base_rows].detach()
    # title: distinct rows around the pretrained rows' mean, as spread out as the pretrained rows;
    # mean: rows close to the pretrained mean
    title = rows["title"]
    offsets = title - old.mean(0)
    spread = (old - old.mean(0)).norm(dim=1).mean()
    assert offsets.norm(dim=1).mean().item() == pytest.approx(spread.item(), rel=1e-4)
    assert torch.cdist(title, title).fill_diagonal_(1.0).min() > 1e-3
    unit = offsets / offsets.norm(dim=1, keepdim=True)
    assert (unit @ unit.T).fill_diagonal_(0).mean() < 0.5  # centred: not all along one shared direction
    assert (rows["mean"].mean(0) - old.mean(0)).norm() < (rows["title"].mean(0) - old.mean(0)).norm()
    # normal (the default, as the original's transformers): N(0, initializer_range)
    assert parse_args("train", cli(tiny_base_model, data_path, "unused")).index_token_init == "normal"
    assert rows["normal"].std().item() == pytest.approx(0.02, rel=0.3)  # initializer_range
    assert abs(rows["normal"].mean().item()) < 0.005
    # collab: as spread out as the title start, in directions of its own
    collab_offsets = rows["collab"] - old.mean(0)
    assert collab_offsets.norm(dim=1).mean().item() == pytest.approx(spread.item(), rel=0.05)
    assert not torch.allclose(rows["collab"], title)
    with pytest.raises(ValueError, match="give one"):
        load_for_training(str(tiny_base_model), indices, titles=titles, inters=inters)


def test_index_softmax_loss_restricts_index_targets_to_their_level(tiny_data, tiny_base_model):
    """Index targets: a softmax over their level's codes; text targets (EOS, titles): the full one."""
    from index_loss import IGNORE_INDEX, IndexSoftmax
    from item_trie import IndexTrie

    data_path, _ = tiny_data
    indices = indices_of(data_path)
    model, tok = finetune.load_for_training(str(tiny_base_model), indices)
    loss_fn = IndexSoftmax(IndexTrie(list(index_token_ids(tok, indices).values()), tok.eos_token_id), len(tok))
    levels = [ids.tolist() for ids in loss_fn.level_ids]
    for lv, ids in enumerate(levels):  # the levels are the codes of each letter, each once
        assert sorted(ids) == sorted({tok.convert_tokens_to_ids(t[lv]) for t in indices.values()})
        assert {tok.convert_ids_to_tokens(i)[:3] for i in ids} == {f"<{chr(ord('a') + lv)}_"}
    head = model.get_output_embeddings()
    torch.manual_seed(0)
    hidden = torch.randn(1, 4, head.weight.shape[1])  # [B, T, H]
    sa, sb = len(levels[0]) - 1, len(levels[1]) // 2
    a, b = levels[0][sa], levels[1][sb]
    labels = torch.tensor([[IGNORE_INDEX, a, b, tok.eos_token_id]])  # positions 0..2 predict a, b, eos
    got = loss_fn(hidden, labels, head)
    h = hidden[0]
    want = (torch.nn.functional.cross_entropy((h[0] @ head.weight[levels[0]].T)[None], torch.tensor([sa]))
            + torch.nn.functional.cross_entropy((h[1] @ head.weight[levels[1]].T)[None], torch.tensor([sb]))
            + torch.nn.functional.cross_entropy(head(h[2])[None], torch.tensor([tok.eos_token_id])))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def item_example(tok, item: list[int], eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-token prompt, then an item's index tokens (and EOS) -> (input ids [1, T], labels [1, T])
    with the prompt token ignored: the examples the index-softmax losses are checked on by hand."""
    from index_loss import IGNORE_INDEX

    seq = torch.tensor([[tok.eos_token_id, *item, *([tok.eos_token_id] if eos else [])]])
    labels = seq.clone()
    labels[0, 0] = IGNORE_INDEX
    return seq, labels


def test_trie_softmax_normalises_over_the_codes_that_can_follow_the_prefix(tiny_data, tiny_base_model):
    """--index_softmax trie: token t of an item is scored among the codes that some item has after
    the same t earlier tokens; a whole item's loss is -log P(item) among all items (plus EOS)."""
    from index_loss import IGNORE_INDEX, IndexSoftmax
    from item_trie import IndexTrie

    data_path, _ = tiny_data
    indices = indices_of(data_path)
    model, tok = finetune.load_for_training(str(tiny_base_model), indices)
    ids = index_token_ids(tok, indices)  # {item: [token ids]}
    trie = IndexTrie(list(ids.values()), tok.eos_token_id)
    loss_fn = IndexSoftmax(trie, len(tok), "trie")
    head = model.get_output_embeddings()
    item = ids["3"]
    seq, labels = item_example(tok, item)
    torch.manual_seed(0)
    hidden = torch.randn(1, seq.shape[1], head.weight.shape[1])  # [B, T, H]
    got = loss_fn(hidden, labels, head, seq).item()
    want = 0.0
    for t, token in enumerate(item):
        children = sorted({other[t] for other in ids.values() if other[:t] == item[:t]})
        logits = hidden[0, t] @ head.weight[children].T
        want -= logits.log_softmax(-1)[children.index(token)].item()
    want -= head(hidden[0, len(item)]).log_softmax(-1)[tok.eos_token_id].item()
    assert got == pytest.approx(want, rel=1e-5)
    # the item probabilities it implies (without EOS) sum to one over all items
    total = 0.0
    for other in ids.values():
        s, lab = item_example(tok, other, eos=False)
        total += torch.exp(-loss_fn(hidden[:, :s.shape[1]], lab, head, s)).item()
    assert total == pytest.approx(1.0, rel=1e-4)
    level_fn = IndexSoftmax(trie, len(tok), "level")
    assert got <= level_fn(hidden, labels, head).item() + 1e-5  # never more choices than the whole level
    # a prefix that is no item's (a, then a b-code never seen after it): that token keeps the level softmax
    pairs = {tuple(o[:2]) for o in ids.values()}
    a, b = next((a, b) for a in {o[0] for o in ids.values()} for b in {o[1] for o in ids.values()}
                if (a, b) not in pairs)
    odd = torch.tensor([[tok.eos_token_id, a, b, item[2]]])
    lab = odd.clone()
    lab[0, :3] = IGNORE_INDEX  # only the third token is a target
    assert loss_fn(hidden[:, :4], lab, head, odd).item() == pytest.approx(level_fn(hidden[:, :4], lab, head).item())


def test_index_softmax_trains(tiny_data, tiny_base_model, tmp_path):
    """The Trainer uses the trie softmax (a subset of the vocabulary: never above the full loss), with
    response-only logits and history targets, and a run with it trains, saves and reloads."""
    data_path, _ = tiny_data
    out = tmp_path / "isx"
    argv = cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no", "--tasks", "seqrec,index2item",
               "--train_prompt_sample_num", "1,1", "--train_data_sample_num", "0,0", "--index_softmax",
               "trie", "--history_loss")
    args = parse_args("train", argv)
    train, valid = data.load_datasets(args)
    model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))
    trainer = finetune.build_trainer(args, finetune.training_arguments(args), model, tok, train, valid)
    batch = trainer.data_collator([train[i] for i in (0, 3, len(train) - 1)])  # seqrec and title responses
    assert "logits_to_keep" in batch
    restricted = trainer.compute_loss(model, dict(batch)).item()
    full = model(**batch).loss.item()
    assert 0 < restricted < full
    finetune.main(argv)
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(0 < x < full * 2 for x in losses)
    model = assert_reloads(out, data_path, tiny_base_model)
    from evaluation import checkpoint_softmax

    # recorded in config.json, so test.py scores with the softmax the model was trained with
    assert checkpoint_softmax("auto", model) == "trie" and checkpoint_softmax("full", model) == "full"
    assert checkpoint_softmax("auto", finetune.load_for_training(str(tiny_base_model), indices_of(data_path))[0]) == "full"


def test_index_prior_makes_a_blind_model_the_popularity_model(tiny_data, tiny_base_model):
    """--index_prior popularity: with logits that say nothing (zero hidden states), the trie loss of an
    item is -log of its smoothed share of the training interactions, the popularity model's."""
    from index_loss import IGNORE_INDEX, IndexSoftmax
    from item_prior import item_prior, popularity_prior
    from item_trie import IndexTrie

    data_path, _ = tiny_data
    indices = indices_of(data_path)
    args = parse_args("train", cli(tiny_base_model, data_path, "unused", "--index_softmax", "trie",
                                   "--index_prior", "popularity"))
    prior = item_prior(args.index_prior, args, indices)
    assert prior == popularity_prior(data.load_files(args).inters, indices) and min(prior.values()) >= 1.0
    model, tok = finetune.load_for_training(str(tiny_base_model), indices)
    ids = index_token_ids(tok, indices)
    loss_fn = IndexSoftmax(IndexTrie(list(ids.values()), tok.eos_token_id, weights=[prior[i] for i in ids]),
                           len(tok), "trie")
    head = model.get_output_embeddings()
    total = sum(prior.values())
    for item in ("1", "3"):
        seq = torch.tensor([[tok.eos_token_id, *ids[item]]])
        labels = seq.clone()
        labels[0, 0] = IGNORE_INDEX
        hidden = torch.zeros(1, seq.shape[1], head.weight.shape[1])
        got = loss_fn(hidden, labels, head, seq).item()
        assert got == pytest.approx(-math.log(prior[item] / total), rel=1e-4)


def test_index_prior_trains_and_is_recorded(tiny_data, tiny_base_model, tmp_path):
    """A run with --index_prior trains, records the prior in config.json (test.py's --score_prior
    auto then adds it), and the flag without the trie softmax is refused by name."""
    data_path, _ = tiny_data
    out = tmp_path / "prior"
    argv = cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no", "--tasks", "seqrec",
               "--train_prompt_sample_num", "1", "--train_data_sample_num", "0", "--index_softmax", "trie",
               "--history_loss", "--index_prior", "popularity")
    finetune.main(argv)
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses and all(0 < x < 50 for x in losses)
    model = assert_reloads(out, data_path, tiny_base_model)
    from evaluation import checkpoint_prior
    from item_prior import item_prior

    test_args = parse_args("test", ["--data_path", str(data_path), "--dataset", "Tiny", "--ckpt_path", str(out)])
    indices = indices_of(data_path)
    assert checkpoint_prior("auto", model, test_args, indices) == item_prior("popularity", test_args, indices)
    assert checkpoint_prior("none", model, test_args, indices) is None
    blind = finetune.load_for_training(str(tiny_base_model), indices)[0]
    assert checkpoint_prior("auto", blind, test_args, indices) is None
    with pytest.raises(SystemExit):
        parse_args("train", cli(tiny_base_model, data_path, out, "--index_prior", "popularity"))


@pytest.mark.parametrize("mode", ["full", "level", "trie"])
def test_loss_temperature_divides_the_scores_of_every_softmax(tiny_data, tiny_base_model, mode):
    """--loss_temperature (LETTER's ranking-guided loss): each target's cross-entropy runs on its scores
    over tau, by hand on tiny hidden states: the whole vocabulary (full, and the text targets of the
    others), the level's codes, or the trie's children with the popularity prior added before dividing.
    tau = 1 gives the loss without a temperature bit for bit."""
    from item_prior import popularity_prior
    from item_trie import IndexTrie
    from index_loss import IndexSoftmax

    F = torch.nn.functional
    data_path, _ = tiny_data
    indices = indices_of(data_path)
    model, tok = finetune.load_for_training(str(tiny_base_model), indices)
    ids = index_token_ids(tok, indices)
    args = parse_args("train", cli(tiny_base_model, data_path, "unused"))
    prior = popularity_prior(data.load_files(args).inters, indices) if mode == "trie" else None
    trie = IndexTrie(list(ids.values()), tok.eos_token_id, weights=prior and [prior[i] for i in ids])
    head = model.get_output_embeddings()
    item = ids["3"]
    seq, labels = item_example(tok, item)
    torch.manual_seed(0)
    hidden = 3 * torch.randn(1, seq.shape[1], head.weight.shape[1])  # [B, T, H]: logits far from uniform
    h, tau = hidden[0], 0.5

    def scores(t: int) -> tuple[torch.Tensor, int]:  # the scores the loss normalises for token t, the target's slot
        if mode == "full":
            return head(h[t]), item[t]
        codes = sorted({o[t] for o in ids.values() if mode == "level" or o[:t] == item[:t]})
        logits = h[t] @ head.weight[codes].T
        if mode == "trie":  # the log of each child's share of the prefix's popularity
            below = [sum(prior[i] for i, o in ids.items() if o[:t + 1] == [*item[:t], c]) for c in codes]
            logits = logits + torch.tensor(below).log() - math.log(sum(below))
        return logits, codes.index(item[t])

    def by_hand(temperature: float) -> float:
        eos = torch.tensor([tok.eos_token_id])
        total = F.cross_entropy(head(h[len(item)])[None] / temperature, eos, reduction="sum")
        for t in range(len(item)):
            logits, y = scores(t)
            total = total + F.cross_entropy(logits[None] / temperature, torch.tensor([y]), reduction="sum")
        return total.item()

    loss = {t: IndexSoftmax(trie, len(tok), mode, temperature=t)(hidden, labels, head, seq).item() for t in (1.0, tau)}
    assert loss[tau] == pytest.approx(by_hand(tau), rel=1e-5)
    assert loss[1.0] == pytest.approx(by_hand(1.0), rel=1e-5)
    assert abs(loss[tau] - loss[1.0]) > 100 * 1e-5 * loss[1.0]  # far outside the tolerance of the two checks
    plain = IndexSoftmax(trie, len(tok), mode)(hidden, labels, head, seq)
    assert plain.item() == loss[1.0]  # the default is the loss without a temperature, exactly


def test_loss_temperature_on_the_plain_loss_trains_and_is_recorded(tiny_data, tiny_base_model, tmp_path, capsys):
    """Without --index_softmax, --loss_temperature tau trains on the model's own token loss with its
    logits over tau (the Trainer's loss at tau = 1, which keeps the model's own loss path); the value is
    recorded in config.json; a value that is not a positive number is refused by name."""
    data_path, _ = tiny_data
    out = tmp_path / "tau"
    base = cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no", "--tasks", "seqrec,index2item",
               "--train_prompt_sample_num", "1,1", "--train_data_sample_num", "0,0")
    model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))
    trainers = {}
    for tau in ("1", "0.5"):
        args = parse_args("train", [*base, "--loss_temperature", tau])
        train, valid = data.load_datasets(args)
        trainers[tau] = finetune.build_trainer(args, finetune.training_arguments(args), model, tok, train, valid)
    batch = trainers["1"].data_collator([train[i] for i in (0, len(train) - 1)])  # an index answer and a title
    assert "logits_to_keep" in batch  # the response-only logits path
    out_ = model(**batch)
    labels = batch["labels"][:, 1:]
    logits = out_.logits[:, :-1].float()
    for tau, trainer in trainers.items():
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1) / float(tau), labels.flatten(), ignore_index=-100)
        assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(want.item(), rel=1e-5)
    assert type(trainers["1"]).compute_loss is finetune.Trainer.compute_loss  # tau = 1: the paper's loss path
    from index_loss import IndexSoftmax

    # the full mode at tau = 1 is the model's own loss (the same tokens, shift and mean)
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, -batch["logits_to_keep"]:]
    full = IndexSoftmax(None, len(tok), "full")(hidden, batch["labels"], model.get_output_embeddings())
    assert (full / (labels != -100).sum()).item() == pytest.approx(out_.loss.item(), rel=1e-5)

    finetune.main([*base, "--loss_temperature", "0.5"])
    config = json.loads((out / "config.json").read_text())
    assert config["loss_temperature"] == 0.5
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
    assert not hasattr(model.config, "loss_temperature")  # recorded only when it is not 1
    for value in ("0", "-0.5", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            parse_args("train", [*base, f"--loss_temperature={value}"])
        assert e.value.code == 2 and f"--loss_temperature: {float(value)} is not allowed" in capsys.readouterr().err


def test_index_lr_trains_only_the_index_rows_of_the_embedding(tiny_data, tiny_base_model, tmp_path, capsys):
    """--index_lr: the new index-token rows move, the pretrained rows of the tied matrix stay as
    they were, the body still trains; a non-positive rate and --deepspeed are refused by name."""
    data_path, _ = tiny_data
    out = tmp_path / "index_lr"
    finetune.main(cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no", "--tasks", "seqrec",
                      "--train_prompt_sample_num", "1", "--train_data_sample_num", "0", "--learning_rate", "1e-3",
                      "--index_lr", "1e-2", "--history_loss"))
    indices = indices_of(data_path)
    before = finetune.load_for_training(str(tiny_base_model), indices)[0]
    after = load_for_inference(str(out), indices)[0]
    first_new = len(load_tokenizer(tiny_base_model))
    w0, w1 = before.get_input_embeddings().weight, after.get_input_embeddings().weight
    assert torch.equal(w0[:first_new], w1[:first_new])
    assert (w1[first_new:] - w0[first_new:]).abs().max() > 1e-3  # the new rows moved
    body0 = dict(before.named_parameters())
    moved = [n for n, p in after.named_parameters() if "embed" not in n and not torch.equal(p, body0[n])]
    assert moved  # the rest of the model trains as before
    for value in ("0", "-1e-3"):
        with pytest.raises(SystemExit) as e:
            parse_args("train", cli(tiny_base_model, data_path, out, f"--index_lr={value}"))
        assert e.value.code == 2 and f"--index_lr: {float(value)} is not allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args("train", cli(tiny_base_model, data_path, out, "--index_lr", "1e-3", "--deepspeed", "x.json"))
    assert "--index_lr is not supported with --deepspeed" in capsys.readouterr().err


def test_index_lr_covers_an_untied_output_head():
    """--index_lr's matrices: the tied embedding once; with an untied head, the head's too."""
    from fixtures import make_tiny_model

    tied, untied = make_tiny_model(50, tie=True), make_tiny_model(50, tie=False)
    assert [w is tied.get_input_embeddings().weight for w in finetune.embedding_weights(tied)] == [True]
    weights = finetune.embedding_weights(untied)
    assert len(weights) == 2 and weights[1] is untied.get_output_embeddings().weight


class FixedExamples(list):
    """A training set of given examples, in the shape the Trainer and EpochCallback expect."""

    def set_epoch(self, epoch):
        pass


class GradientsBeforeStep(TrainerCallback):
    """The accumulated gradients of the first optimizer step (clipping is off in the test)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("softmax,temperature", [("none", "1"), ("trie", "1"), ("none", "0.5")])
def test_loss_normalization_per_micro_batch_or_over_the_global_tokens(tiny_data, tiny_base_model, tmp_path, softmax,
                                                                      temperature):
    """Two micro-batches of 1 example, a 4-token index answer and a longer title, accumulated into one step:
    micro_batch (the original's) gives the gradient of the mean of the two micro-batch means, global_tokens
    (transformers 5's) that of the token mean over both; with the model's loss, the trie softmax, and the
    full softmax with a temperature (--loss_temperature)."""
    import copy

    data_path, _ = tiny_data
    base = cli(tiny_base_model, data_path, tmp_path / "norm", "--max_steps", "1", "--per_device_batch_size", "1",
               "--gradient_accumulation_steps", "2", "--save_and_eval_strategy", "no", "--tasks",
               "seqrec,index2item", "--train_prompt_sample_num", "1,1", "--train_data_sample_num", "0,0",
               "--index_softmax", softmax, "--learning_rate", "0", "--loss_temperature", temperature)
    assert parse_args("train", base).loss_normalization == "micro_batch"  # the original's, by default
    args = parse_args("train", base)
    train, valid = data.load_datasets(args)
    examples = FixedExamples([train[0], train[len(train) - 1]])  # an index answer and a title
    start, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))

    ref = finetune.build_trainer(args, finetune.training_arguments(args), copy.deepcopy(start), tok, examples, valid)
    means, counts = [], []
    for ex in examples:  # each micro-batch's own token mean (its loss with nothing accumulated)
        batch = ref.data_collator([ex])
        means.append(ref.compute_loss(ref.model, dict(batch)))
        counts.append(int((batch["labels"][:, 1:] != collator.IGNORE_INDEX).sum()))
    assert counts[1] >= 2 * counts[0]  # lengths that weigh the two rules apart
    expected = {"micro_batch": (means[0] + means[1]) / 2,
                "global_tokens": (means[0] * counts[0] + means[1] * counts[1]) / sum(counts)}
    grads = {}
    for mode, loss in expected.items():
        ref.model.zero_grad()
        loss.backward(retain_graph=True)
        grads[mode] = {n: p.grad.clone() for n, p in ref.model.named_parameters() if p.grad is not None}

    for mode, other in (("micro_batch", "global_tokens"), ("global_tokens", "micro_batch")):
        args = parse_args("train", [*base, "--loss_normalization", mode])
        spy = GradientsBeforeStep()
        trainer = finetune.build_trainer(args, finetune.training_arguments(args, max_grad_norm=0.0),
                                         copy.deepcopy(start), tok, examples, valid)
        trainer.add_callback(spy)
        trainer.train()
        logged = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        assert logged == pytest.approx(expected[mode].item(), rel=1e-4)
        emb = "model.embed_tokens.weight"
        far = (grads[mode][emb] - grads[other][emb]).norm()
        assert far > 0.05 * grads[mode][emb].norm()  # the two rules differ clearly here
        assert (spy.grads[emb] - grads[mode][emb]).norm() < 0.01 * far
        for name, g in grads[mode].items():
            assert torch.allclose(spy.grads[name], g, atol=1e-6, rtol=1e-3), (mode, name)


def test_an_fp16_checkpoint_trains_with_fp32_weights_by_default(tiny_data, tiny_base_model, tmp_path):
    """Without DeepSpeed the loaded dtype is the master weights' (and AdamW's moments'): float32 by default, as
    the original loaded; --torch_dtype auto keeps the checkpoint's fp16 (transformers 5's default)."""
    from transformers import AutoModelForCausalLM

    data_path, _ = tiny_data
    fp16 = tmp_path / "fp16"
    AutoModelForCausalLM.from_pretrained(str(tiny_base_model)).half().save_pretrained(fp16)
    for f in tiny_base_model.glob("*token*"):
        shutil.copy(f, fp16)
    out = tmp_path / "out"
    finetune.main(cli(fp16, data_path, out, "--max_steps", "1", "--save_and_eval_strategy", "no"))
    weights = load_file(out / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    model, _ = finetune.load_for_training(str(fp16), indices_of(data_path), dtype="auto")
    assert model.dtype == torch.float16


def test_eager_attention_trains_as_sdpa_does_and_the_flag_reaches_the_model(tiny_data, tiny_base_model, tmp_path,
                                                                          monkeypatch):
    """--attn_implementation eager (run.sh's CPU profiles): the loss and gradients of sdpa on left-padded
    batches, in fp32 and under bf16 autocast, within rounding."""
    data_path, _ = tiny_data
    args = parse_args("train", cli(tiny_base_model, data_path, "unused", "--tasks", "seqrec,index2item",
                                   "--train_prompt_sample_num", "1,1", "--train_data_sample_num", "0,0"))
    train, _ = data.load_datasets(args)
    batch = [train[i] for i in (0, 3, len(train) - 1, len(train) - 5)]  # different lengths: padding
    runs = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)  # the same new index rows
        model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path), attn_implementation=attn)
        assert model.config._attn_implementation == attn
        enc = collator.TrainCollator(tok, True, 2048, response_logits_only=True)(batch)
        for bf16 in (False, True):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**enc).loss
            loss.backward()
            runs[attn, bf16] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    for bf16, (rel, atol) in ((False, (1e-5, 1e-6)), (True, (2e-2, 2e-3))):
        (loss_s, g_s), (loss_e, g_e) = runs["sdpa", bf16], runs["eager", bf16]
        assert loss_e == pytest.approx(loss_s, rel=rel)
        for name, g in g_s.items():
            assert torch.allclose(g_e[name], g, atol=atol, rtol=rel * 10), name

    seen = {}

    def capture(*a, **k):
        seen.update(k)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(finetune, "load_for_training", capture)
    with pytest.raises(RuntimeError, match="stop after loading"):
        finetune.main(cli(tiny_base_model, data_path, tmp_path / "out", "--attn_implementation", "eager"))
    assert seen["attn_implementation"] == "eager"


def test_teacher_weight_trains_on_the_trie_loss_with_the_cooccurrence_teacher(tiny_data, tiny_base_model, tmp_path):
    """--teacher_weight w: the trainer's loss is the trie loss with the co-occurrence teacher mixed in
    (the same batch scores otherwise than at w = 0, which is the plain trie loss), and training runs
    through finetune.main with history targets."""
    data_path, _ = tiny_data
    out = tmp_path / "teacher"
    base = cli(tiny_base_model, data_path, out, "--save_and_eval_strategy", "no", "--tasks", "seqrec",
               "--train_prompt_sample_num", "1", "--train_data_sample_num", "0", "--index_softmax", "trie",
               "--history_loss")
    model, tok = finetune.load_for_training(str(tiny_base_model), indices_of(data_path))
    with torch.no_grad():  # index rows that tell the codes apart: on equal logits every target scores the same
        rows = tok.convert_tokens_to_ids([t for toks in indices_of(data_path).values() for t in toks])
        model.get_output_embeddings().weight[rows] = torch.randn(len(rows), model.config.hidden_size,
                                                                  generator=torch.Generator().manual_seed(0))
    losses = {}
    for weight in ("0", "0.5"):
        args = parse_args("train", [*base, "--teacher_weight", weight])
        train, valid = data.load_datasets(args)
        trainer = finetune.build_trainer(args, finetune.training_arguments(args), model, tok, train, valid)
        assert (trainer.index_softmax.teacher is not None) == (weight != "0")
        batch = trainer.data_collator([train[i] for i in range(4)])
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(model, dict(batch)).item()
    assert all(0 < x < 100 for x in losses.values()) and abs(losses["0.5"] - losses["0"]) > 1e-4
    finetune.main([*base, "--teacher_weight", "0.5"])
    assert json.loads((out / "config.json").read_text())["teacher"] == {"weight": 0.5, "context": 5}
    logged = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert logged and all(0 < x < 100 for x in logged)
