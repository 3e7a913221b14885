"""Loading models and tokenizers, and adding the item-index tokens: the one place that
finetune.py, lora_finetune.py, the evaluation scripts and convert/ share. It owns the tokenizer
side: the tokenizer files, the pad-token fallback and the token ids of the index.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from dataset_files import index_tokens
from utils import DataError, copy_files

# Any one of these makes a folder's tokenizer loadable (fast JSON, sentencepiece, or BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
# Files that make up a tokenizer; whichever exist are copied next to converted weights.
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                        "added_tokens.json", "vocab.json", "merges.txt", "tiktoken.model", "chat_template.jinja",
                        "chat_template.json")


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """A local checkpoint must carry its tokenizer (missing files are a known cause of all-zero metrics)."""
    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub id: transformers resolves it
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(
            f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer saved with the fine-tuned model next to the weights"
        )


def check_model_folder(path: str | os.PathLike, flag: str) -> None:
    """A local model path must be a folder with a readable config.json and weights (a path that
    does not exist is left to transformers as a hub id): otherwise from_pretrained fails with an
    OSError that names neither the flag nor what is missing."""
    import json

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    folder = Path(path)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DataError(f"{flag}: {folder} is a file; expected a model folder (config.json, weights, tokenizer) "
                        "or a hub model id")
    config = folder / "config.json"
    if not config.is_file():
        raise DataError(f"{flag}: {folder} has no config.json; expected a model folder saved by save_pretrained")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8
        raise DataError(f"{flag}: {config} is not valid JSON ({e}); expected the model's config") from e
    weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((folder / name).is_file() for name in weights):
        zero = (folder / "latest").is_file() or any(folder.glob("global_step*"))
        hint = ("; it holds DeepSpeed ZeRO shards: consolidate them with convert/convert.sh" if zero else
                "; was the save cut short, or is this the folder of an unfinished run?")
        raise DataError(f"{flag}: {folder} has config.json but no weights (expected {' or '.join(weights)}){hint}")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of folder ``src`` that exist into ``dst``; returns their names."""
    check_tokenizer_files(src)  # a clear error when the folder has none
    return copy_files(src, dst, TOKENIZER_FILE_NAMES)


def tokenizer_size(path: str | os.PathLike) -> int:
    """Tokens of the tokenizer in ``path``, added tokens included."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(path)))


def ensure_pad_token(tokenizer, warn: bool = True) -> int:
    """The tokenizer's pad id; a tokenizer without one gets pad = eos (else unk), with a warning
    unless ``warn`` is off (where padding is masked out and never trained on)."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad with")
        if warn:
            warnings.warn(f"tokenizer has no pad token; padding with {fallback!r}")
        tokenizer.pad_token = fallback
    return tokenizer.pad_token_id


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ensure_pad_token(tokenizer)
    return tokenizer


def index_token_ids(tokenizer, indices: dict[str, list[str]], where: str = "tokenizer") -> dict[str, list[int]]:
    """Each item's index as token ids, after the one check of the index tokens, made once per load
    (add_index_tokens, load_for_inference): each token is one id, and an item's index string
    encodes to exactly its tokens. That the model has a row for every id is ``check_vocab``."""
    tokens = index_tokens(indices)
    encoded = tokenizer(tokens, add_special_tokens=False)["input_ids"]
    split = {t: len(ids) for t, ids in zip(tokens, encoded) if len(ids) != 1}
    if split:
        first = dict(list(split.items())[:5])
        raise DataError(f"{where}: {len(split)} index tokens do not encode to exactly one id ({first} ids); "
                        "each must be one token in the vocabulary (was this checkpoint trained with this index file?)")
    sample = next(iter(indices.values()))
    ids = tokenizer("".join(sample), add_special_tokens=False)["input_ids"]
    if ids != tokenizer.convert_tokens_to_ids(sample):
        raise DataError(f"{where}: the index string {''.join(sample)} does not encode to its {len(sample)} tokens")
    token_id = {t: ids[0] for t, ids in zip(tokens, encoded)}
    return {item: [token_id[t] for t in toks] for item, toks in indices.items()}


def add_index_tokens(tokenizer, indices: dict[str, list[str]]) -> int:
    """Add the index tokens to the vocabulary (checked to be single ids); returns how many were new."""
    added = tokenizer.add_tokens(index_tokens(indices))
    index_token_ids(tokenizer, indices)
    return added


def check_vocab(model, tokenizer, where: str) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise DataError(f"{where}: the model has {rows} embedding rows but the tokenizer has {len(tokenizer)} "
                        "tokens; the checkpoint does not hold the index tokens")


def init_index_tokens(model, tokenizer, indices: dict[str, list[str]], item_vectors: dict[str, "torch.Tensor"]) -> int:
    """Start each index token from vectors of the items it names (item_vectors.py), instead of 1024
    near-copies of one vector the model must first pull apart.

    Each code's centred mean item vector (item_vectors.code_vectors) is placed around the pretrained
    rows' mean with the pretrained rows' spread, so the codes differ from each other as much as
    ordinary tokens do. Codes with no item vector keep their start. Returns how many tokens were set."""
    import torch

    from item_vectors import code_vectors

    codes = code_vectors(indices, item_vectors)
    if not codes:
        return 0
    emb = model.get_input_embeddings().weight  # [V, H]
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in index_tokens(indices)}
    first_new = min(token_ids.values())
    with torch.no_grad():
        old = emb[:first_new].float()  # [V_old, H]
        old_mean = old.mean(0)  # [H]
        old_spread = (old - old_mean).norm(dim=1).mean()
        offsets = torch.stack(list(codes.values()))  # [C, H]
        offsets *= old_spread / offsets.norm(dim=1).mean().clamp(min=1e-8)
        rows = [token_ids[t] for t in codes]
        emb[rows] = (old_mean + offsets).to(emb.dtype)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():  # untied head: same start
            out.weight[rows] = emb[rows].to(out.weight.dtype)
    return len(codes)


