"""Shared plumbing: the one argument parser, seeding, device choice, atomic writes and the
loading (with validation) of the dataset files described in SPEC section 4.

Every script imports from here; scripts in sub-folders (``index/``, ``data_process/``,
``convert/``) find it once the repository is installed (``pip install -e .``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ALL_TASKS = ("seqrec", "item2index", "index2item", "fusionseqrec", "itemsearch", "preferenceobtain")
TEST_TASKS = ("seqrec", "itemsearch", "fusionseqrec")
DEFAULT_METRICS = "hit@1,hit@5,hit@10,ndcg@5,ndcg@10"
MIN_INTERACTIONS = 3  # leave-one-out needs a train, a validation and a test item


class DataError(ValueError):
    """Bad input: the message names the file, field or flag and what was expected."""


@contextlib.contextmanager
def exit_on_data_error(*also: type[Exception]) -> Iterator[None]:
    """End a script on bad input (a DataError, or one of ``also``) with one line ``error: <message>``
    on stderr and exit status 1, not a traceback: the message already says what to fix."""
    try:
        yield
    except (DataError, *also) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file keeps the target's suffix so that writers which look at the extension
    (numpy, matplotlib, torch) behave as for the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should read like ordinary files
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int | None = None) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)


def write_jsonl_atomic(rows: list[dict], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")




def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = False) -> None:
    """Fail before any work when output file ``path`` (or, with ``is_dir``, output folder ``path``)
    cannot be created or written: a run that ends in a PermissionError loses its work."""
    folder = Path(path) if is_dir else Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        where = "" if is_dir else f" its folder {folder}"
        raise DataError(f"{flag} {path}:{where} cannot be created or written ({e.strerror or e})") from e


def write_results(results: dict, path: str | os.PathLike, table: str, flag: str = "--results_file") -> None:
    """Print the metrics table, then write the results JSON; a failed write names the file and
    says that the metrics are printed above."""
    print(table, flush=True)
    try:
        write_json_atomic(results, path, indent=2)
    except OSError as e:
        raise DataError(f"{flag} {path}: could not write the results ({e.strerror or e}); "
                        "the metrics are printed above") from e
    print(f"results: {path}")


def save_npy_atomic(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it becomes ``path`` only on success.

    An existing ``path`` is refused (before any work) unless ``overwrite``; then it is replaced
    only once the new folder is complete. On failure nothing is left behind.
    """
    import shutil

    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path}: output folder already exists; pass {flag} to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "replaced")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- dataset files
def dataset_file(data_path: str | os.PathLike, dataset: str, suffix: str) -> Path:
    """``<data_path>/<D>/<D><suffix>``, e.g. suffix ``.inter.json`` or ``.index.json``."""
    return Path(data_path) / dataset / f"{dataset}{suffix}"


def load_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: {what} file is not valid JSON ({e})") from e


def load_inters(path: str | os.PathLike) -> dict[str, list[int]]:
    """``{"<user>": [item, ...]}`` with integer items and at least 3 interactions per user."""
    data = load_json(path, "interaction")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object {{user: [item, ...]}}")
    inters: dict[str, list[int]] = {}
    for user, items in data.items():
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise DataError(f"{path}: user {user!r} must map to a list of integer item ids")
        if len(items) < MIN_INTERACTIONS:
            raise DataError(
                f"{path}: user {user!r} has {len(items)} interactions; leave-one-out needs at least {MIN_INTERACTIONS}"
            )
        inters[str(user)] = items
    return inters


