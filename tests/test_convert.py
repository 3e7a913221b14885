"""convert/: make_delta + merge_delta rebuild the target exactly (both memory modes, sharded or not,
tied or untied head), their errors, and convert.sh on a real ZeRO-3 checkpoint from finetune.py."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dataset_files import dataset_file
from fixtures import make_indices, make_tiny_model, train_tokenizer
from modeling import add_index_tokens, index_token_ids, load_tokenizer
from utils import DataError

import convert  # convert/convert.py (tests/conftest.py puts convert/ on the path)
import make_delta
import merge_delta
from weights import WeightReader

ROOT = Path(__file__).resolve().parents[1]

INDICES = make_indices(24)


def save_pair(root: Path, tie: bool, shard: str | None):
    """A base model and a 'fine-tuned' target: index tokens added, embeddings (and head) resized, every
    weight changed by a few scaled-and-shifted steps, so that float32 differences are not always exact."""
    tok = train_tokenizer()
    base = make_tiny_model(len(tok), tie=tie, seed=1)
    kwargs = {"max_shard_size": shard} if shard else {}
    base.save_pretrained(root / "base", **kwargs)
    tok.save_pretrained(root / "base")
    add_index_tokens(tok, INDICES)
    base.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in base.parameters():
            for _ in range(3):
                p.mul_(1 + 0.01 * torch.randn(p.shape, generator=g)).add_(0.01 * torch.randn(p.shape, generator=g))
    base.save_pretrained(root / "target", **kwargs)
    tok.save_pretrained(root / "target")
    return root / "base", root / "target", base.state_dict(), tok


def run_make(base, target, delta, *extra):
    make_delta.main(["--base-model-path", str(base), "--target-model-path", str(target), "--delta-path", str(delta),
                     *extra])


def run_merge(base, delta, out, *extra):
    merge_delta.main(["--base-model-path", str(base), "--target-model-path", str(out), "--delta-path", str(delta),
                      *extra])


@pytest.mark.parametrize("tie,shard", [(True, None), (False, "20KB")], ids=["tied-single-file", "untied-sharded"])
def test_delta_roundtrip_is_exact(tmp_path, tie, shard):
    base, target, target_sd, tok = save_pair(tmp_path, tie, shard)
    delta = tmp_path / "delta"
    run_make(base, target, delta, *(["--max-shard-size", shard] if shard else []))
    info = json.loads((delta / "delta_info.json").read_text())
    heads = ["model.embed_tokens.weight"] + ([] if tie else ["lm_head.weight"])
    assert sorted(info["whole_tensors"]) == sorted(heads)  # the resized ones, and only those
    delta_reader = WeightReader(delta)
    assert (len(delta_reader.files) > 1) == bool(shard)
    # float32 differences are inexact for some tensors here: those are stored in float64
    assert {delta_reader.get(n).dtype for n in delta_reader.names()} == {torch.float32, torch.float64}

    for mode in ([], ["--low-cpu-mem"]):
        out = tmp_path / f"merged{'-low' if mode else ''}"
        run_merge(base, delta, out, "--dtype", "float32", *mode)
        model = AutoModelForCausalLM.from_pretrained(out)
        merged_sd = model.state_dict()
        assert merged_sd.keys() == target_sd.keys()
        for name, tensor in target_sd.items():
            assert torch.equal(merged_sd[name], tensor), (mode, name)
        assert model.config.vocab_size == len(tok) and model.dtype == torch.float32
        if tie:
            assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        merged_tok = load_tokenizer(out)
        index_token_ids(merged_tok, INDICES, where=str(out))  # each index token is one id
        ids = merged_tok("".join(INDICES["3"]), add_special_tokens=False)["input_ids"]
        assert merged_tok.convert_ids_to_tokens(ids) == INDICES["3"]
        if mode:  # streaming writes one output shard per delta shard
            assert len(WeightReader(out).files) == len(delta_reader.files)

    # the released convention: float16 weights, close to the target
    run_merge(base, delta, tmp_path / "fp16", "--low-cpu-mem")
    half = load_file(str(WeightReader(tmp_path / "fp16").files[0]))
    name = next(iter(half))
    assert half[name].dtype == torch.float16
    assert torch.allclose(half[name].float(), target_sd[name], atol=1e-3)


def test_merge_and_make_errors_leave_nothing(tmp_path):
    base, target, target_sd, _ = save_pair(tmp_path, tie=True, shard=None)
    delta = tmp_path / "delta"
    run_make(base, target, delta)
    out = tmp_path / "out"

    # a delta as released without delta_info.json (the resized embeddings are recognised by shape), on a
    # base saved as pytorch_model.bin
    released, bin_base = tmp_path / "released", tmp_path / "bin-base"
    shutil.copytree(delta, released)
    (released / "delta_info.json").unlink()
    shutil.copytree(base, bin_base)
    torch.save(load_file(str(bin_base / "model.safetensors")), bin_base / "pytorch_model.bin")
    (bin_base / "model.safetensors").unlink()
    run_merge(bin_base, released, tmp_path / "from-released", "--dtype", "float32", "--low-cpu-mem")
    merged = load_file(str(tmp_path / "from-released" / "model.safetensors"))
    assert merged.keys() == target_sd.keys() - {"lm_head.weight"}
    assert all(torch.equal(merged[name], target_sd[name]) for name in merged)

    def refused(match, base_dir=base, delta_dir=delta, *extra):
        before = set(tmp_path.iterdir())
        with pytest.raises(DataError, match=match):
            run_merge(base_dir, delta_dir, out, *extra)
        assert set(tmp_path.iterdir()) == before  # no output, no temporary folder left behind

    # the base lacks a tensor the delta changes
    lacking = tmp_path / "lacking"
    shutil.copytree(base, lacking)
    weights = load_file(str(lacking / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    refused(r"has no tensor 'model.layers.1.mlp.down_proj.weight'", lacking)
    refused(r"has no tensor", lacking, delta, "--low-cpu-mem")

    # a shape mismatch outside the embeddings and head: a base of another width
    wider = tmp_path / "wider"
    make_tiny_model(len(train_tokenizer()), hidden=64).save_pretrained(wider)
    refused(r"tensor 'model\.layers\.\d+\.[^']*': base .* has shape \(64,\) but the delta has \(32,\)", wider)
    with pytest.raises(DataError, match="only the embeddings and output head may differ"):
        run_make(wider, target, tmp_path / "delta2")
    assert not (tmp_path / "delta2").exists()

    # a delta without tokenizer files
    bare = tmp_path / "bare"
    shutil.copytree(delta, bare)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bare / f).unlink()
    refused("no tokenizer files", base, bare)

    # a tokenizer with more tokens than the embeddings have rows
    grown = tmp_path / "grown"
    shutil.copytree(delta, grown)
    tok = load_tokenizer(grown)
    tok.add_tokens(["<z_0>", "<z_1>"])
    tok.save_pretrained(grown)
    refused("tokenizer has .* tokens but its embeddings only", base, grown)

    # a base that is neither a folder nor reachable on the hub (offline here)
    refused("not a local folder and could not be fetched", "no-such-org/no-such-model")

    # an existing output folder: refused, then replaced with --overwrite
    out.mkdir()
    (out / "old.txt").write_text("x")
    refused("already exists; pass --overwrite", base, delta, "--dtype", "float32")
    run_merge(base, delta, out, "--dtype", "float32", "--overwrite")
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_merge_refuses_a_base_with_other_weights(tmp_path, capsys):
    """Same shapes, other weights: the recorded base hash refuses it before anything is written;
    --skip_base_check merges anyway; the hash does not depend on the base's file format."""
    base, target, target_sd, _ = save_pair(tmp_path, tie=True, shard=None)
    delta = tmp_path / "delta"
    run_make(base, target, delta)
    info = json.loads((delta / "delta_info.json").read_text())
    assert len(info["base_weights_sha256"]) == 64

    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] += 0.01  # one weight in one tensor
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    for mode in ([], ["--low-cpu-mem"]):
        before = set(tmp_path.iterdir())
        with pytest.raises(DataError, match=rf"{other} is not the base {delta} was made from .*--skip_base_check"):
            run_merge(other, delta, tmp_path / "out", *mode)
        assert set(tmp_path.iterdir()) == before  # nothing written, no temporary folder

    run_merge(other, delta, tmp_path / "forced", "--dtype", "float32", "--skip_base_check")
    forced = load_file(str(tmp_path / "forced" / "model.safetensors"))
    assert not torch.equal(forced["model.layers.0.self_attn.q_proj.weight"],
                           target_sd["model.layers.0.self_attn.q_proj.weight"])

    # the right base as pytorch_model.bin: the same hash, the exact target
    bin_base = tmp_path / "bin-base"
    shutil.copytree(base, bin_base)
    torch.save(load_file(str(bin_base / "model.safetensors")), bin_base / "pytorch_model.bin")
    (bin_base / "model.safetensors").unlink()
    run_merge(bin_base, delta, tmp_path / "from-bin", "--dtype", "float32", "--low-cpu-mem")
    merged = load_file(str(tmp_path / "from-bin" / "model.safetensors"))
    assert all(torch.equal(merged[name], target_sd[name]) for name in merged)

    # a delta made before the hash was recorded still merges, with a note
    old = tmp_path / "old-delta"
    shutil.copytree(delta, old)
    del info["base_weights_sha256"]
    (old / "delta_info.json").write_text(json.dumps(info))
    capsys.readouterr()
    run_merge(other, old, tmp_path / "from-old", "--dtype", "float32")
    assert "records no hash of its base" in capsys.readouterr().err


