"""Item text embeddings: ``<D>.item.json`` to ``<D>.emb-<plm_name>-td.npy`` (float32 [I, d]).

Row i belongs to item i. It is the mean over the fields title and description of each
field's last hidden state of the LLM's base model, mean-pooled over the field's non-padding
tokens. An item whose description is empty is embedded from its title alone.

    python data_process/text_emb.py --dataset ml-100k --data_path ./data \
        --plm_checkpoint ~/.cache/lcrec/SmolLM2-135M-Instruct [--plm_name smollm2]

Texts are sorted by length before batching so that batches carry little padding; padding is
on the right and masked out, so a text's embedding does not depend on its batch.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dataset_files import dataset_file, load_items
from modeling import ensure_pad_token
from utils import DataError, default_dtype, exit_on_data_error, get_device, save_npy_atomic

FIELDS = ("title", "description")


def item_texts(items: dict[str, dict], path: Path) -> list[list[str]]:
    """[[title, description (if not empty)] for item 0..I-1]."""
    n_items = len(items)
    if set(items) != {str(i) for i in range(n_items)}:
        raise DataError(f"{path}: item ids must be the strings '0'..'{n_items - 1}'")
    texts = []
    for i in range(n_items):
        fields = [items[str(i)].get(f, "").strip() for f in FIELDS]
        fields = [t for t in fields if t]
        if not fields:
            raise DataError(f"{path}: item {i} has neither a title nor a description to embed")
        texts.append(fields)
    return texts


def load_encoder(checkpoint: str | Path, device: torch.device, dtype: torch.dtype):
    """(tokenizer, base model) from an HF folder; the LM head is not needed."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder}: not a model folder (config.json not found) for --plm_checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ensure_pad_token(tokenizer, warn=False)  # only used for padding, which is masked out
    tokenizer.padding_side = "right"  # causal attention: real tokens never see right padding
    model = AutoModel.from_pretrained(folder, dtype=dtype).to(device).eval()
    return tokenizer, model


@torch.no_grad()
def embed_texts(texts: list[str], tokenizer, model, batch_size: int = 32, max_length: int = 512,
                desc: str = "embedding") -> np.ndarray:
    """Mean-pooled last hidden states, float32 [len(texts), d], in the order of ``texts``."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    if min(lengths, default=1) == 0:
        raise DataError(f"the tokenizer gives no tokens for text {texts[lengths.index(0)]!r}")
    order = sorted(range(len(texts)), key=lambda k: -lengths[k])  # longest first: memory peaks early
    device = next(model.parameters()).device
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[k] for k in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # [B, T, d]
        mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1)  # [B, d]
        out[idx] = pooled.cpu().numpy()
    return out


def embed_items(items_texts: list[list[str]], tokenizer, model, batch_size: int = 32, max_length: int = 512) -> np.ndarray:
    """float32 [I, d]: per item, the mean of its fields' embeddings."""
    flat = [t for fields in items_texts for t in fields]
    owner = np.repeat(np.arange(len(items_texts)), [len(f) for f in items_texts])  # item of each flat text
    field_emb = embed_texts(flat, tokenizer, model, batch_size, max_length)  # [N, d]
    sums = np.zeros((len(items_texts), field_emb.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, field_emb)
    counts = np.bincount(owner, minlength=len(items_texts))[:, None]
    return (sums / counts).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=str, default="ml-100k")
    parser.add_argument("--data_path", type=str, default="./data", help="folder holding <dataset>/<dataset>.item.json")
    parser.add_argument("--plm_checkpoint", type=str, required=True, help="HF folder of the LLM")
    parser.add_argument("--plm_name", type=str, default="smollm2", help="name used in the output file")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=512, help="tokens kept per field")
    parser.add_argument("--gpu_id", type=int, default=None, help="cuda device (default LOCAL_RANK or 0); cpu without CUDA")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.max_length < 1:
        parser.error("--batch_size and --max_length must be positive")

    with exit_on_data_error():
        item_path = dataset_file(args.data_path, args.dataset, ".item.json")
        texts = item_texts(load_items(item_path), item_path)
        device = get_device(args.gpu_id)
        tokenizer, model = load_encoder(args.plm_checkpoint, device, default_dtype(device))
        print(f"Embedding {len(texts)} items ({sum(map(len, texts))} texts) on {device} "
              f"with {model.config.hidden_size}-d hidden states", flush=True)
        start = time.time()
        emb = embed_items(texts, tokenizer, model, args.batch_size, args.max_length)
        out_path = dataset_file(args.data_path, args.dataset, f".emb-{args.plm_name}-td.npy")
        save_npy_atomic(emb, out_path, what="the item embeddings")
    print(f"Wrote {out_path} {tuple(emb.shape)} {emb.dtype} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