def load_items(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{"<item>": {"title": str, "description": str, ...}}``."""
    data = load_json(path, "item")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object {{item: {{title, description}}}}")
    for item, feat in data.items():
        if not isinstance(feat, dict) or not isinstance(feat.get("title"), str):
            raise DataError(f"{path}: item {item!r} needs a string field 'title'")
        if not isinstance(feat.get("description", ""), str):
            raise DataError(f"{path}: item {item!r} field 'description' must be a string")
    return data


def load_indices(path: str | os.PathLike, required_items: Any = None) -> dict[str, list[str]]:
    """``{"<item>": ["<a_12>", "<b_200>", ...]}``: equal lengths, all distinct.

    ``required_items`` (ints or strings) must each have an index.
    """
    data = load_json(path, "index")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty object {{item: [token, ...]}}")
    for item, tokens in data.items():
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise DataError(f"{path}: item {item!r} must map to a non-empty list of token strings")
    # The most common length is the norm, so the message blames the odd items, not the first one.
    lengths = Counter(len(v) for v in data.values())
    expected_len = lengths.most_common(1)[0][0]
    odd = [item for item, tokens in data.items() if len(tokens) != expected_len]
    if odd:
        shown = ", ".join(f"{item!r} (length {len(data[item])})" for item in odd[:5])
        raise DataError(f"{path}: {len(odd)} items have an index whose length differs from the other items' "
                        f"{expected_len}: {shown}{' ...' if len(odd) > 5 else ''}")
    seen: dict[tuple[str, ...], str] = {}
    for item, tokens in data.items():
        key = tuple(tokens)
        if key in seen:
            raise DataError(f"{path}: items {seen[key]!r} and {item!r} share the index {''.join(tokens)}; indices must be distinct")
        seen[key] = item
    if required_items is not None:
        missing = sorted({str(i) for i in required_items} - set(data), key=lambda s: (len(s), s))
        if missing:
            raise DataError(f"{path}: {len(missing)} items have no index (first: {missing[:5]})")
    return data


def index_tokens(indices: dict[str, list[str]]) -> list[str]:
    """All distinct index tokens, sorted by level then code, for adding to a tokenizer."""
    def level_and_code(token: str) -> tuple:
        m = re.fullmatch(r"<([a-z]+)_(\d+)>", token)
        return (m.group(1), int(m.group(2)), token) if m else (token, -1, token)

    return sorted({t for toks in indices.values() for t in toks}, key=level_and_code)


# --------------------------------------------------------------------------- runtime
def set_seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(gpu_id: int | None = None) -> "torch.device":  # noqa: F821
    """cuda:<gpu_id> (or LOCAL_RANK under torchrun) when CUDA exists, else cpu."""
    import torch

    if torch.cuda.is_available():
        if gpu_id is None:
            gpu_id = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", gpu_id)
    return torch.device("cpu")


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """Native bf16 arithmetic on this CPU (avx512_bf16 or AMX on x86, the bf16 extension on Arm),
    read from ``/proc/cpuinfo`` (or the text given). Without it torch emulates bf16 matmuls,
    which then run slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    info = cpuinfo
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", info) is not None


def default_dtype(device: "torch.device") -> "torch.dtype":  # noqa: F821
    """bf16 on GPUs that support it, fp32 on CPU (bf16 matmuls are slow and lossy there)."""
    import torch

    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def parse_list(value: str, cast: type = str, flag: str = "") -> list:
    """``"a,b,c"`` to a list; a clear error names the flag on a bad element."""
    out = []
    for part in (p.strip() for p in str(value).split(",")):
        if part == "":
            continue
        try:
            out.append(cast(part))
        except ValueError as e:
            raise DataError(f"{flag}: could not read {part!r} as {cast.__name__} in {value!r}") from e
    return out


# --------------------------------------------------------------------------- arguments
def _add_global_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("global")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--base_model", type=str, default=None, help="base LLM folder or hub id")
    g.add_argument("--output_dir", type=str, default="./ckpt/", help="where checkpoints go")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--data_path", type=str, default="./data", help="folder holding <dataset>/<dataset>.*.json")
    g.add_argument("--dataset", type=str, default="Instruments")
    g.add_argument("--index_file", type=str, default=".index.json", help="joined to the dataset: <D>/<D><index_file>")
    g.add_argument("--user_file", type=str, default=".user.json", help="joined to the dataset: <D>/<D><user_file>")
    g.add_argument("--tasks", type=str, default=",".join(ALL_TASKS), help="comma-separated training tasks")
    g.add_argument("--max_his_len", type=int, default=20, help="history length kept (last items)")
    g.add_argument("--add_prefix", action="store_true", help="number the history items: '1. <a_..>'")
    g.add_argument("--his_sep", type=str, default=", ", help="separator between history items")
    g.add_argument("--only_train_response", action="store_true", help="loss on the response tokens only")
    g.add_argument("--train_prompt_sample_num", type=str, default="1,1,1,1,1,1", help="templates per example, per task")
    g.add_argument("--train_data_sample_num", type=str, default="0,0,0,100000,0,0", help="examples per task (0 = all)")
    g.add_argument("--valid_prompt_id", type=int, default=0)
    g.add_argument("--sample_valid", action="store_true", default=True, help="sample validation templates")
    g.add_argument("--no_sample_valid", dest="sample_valid", action="store_false")
    g.add_argument("--valid_prompt_sample_num", type=int, default=2)
    g.add_argument("--valid_sample_num", type=int, default=0, help="validation users to keep (0 = all)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--optim", type=str, default="adamw_torch")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (quick runs)")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--per_device_batch_size", type=int, default=8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=2)
    g.add_argument("--logging_step", type=int, default=10)
    g.add_argument("--model_max_length", type=int, default=2048)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--warmup_ratio", type=float, default=0.01)
    g.add_argument("--lr_scheduler_type", type=str, default="cosine")
    g.add_argument("--save_and_eval_strategy", type=str, default="epoch", choices=["epoch", "steps", "no"])
    g.add_argument("--save_and_eval_steps", type=int, default=1000)
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--deepspeed", type=str, default=None, help="DeepSpeed config JSON")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--curve_steps", type=int, default=0,
                   help="every N steps, score --curve_users validation users with the constrained beam search "
                        "(the learning curve, in <output_dir>/learning_curve.json); 0 = off")
    g.add_argument("--curve_users", type=int, default=100, help="validation users of the learning curve (seeded)")
    g.add_argument("--curve_beams", type=int, default=20, help="beams of the learning curve's search")
    g.add_argument("--curve_batch_size", type=int, default=8, help="prompts per batch of the learning curve")
    g.add_argument("--history_loss", action="store_true",
                   help="with --only_train_response, also train on the index tokens of the history in the prompt: "
                        "each history item becomes a next-item target (off in the paper)")
    g.add_argument("--index_token_init", type=str, default="mean", choices=["mean", "normal", "title"],
                   help="start of the new index-token embeddings: mean (transformers' mean resizing), normal (the "
                        "model's weight init, N(0, initializer_range), what the original's transformers did) or "
                        "title (the mean embedding of the titles of the items under each code)")
    g.add_argument("--index_softmax", type=str, default="none", choices=["none", "level", "trie"],
                   help="the loss on an index token: a softmax over the whole vocabulary (none, the paper), over "
                        "the codes of its level (level), or over the codes the item trie allows after the "
                        "item's earlier tokens (trie: the choice constrained decoding makes)")
    g.add_argument("--full_logits", dest="response_logits_only", action="store_false",
                   help="run the output layer on every token; by default (with --only_train_response) it runs "
                        "on the response positions only, which gives the same loss and gradients, faster")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--report_to", type=str, default="none")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    g = p.add_argument_group("lora")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=int, default=32)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument(
        "--lora_target_modules", type=str, default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )
    g.add_argument("--lora_modules_to_save", type=str, default="embed_tokens,lm_head")
    g.add_argument("--load_in_8bit", action="store_true")
    g.add_argument("--load_in_4bit", action="store_true")


