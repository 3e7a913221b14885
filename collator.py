"""Batching for training (prompt + response + eos, right padding, response-only loss) and for
generation (prompt only, left padding).

Prompt and response are tokenized separately and their ids concatenated, so the boundary
between them is exact and the prompt ids at test time equal the prompt ids seen in training.
Padding is found from the attention mask and never by comparing ids with ``pad_token_id``:
in SmolLM2 (and many LLaMA tokenizers) the pad token *is* the EOS token that ends every
response, and that EOS must stay a label or the model never learns to stop.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from modeling import ensure_pad_token

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids as both collators produce them (with the tokenizer's own special tokens, e.g. BOS)."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows],
                        dtype=torch.long)


class TrainCollator:
    """Items ``{"prompt", "response"}`` to ``input_ids``, ``attention_mask``, ``labels`` (right padded).

    ``response_logits_only`` (with ``only_train_response``): the output layer runs on the response
    positions only, where the loss needs it, instead of on every prompt token (its ~50k-row
    matmul and softmax are thrown away there). Rows are then left padded so that every response
    ends at the last position, ``logits_to_keep`` tells the model how many final positions to
    project, ``labels`` holds just those columns, and ``position_ids`` count from each row's
    first real token (as generation does), so loss and gradients equal the right-padded ones.
    """

    def __init__(self, tokenizer, only_train_response: bool = True, model_max_length: int = 2048,
                 response_logits_only: bool = False, history_token_ids: Iterable[int] | None = None):
        self.tokenizer = tokenizer
        self.only_train_response = only_train_response
        self.model_max_length = int(model_max_length)
        self.response_logits_only = bool(response_logits_only and only_train_response)
        # With only_train_response: prompt tokens among these (the index tokens of the history)
        # are labels too, so every history item is a next-item target (see --history_loss).
        self.history_token_ids = frozenset(history_token_ids or ())
        self.pad_id = ensure_pad_token(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; responses could not end")

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        """(ids of prompt + response + eos, which ids are labels), cut to model_max_length."""
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][: self.model_max_length - 1]
        response_ids = response_ids + [self.tokenizer.eos_token_id]  # after the cut: every response ends
        # Too long: drop the oldest prompt tokens and keep the whole response.
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - self.model_max_length):]
        if not self.only_train_response:
            in_loss = [True] * len(prompt_ids)
        else:
            in_loss = [i in self.history_token_ids for i in prompt_ids]
        return prompt_ids + response_ids, in_loss + [True] * len(response_ids)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(b["prompt"], b["response"]) for b in batch]
        if self.response_logits_only:
            return self.response_only(encoded)
        input_ids = _pad([ids for ids, _ in encoded], self.pad_id, left=False)  # [B, T]
        attention_mask = _pad([[1] * len(ids) for ids, _ in encoded], 0, left=False)  # [B, T]
        labels = _pad([[i if keep else IGNORE_INDEX for i, keep in zip(ids, in_loss)] for ids, in_loss in encoded],
                      IGNORE_INDEX, left=False)  # [B, T]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def response_only(self, encoded: list[tuple[list[int], list[bool]]]) -> dict[str, Any]:
        input_ids = _pad([ids for ids, _ in encoded], self.pad_id, left=True)  # [B, T]
        attention_mask = _pad([[1] * len(ids) for ids, _ in encoded], 0, left=True)  # [B, T]
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [B, T]
        # the last `keep` positions: every label, plus the position that predicts the first one
        keep = min(max(len(ids) - in_loss.index(True) for ids, in_loss in encoded) + 1, input_ids.shape[1])
        labels = _pad([[i if lab else IGNORE_INDEX for i, lab in zip(ids[-keep:], in_loss[-keep:])]
                       for ids, in_loss in encoded], IGNORE_INDEX, left=True)  # [B, keep]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "labels": labels, "logits_to_keep": keep}


class TestCollator:
    """Items ``{"prompt", "target", ...}`` to (left-padded encodings, list of target strings)."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, tokenizer, max_prompt_length: int | None = None):
        self.tokenizer = tokenizer
        self.pad_id = ensure_pad_token(tokenizer)
        self.max_prompt_length = max_prompt_length
        self.last_cut: list[bool] = []  # which rows of the last batch were cut

    def encode(self, prompt: str) -> tuple[list[int], bool]:
        """(prompt ids, whether they were cut). Too long: the oldest tokens go, as in training."""
        ids = encode_prompt(self.tokenizer, prompt)
        if self.max_prompt_length is None or len(ids) <= self.max_prompt_length:
            return ids, False
        return ids[len(ids) - self.max_prompt_length:], True

    def __call__(self, batch: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[str]]:
        encoded = [self.encode(b["prompt"]) for b in batch]
        rows = [ids for ids, _ in encoded]
        self.last_cut = [cut for _, cut in encoded]
        encodings = {
            "input_ids": _pad(rows, self.pad_id, left=True),  # [B, T]
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True),  # [B, T]
        }
        return encodings, [b["target"] for b in batch]