def load_for_training(base_model: str, indices: dict[str, list[str]], dtype=None, titles: dict[str, str] | None = None,
                      mean_resizing: bool = True, inters: dict[str, list[int]] | None = None, **model_kwargs):
    """Base model + tokenizer with the index tokens added and the embeddings resized (tied stay tied).
    New rows: transformers' mean resizing, or (``mean_resizing=False``) the model's own weight
    init, as older transformers did; with ``titles`` ({item: title}) they start from the titles,
    with ``inters`` ({user: items}) from the items' co-occurrence in the training parts
    (init_index_tokens; one of the two at a time). ``dtype`` (a torch dtype, its name or "auto"): the
    weights' dtype, which without DeepSpeed is also the master weights' (finetune.py --torch_dtype);
    None leaves transformers 5's default, the checkpoint's own."""
    from transformers import AutoModelForCausalLM

    from item_vectors import collab_vectors, title_vectors

    if not base_model:
        raise DataError("--base_model: a model folder or hub id is required")
    check_model_folder(base_model, "--base_model")
    if titles is not None and inters is not None:
        raise ValueError("load_for_training: titles and inters are two starts of the index rows; give one")
    tokenizer = load_tokenizer(base_model)
    add_index_tokens(tokenizer, indices)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(base_model, **model_kwargs)
    if model.get_input_embeddings().weight.shape[0] != len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
    if titles is not None:
        item_titles = {item: titles.get(item, "") for item in indices}
        init_index_tokens(model, tokenizer, indices,
                          title_vectors(model.get_input_embeddings().weight.detach(), tokenizer, item_titles))
    elif inters is not None:
        width = model.get_input_embeddings().weight.shape[1]
        init_index_tokens(model, tokenizer, indices, collab_vectors(inters, list(indices), width))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_for_inference(ckpt_path: str, indices: dict[str, list[str]], dtype=None, device=None,
                       lora: bool = False, base_model: str | None = None):
    """A fine-tuned checkpoint (or a LoRA adapter on ``base_model``) ready for generation, in eval mode.

    Checks: tokenizer files exist, index tokens are single ids, embeddings cover the vocabulary.
    """
    from transformers import AutoModelForCausalLM

    if lora and base_model:
        check_model_folder(base_model, "--base_model")
    elif not lora:
        check_model_folder(ckpt_path, "--ckpt_path")
    tokenizer = load_tokenizer(ckpt_path)
    index_token_ids(tokenizer, indices, where=str(ckpt_path))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if lora:
        from peft import PeftModel

        if not base_model:
            raise DataError("--lora needs --base_model (the model the adapter was trained on)")
        model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows come from the adapter
        model = PeftModel.from_pretrained(model, ckpt_path)
        model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt_path, **kwargs)
    check_vocab(model, tokenizer, str(ckpt_path))
    model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def cast_linear_weights(model, dtype) -> int:
    """Stores every fp32 linear layer's weight and bias in ``dtype`` once, for a model that only
    ever runs under autocast to ``dtype`` (CPU bf16 decoding); returns the layers cast.

    Autocast casts each fp32 weight at every matmul and keeps the cast only until its outermost
    ``torch.autocast`` block ends, so every request (or batch) of a decoding loop paid for the cast
    of all weights again (23 ms for the 135M model's LM head alone on 2 cores). The stored copies
    are the ones autocast makes (the same rounding), so the results do not change. A layer whose
    weight is shared with an embedding (a tied LM head) gets its own copy, and the embedding keeps
    its fp32 rows, as under autocast. Inference only: the copies do not train."""
    import torch
    from torch import nn

    cast = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            cast += 1
    return cast


def can_pack_linear_weights() -> bool:
    """Whether this torch has oneDNN's packed linear (the ops inductor's CPU freezing uses)."""
    import torch

    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _packed_linear_forward(self, x):  # bound to an nn.Linear by pack_linear_weights
    import torch

    return torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.packed_weight, self.bias, "none", [], "")


def pack_linear_weights(model, rows: int = 20) -> int:
    """Gives every CPU linear layer whose weight is bf16 (``cast_linear_weights``) a copy of it in
    oneDNN's blocked layout, and routes its forward through oneDNN's linear on that copy; returns
    the layers packed (0 where this torch lacks the ops: ``can_pack_linear_weights``).

    A plain bf16 matmul re-lays out the weight at every call; with it laid out once, an answer of
    recommend.py (a 173-row prefill, then steps of 20 rows) took about 15% less on a 2-core CPU with
    avx512_bf16. The products are bit-identical to ``F.linear`` (and so to fp32 weights under bf16
    autocast): answers do not change. ``rows`` is the row count the layout is chosen for (the
    beams of a decoding step; 20 and 173 measured alike, none at all much slower for long prompts).
    The dense weight stays (other code reads it), so the linear weights take twice their memory.
    Inference only: the packed path has no gradient."""
    import types

    import torch
    from torch import nn

    if not can_pack_linear_weights():
        return 0
    packed = 0
    for module in model.modules():
        if (isinstance(module, nn.Linear) and module.weight.dtype == torch.bfloat16
                and module.weight.device.type == "cpu"):
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)
            module.forward = types.MethodType(_packed_linear_forward, module)
            packed += 1
    return packed


def keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (every recent causal LM of transformers),
    looking through a PEFT wrapper; training (response-only logits), decoding and reinforcement ask here."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