def _add_test_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("test")
    g.add_argument("--ckpt_path", type=str, default=None, help="fine-tuned checkpoint (or LoRA adapter with --lora)")
    g.add_argument("--lora", action="store_true", help="ckpt_path is a LoRA adapter on --base_model")
    g.add_argument("--filter_items", action="store_true", help="drop generations that are not items")
    g.add_argument("--results_file", type=str, default="./results/test.json")
    g.add_argument("--save_predictions", action="store_true", help="also write each example's ranked items")
    g.add_argument("--test_batch_size", type=int, default=1)
    g.add_argument("--num_beams", type=int, default=20)
    g.add_argument("--sample_num", type=int, default=-1, help="test examples to use (-1 = all)")
    g.add_argument("--gpu_id", type=int, default=0)
    g.add_argument("--test_prompt_ids", type=str, default="0", help="'all' or comma-separated template ids")
    g.add_argument("--metrics", type=str, default=DEFAULT_METRICS)
    g.add_argument("--test_task", type=str, default="seqrec", help="seqrec, itemsearch or fusionseqrec")
    g.add_argument("--model_max_length", type=int, default=2048,
                   help="prompts longer than this (less the index and EOS) lose their oldest tokens, as in training")
    g.add_argument("--oom_backoff", action="store_true", help="on CUDA OOM retry the batch with fewer beams")
    g.add_argument("--decoding", type=str, default="trie", choices=["trie", "position", "none"],
                   help="trie: only real items (default); position: any token seen at each index position "
                        "(the original rule, may produce non-items); none: unconstrained")
    g.add_argument("--no_share_prefill", action="store_true",
                   help="run each prompt once per beam inside generate instead of once, then sharing its cache")
    g.add_argument("--beam_search", type=str, default="trie", choices=["trie", "hf"],
                   help="trie: beam search over the index trie's allowed tokens only (default, fast); "
                        "hf: transformers' generate with the trie as a logits processor (same ranking)")
    g.add_argument("--score_softmax", type=str, default="auto", choices=["auto", "full", "level", "trie"],
                   help="normalise each step's beam scores over the whole vocabulary (full), the level's codes "
                        "(level) or the trie's allowed codes (trie), as finetune.py --index_softmax trained; "
                        "auto: what the checkpoint's config.json records (full when nothing)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))


def _add_recommend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recommend")
    g.add_argument("--user", type=str, default=None, help="a user of <D>.inter.json: their test-time history")
    g.add_argument("--history", type=str, default=None, help='typed history, oldest first: "Title one; Title two"')
    g.add_argument("--history_ids", type=str, default=None, help="typed history as item ids: 12,40,7")
    g.add_argument("--query", type=str, default=None, help="a request in plain words (alone or with a history)")
    g.add_argument("--k", type=int, default=10, help="items to return")
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--serve", action="store_true", help="serve the web page and its JSON API instead")
    g.add_argument("--host", type=str, default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)


def build_parser(stage: str, description: str | None = None) -> argparse.ArgumentParser:
    """The one parser. ``stage`` is "train" (finetune.py, lora_finetune.py), "test" (test.py,
    test_ddp.py) or "recommend" (the test flags and the request flags)."""
    if stage not in ("train", "test", "recommend"):
        raise ValueError(f"stage must be 'train', 'test' or 'recommend', got {stage!r}")
    p = argparse.ArgumentParser(description=description, conflict_handler="resolve")
    _add_global_args(p)
    _add_dataset_args(p)
    (_add_train_args if stage == "train" else _add_test_args)(p)
    if stage == "recommend":
        _add_recommend_args(p)
    return p


def check_task_args(args: argparse.Namespace) -> None:
    """SPEC section 7: task lists of equal length and known names."""
    tasks = parse_list(args.tasks, str, "--tasks")
    if not tasks:
        raise DataError(f"--tasks: no task given; expected comma-separated names from {list(ALL_TASKS)}")
    unknown = [t for t in tasks if t.lower() not in ALL_TASKS]
    if unknown:
        raise DataError(f"--tasks: unknown task(s) {unknown}; expected names from {list(ALL_TASKS)}")
    prompt_nums = parse_list(args.train_prompt_sample_num, int, "--train_prompt_sample_num")
    data_nums = parse_list(args.train_data_sample_num, int, "--train_data_sample_num")
    for flag, nums in (("--train_prompt_sample_num", prompt_nums), ("--train_data_sample_num", data_nums)):
        negative = [n for n in nums if n < 0]
        if negative:
            raise DataError(f"{flag}: {negative} are negative; expected counts >= 0 per task (0 = all)")
    for flag in ("curve_steps", "curve_users", "curve_beams", "curve_batch_size"):
        value = getattr(args, flag, 1)
        if value < 0 or (value == 0 and flag != "curve_steps"):
            expected = "0 (off) or a number of steps" if flag == "curve_steps" else "a positive number"
            raise DataError(f"--{flag}: {value} is not allowed; expected {expected}")
    if getattr(args, "valid_sample_num", 0) < 0:
        raise DataError(f"--valid_sample_num: {args.valid_sample_num} is negative; expected a count >= 0 (0 = all)")
    if not (len(tasks) == len(prompt_nums) == len(data_nums)):
        raise DataError(
            f"--tasks has {len(tasks)} entries, --train_prompt_sample_num {len(prompt_nums)} and "
            f"--train_data_sample_num {len(data_nums)}; they must have one entry per task"
        )


def parse_args(stage: str, argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    parser = build_parser(stage, description)
    args = parser.parse_args(argv)
    if stage == "test":
        args.test_task = args.test_task.lower()  # the original accepts any case
    if stage == "train":
        try:
            check_task_args(args)
        except DataError as e:
            parser.error(str(e))
    return args
