"""Faults a careless user or a full disk brings: training flags that train nothing, saves that fail
for lack of space or permission (one line each: what, where, why, nothing half-written used, how to
resume), and the messages of unreadable inputs."""
import contextlib
import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
import lora_finetune
from utils import DataError, SaveError, atomic_path, saving, write_failure, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = os.strerror(errno.ENOSPC)


def train_cli(base, data_path, out, *extra):
    return ["--base_model", str(base), "--data_path", str(data_path), "--dataset", "Tiny", "--output_dir", str(out),
            "--per_device_batch_size", "2", "--gradient_accumulation_steps", "1", "--only_train_response",
            "--logging_step", "1", *extra]


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str):
    """(folder, True): a tmpfs of ``size`` mounted at the folder, where this machine allows it (root
    with mount rights); else (folder, False): an ordinary folder, and the test injects
    OSError(ENOSPC) at the write instead. Which one is printed (pytest -rP shows it)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    print(f"full disk: {'a real ' + size + ' tmpfs' if mounted else 'OSError(ENOSPC) injected at the write'}")
    try:
        yield folder, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)


def assert_one_line(message: str, what: str, where: Path, resume: str):
    assert "\n" not in message
    assert re.search(rf"^could not write {what} to {re.escape(str(where))}: {NO_SPACE}; nothing half-written "
                     rf"will be used \(.+\); free space there, then {resume}", message), message


# --------------------------------------------------------------------------- failed saves
def test_full_disk_during_a_checkpoint_save(tiny_data, tiny_base_model, tmp_path, monkeypatch):
    """The tiny model's checkpoint is its weights (132 KB) then the optimizer state (277 KB) through
    torch.save, whose zip writer fails with "[enforce fail at inline_container.cc] unexpected pos",
    no errno: the disk is asked."""
    with small_disk(tmp_path, "256k") as (disk, real):
        if not real:
            save = torch.save
            monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: disk_full() if str(f).endswith("optimizer.pt")
                                else save(obj, f, *a, **k))
        out = disk / "out"
        with pytest.raises(SaveError) as e:
            finetune.main(train_cli(tiny_base_model, tiny_data[0], out, "--max_steps", "2",
                                    "--save_and_eval_strategy", "steps", "--save_and_eval_steps", "1"))
        print(e.value)
        assert_one_line(str(e.value), "the checkpoint", out / "checkpoint-1",
                        r"resume with: python .* --resume_from_checkpoint true \(it continues from the newest complete")
        assert finetune.checkpoint_step(out / "checkpoint-1") is None  # a resume skips it
        assert finetune.resume_arg("true", out) is None and not finetune.final_model_complete(out)


def test_full_disk_during_the_final_save(tiny_data, tiny_base_model, tmp_path, monkeypatch):
    """The final model's safetensors write fails ("... No space left on device (os error 28)")."""
    with small_disk(tmp_path, "64k") as (disk, real):
        if not real:
            import transformers.modeling_utils

            monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
        out = disk / "out"
        with pytest.raises(SaveError) as e:
            finetune.main(train_cli(tiny_base_model, tiny_data[0], out, "--max_steps", "1",
                                    "--save_and_eval_strategy", "no"))
        print(e.value)
        assert_one_line(str(e.value), "the final model", out, r"resume with: python .* --resume_from_checkpoint true")
        assert not finetune.final_model_complete(out) and not (out / ".final.tmp").exists()  # its space given back