def test_convert_passthrough_and_resave(tmp_path, tiny_base_model):
    run = tmp_path / "run"
    shutil.copytree(tiny_base_model, run / "checkpoint-5")
    finals = convert.convert_all(run, None, "5GB", overwrite=False)
    assert finals == [run / "final-checkpoint-5"]
    src, dst = run / "checkpoint-5" / "model.safetensors", run / "final-checkpoint-5" / "model.safetensors"
    assert os.path.samefile(src, dst)  # passed through unchanged, as hard links
    convert.main(["-s", str(tiny_base_model), "-t", str(tmp_path / "resaved"), "--dtype", "bfloat16"])
    resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    original = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    assert resaved.dtype == torch.bfloat16
    assert torch.equal(resaved.model.norm.weight, original.model.norm.weight.to(torch.bfloat16))
    with pytest.raises(DataError, match="no checkpoint-<step> folders"):
        convert.convert_all(tmp_path / "resaved", None, "5GB", overwrite=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_convert_sh_consolidates_zero3_checkpoints(tiny_data, tiny_base_model, tmp_path):
    """finetune.py under torchrun (2 CPU processes, ZeRO-3, bf16) saves checkpoint-1 and checkpoint-2 as
    ZeRO shards; convert.sh turns them into HF folders. The best one must give the trained model's
    logits: the final model finetune.py saved (the best checkpoint reloaded by the Trainer)."""
    data_path, _ = tiny_data
    out = tmp_path / "z3"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHON=sys.executable)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", free_port(),
           str(ROOT / "finetune.py"), "--base_model", str(tiny_base_model), "--data_path", str(data_path),
           "--dataset", "Tiny", "--output_dir", str(out), "--max_steps", "2", "--per_device_batch_size", "2",
           "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2", "--only_train_response",
           "--save_and_eval_strategy", "steps", "--save_and_eval_steps", "1",
           "--deepspeed", str(ROOT / "config/ds_z3_bf16.json"), "--bf16"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert convert.has_zero_shards(out / "checkpoint-1") and convert.has_zero_shards(out / "checkpoint-2")

    proc = subprocess.run(["bash", str(ROOT / "convert/convert.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    indices = json.loads(dataset_file(data_path, "Tiny", ".index.json").read_text())
    for step in (1, 2):
        final = out / f"final-checkpoint-{step}"
        assert {"config.json", "generation_config.json", "trainer_state.json", "tokenizer.json",
                "model.safetensors"} <= {p.name for p in final.iterdir()}
        assert "lm_head.weight" not in load_file(str(final / "model.safetensors"))  # tied: saved once
        index_token_ids(load_tokenizer(final), indices)

    # finetune.py saved the best checkpoint's fp32 master weights (its config says bf16, the training dtype)
    best = Path(json.loads((out / "trainer_state.json").read_text())["best_model_checkpoint"]).name
    other = f"final-checkpoint-{3 - int(best.split('-')[1])}"
    load = lambda folder, dtype: AutoModelForCausalLM.from_pretrained(out / folder, dtype=dtype).eval()  # noqa: E731
    consolidated = load(f"final-{best}", None)
    assert consolidated.dtype == torch.float32  # the fp32 master weights
    assert consolidated.lm_head.weight.data_ptr() == consolidated.get_input_embeddings().weight.data_ptr()
    input_ids = torch.arange(len(load_tokenizer(out)))[None, -40:]  # ends with the index tokens
    with torch.no_grad():
        expected = load(".", torch.float32)(input_ids).logits
        assert torch.equal(consolidated(input_ids).logits, expected)
        assert not torch.allclose(load(other, None)(input_ids).logits, expected)  # the checkpoints differ
