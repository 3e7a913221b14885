"""What a fine-tuned checkpoint was trained on, recorded in its config.json and checked by every
script that uses it.

finetune.py stores ``training_record`` in the model config (beside ``index_softmax``): a content
hash of the index file and its item count, the prompt settings (``arguments.PROMPT_SETTINGS``),
the tasks and their sample numbers, and a hash of the prompt templates. test.py, test_ddp.py and
recommend.py then take the prompt settings from it (a flag given by hand wins, with a note), refuse
an index file whose hash differs, and note templates that differ; a resumed finetune.py refuses a
run whose tasks, sample numbers or prompt settings differ from the checkpoint's. A checkpoint
written before the record existed loads with a note that nothing could be checked.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from arguments import PROMPT_SETTINGS, parse_list, training_default
from dataset_files import dataset_file
from prompt import BUILTIN
from utils import DataError

RECORD_KEY = "training_record"  # the config.json field
# fields a resumed run must share with its checkpoint (the data it trains on)
RESUME_FIELDS = ("tasks", "train_prompt_sample_num", "train_data_sample_num", "max_his_len", "his_sep",
                 "add_prefix", "index_sha256", "prompt_templates_sha256")
FLAG_OF = {"tasks": "--tasks", "train_prompt_sample_num": "--train_prompt_sample_num",
           "train_data_sample_num": "--train_data_sample_num", "index_sha256": "the index file",
           "prompt_templates_sha256": "the prompt templates"}


def index_sha256(indices: dict[str, list[str]]) -> str:
    """A hash of which item has which index (key order and JSON layout do not matter)."""
    text = json.dumps(indices, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def index_path(args: argparse.Namespace) -> str:
    """The index file as an absolute path (a recorded relative one would depend on the folder run from)."""
    return str(dataset_file(args.data_path, args.dataset, args.index_file).resolve())


def training_record(args: argparse.Namespace, indices: dict[str, list[str]], prompts) -> dict[str, Any]:
    """The record finetune.py saves in the model config (JSON values only)."""
    return {
        "dataset": args.dataset, "index_file": index_path(args), "index_sha256": index_sha256(indices),
        "num_items": len(indices), **{name: getattr(args, name) for name in PROMPT_SETTINGS},
        "tasks": [t.lower() for t in parse_list(args.tasks, str, "--tasks")],
        "train_prompt_sample_num": parse_list(args.train_prompt_sample_num, int, "--train_prompt_sample_num"),
        "train_data_sample_num": parse_list(args.train_data_sample_num, int, "--train_data_sample_num"),
        "prompt_templates": prompts.source if prompts is BUILTIN else str(Path(prompts.source).resolve()),
        "prompt_templates_sha256": prompts.sha256,
    }


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The record in ``folder/config.json``; None for a checkpoint without one (or without config.json,
    as a LoRA adapter folder)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = config.get(RECORD_KEY) if isinstance(config, dict) else None
    return record if isinstance(record, dict) else None


def shown(name: str, value: Any) -> str:
    """A recorded value as it is written on the command line."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    if name.endswith("sha256"):
        return str(value)[:12]
    return repr(value) if isinstance(value, str) else str(value)


def apply_prompt_settings(args: argparse.Namespace, record: dict | None, ckpt: str,
                          note: Callable[[str], None]) -> None:
    """Fill the prompt settings left unset (None) from the record, else the training defaults; a
    flag given by hand stays, with a note where it differs from the record."""
    for name in PROMPT_SETTINGS:
        given = getattr(args, name, None)
        trained = record.get(name) if record else None
        if given is None:
            setattr(args, name, trained if trained is not None else training_default(name))
        elif trained is not None and given != trained:
            note(f"--{name} {shown(name, given)} given by hand; {ckpt} was trained with {shown(name, trained)} "
                 "(the flag is used)")


def check_index(record: dict, indices: dict[str, list[str]], args: argparse.Namespace, ckpt: str,
                note: Callable[[str], None]) -> None:
    """Refuse an index file other than the one the checkpoint was trained with (by content); with
    ``--allow_index_mismatch``, a note says which two differ."""
    if record.get("index_sha256") in (None, index_sha256(indices)):
        return
    what = (f"{index_path(args)} ({len(indices)} items, sha256 {index_sha256(indices)[:12]}) is not the index "
            f"{ckpt} was trained with ({record.get('index_file')}, {record.get('num_items')} items, sha256 "
            f"{str(record['index_sha256'])[:12]})")
    if getattr(args, "allow_index_mismatch", False):
        note(f"--allow_index_mismatch: {what}; the items are ranked by codes the model learned for other items")
        return
    raise DataError(f"--index_file: {what}; pass --allow_index_mismatch to use it anyway")


def check_templates(record: dict, prompts, ckpt: str, note: Callable[[str], None]) -> None:
    trained = record.get("prompt_templates_sha256")
    if trained is not None and trained != prompts.sha256:
        note(f"prompt templates: {ckpt} was trained with {record.get('prompt_templates')} (sha256 "
             f"{trained[:12]}), these are {prompts.source} (sha256 {prompts.sha256[:12]}); the figures are not "
             f"those of the training prompts (--prompt_templates {record.get('prompt_templates')} to use them)")


def check_checkpoint(args: argparse.Namespace, indices: dict[str, list[str]], prompts,
                     note: Callable[[str], None]) -> dict | None:
    """Everything an evaluation checks before loading the weights of ``args.ckpt_path``: prompt
    settings filled in, the index refused when it differs, templates noted. Returns the record."""
    ckpt = str(args.ckpt_path)
    record = read_record(ckpt)
    if record is None:
        note(f"{ckpt}/config.json records nothing of its training (written before checkpoints recorded it, or a "
             "LoRA adapter folder): the index file, prompt settings and templates could not be checked")
    apply_prompt_settings(args, record, ckpt, note)
    if record is not None:
        check_index(record, indices, args, ckpt, note)
        check_templates(record, prompts, ckpt, note)
    return record


def check_resume(checkpoint: str, current: dict[str, Any], force: bool, note: Callable[[str], None]) -> None:
    """Refuse resuming ``checkpoint`` with other tasks, sample numbers, prompt settings, index or
    templates than it was trained with (``--force_resume`` for the deliberate case)."""
    record = read_record(checkpoint)
    if record is None:
        note(f"resume: {checkpoint}/config.json records nothing of its training; tasks, sample numbers and "
             "history length could not be checked")
        return
    differ = [name for name in RESUME_FIELDS if name in record and record[name] != current.get(name)]
    if not differ:
        return
    what = "; ".join(f"{FLAG_OF.get(n, '--' + n)}: {shown(n, record[n])} in the checkpoint, "
                     f"{shown(n, current.get(n))} now" for n in differ)
    if force:
        note(f"resume: --force_resume: {checkpoint} was trained otherwise ({what})")
        return
    raise DataError(f"--resume_from_checkpoint {checkpoint} was trained otherwise ({what}); pass the checkpoint's "
                    "values, or --force_resume to resume anyway")