def test_full_disk_while_writing_the_embeddings(tiny_data, tiny_base_model, tmp_path, monkeypatch, capsys):
    """A script's output file (here data_process/text_emb.py's): its own command is the one to rerun."""
    from data_process import text_emb

    with small_disk(tmp_path, "64k") as (disk, real):
        shutil.copytree(tiny_data[0], disk / "data")
        if real:
            with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as f:
                while True:  # fill what is left
                    f.write(b"\0" * 4096)
        else:
            monkeypatch.setattr(np, "save", disk_full)
        with pytest.raises(SystemExit) as e:
            text_emb.main(["--data_path", str(disk / "data"), "--dataset", "Tiny", "--plm_checkpoint",
                           str(tiny_base_model), "--plm_name", "tiny"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        print(err)
        target = disk / "data" / "Tiny" / "Tiny.emb-tiny-td.npy"
        assert e.value.code == 1 and err.startswith("error: ")
        assert_one_line(err[len("error: "):], "the item embeddings", target, "rerun: python ")
        assert sorted(p.name for p in target.parent.iterdir()) == ["Tiny.index.json", "Tiny.inter.json",
                                                                   "Tiny.item.json", "Tiny.user.json"]


def test_a_failed_write_is_told_by_its_os_reason(tmp_path):
    """Each shape a failed write takes: an OSError's errno, safetensors' "(os error N)", torch's zip
    writer (no errno: a full disk is found by asking it), a permission refused; other errors pass."""
    assert write_failure(OSError(errno.ENOSPC, NO_SPACE), tmp_path) == (NO_SPACE, errno.ENOSPC)
    safetensors_error = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure(safetensors_error, tmp_path) == (NO_SPACE, errno.ENOSPC)
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60800 vs 60688")
    reason, code = write_failure(torch_error, tmp_path)  # tmp_path's disk is not full
    assert code is None and "inline_container" in reason
    assert write_failure(ValueError("not a write"), tmp_path) is None
    unreadable_input = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere/base/model.safetensors")
    assert write_failure(unreadable_input, tmp_path / "out") is None  # a read, not the write
    assert write_failure(PermissionError(errno.EACCES, "x", str(tmp_path / ".out.tmp")), tmp_path / "out")

    with pytest.raises(SaveError, match=r"could not write the index file to .*x\.json: Permission denied; .*; "
                                        r"make it writable, then rerun: python "):
        with atomic_path(tmp_path / "x.json", "the index file"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    with pytest.raises(KeyError):  # not a write: unchanged
        with saving("x", tmp_path, "y"):
            raise KeyError("z")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").write_text("")  # a file where the output's folder should be
    with pytest.raises(SaveError, match=r"could not write the results to .*b\.json: File exists; .*fix that, then "):
        write_json_atomic({}, tmp_path / "a" / "b.json", what="the results")
    assert issubclass(SaveError, DataError)  # every script prints it as one line, exit status 1


# --------------------------------------------------------------------------- flags that train nothing
@pytest.mark.parametrize("script", [finetune, lora_finetune], ids=["finetune", "lora"])
@pytest.mark.parametrize("flags,blamed", [(["--max_steps", "0"], "--max_steps: 0 trains nothing"),
                                          (["--max_steps", "-5"], "--max_steps: -5 trains nothing"),
                                          (["--epochs", "0"], r"--epochs: 0 trains nothing \(--max_steps is -1\)")])
def test_settings_that_train_nothing_are_refused_before_the_model_loads(tiny_data, tiny_base_model, tmp_path,
                                                                       monkeypatch, capsys, script, flags, blamed):
    monkeypatch.setattr(finetune, "load_for_training", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        script.main(train_cli(tiny_base_model, tiny_data[0], tmp_path / "out", *flags))
    assert e.value.code == 2 and re.search(blamed, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- unreadable inputs
def test_a_data_file_that_is_not_utf8_is_named(tiny_data, tiny_base_model, capsys):
    """The one JSON loader of the dataset files (test.py, recommend.py and text_emb.py read through it)."""
    from data_process import text_emb
    from dataset_files import dataset_file, load_inters

    data_path, name = tiny_data
    items = dataset_file(data_path, name, ".item.json")
    items.write_bytes(items.read_bytes().replace(b"The ", b"The \xe9", 1))  # a Latin-1 byte
    with pytest.raises(SystemExit) as e:
        text_emb.main(["--data_path", str(data_path), "--dataset", name, "--plm_checkpoint", str(tiny_base_model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1
    assert re.fullmatch(rf"error: {re.escape(str(items))}: item file is not UTF-8 text \(byte 0xe9 at offset \d+\); "
                        r"expected JSON in UTF-8 .*", err[0])
    inters = dataset_file(data_path, name, ".inter.json")
    inters.write_bytes(b"\xff\xfe" + inters.read_bytes())  # a UTF-16 byte-order mark
    with pytest.raises(DataError, match=rf"{re.escape(str(inters))}: interaction file is not UTF-8 text \(byte 0xff"):
        load_inters(inters)


def test_a_base_model_that_is_a_file_or_has_a_broken_config_is_named(tiny_data, tiny_base_model, tmp_path):
    as_file = tmp_path / "model.safetensors"
    as_file.write_bytes((tiny_base_model / "model.safetensors").read_bytes())
    with pytest.raises(DataError, match=rf"^--base_model: {re.escape(str(as_file))} is a file; expected a model"):
        finetune.main(train_cli(as_file, tiny_data[0], tmp_path / "out", "--max_steps", "1"))

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_model, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')  # cut short
    with pytest.raises(DataError, match=rf"^--base_model: {re.escape(str(broken / 'config.json'))} is not valid JSON"):
        finetune.main(train_cli(broken, tiny_data[0], tmp_path / "out", "--max_steps", "1"))


def test_a_checkpoint_folder_without_weights_is_named(tiny_data, tiny_base_model, tmp_path):
    from arguments import parse_args
    from evaluation import evaluate_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_base_model, ckpt)
    (ckpt / "model.safetensors").unlink()
    args = parse_args("test", ["--ckpt_path", str(ckpt), "--data_path", str(tiny_data[0]), "--dataset", "Tiny",
                               "--results_file", str(tmp_path / "r.json")])
    with pytest.raises(DataError, match=rf"^--ckpt_path: {re.escape(str(ckpt))} has config.json but no weights "
                                        r"\(expected model.safetensors or .*\); was the save cut short"):
        evaluate_checkpoint(args)
    (ckpt / "global_step4").mkdir()  # a DeepSpeed checkpoint
    with pytest.raises(DataError, match="holds DeepSpeed ZeRO shards: consolidate them with convert/convert.sh"):
        evaluate_checkpoint(args)


def test_run_sh_puts_the_repository_on_the_module_path(tmp_path):
    """Without `pip install -e .` the scripts run.sh starts still import data_process, index, utils:
    the Python it starts has the repository first on PYTHONPATH."""
    import sys

    fake = tmp_path / "python"  # records the PYTHONPATH run.sh gives its Python, then runs it
    fake.write_text(f'#!/bin/sh\nprintf "%s" "$PYTHONPATH" > "{tmp_path}/seen"\nexec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROFILE", "DATASET")}
    out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**env, "DRY_RUN": "1", "PYTHON": str(fake)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = (tmp_path / "seen").read_text()
    assert seen.split(":")[0] == str(ROOT)
    where = subprocess.run([sys.executable, "-c", "import data_process.common, index.codes, utils; "
                            "print(data_process.common.__file__, index.codes.__file__, utils.__file__)"],
                           cwd=tmp_path, env={**env, "PYTHONPATH": seen}, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(Path(f).is_relative_to(ROOT) for f in where.stdout.split())
