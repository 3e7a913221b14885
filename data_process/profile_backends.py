"""The two back-ends of data_process/user_profiles.py: a local transformers causal LM (``hf``)
and any OpenAI-compatible chat-completions endpoint (``openai``). Both answer a batch of chat
messages with one string each.
"""
from __future__ import annotations

import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from tqdm import tqdm

from data_process.profile_prompts import Messages
from modeling import ensure_pad_token
from utils import default_dtype, get_device

class BackendError(RuntimeError):
    """A backend that cannot answer (endpoint down, bad key, unknown model): ends the run cleanly."""


# --------------------------------------------------------------------------- backends
def plain_prompt(messages: Messages) -> str:
    """Prompt format for tokenizers without a chat template: role-labelled paragraphs."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


class SentenceStop:
    """Per-row stopping criterion: a row is done once its answer has a complete sentence.

    In the one-sentence answer style stopping here saves most of the decoding budget on CPU.
    A row stops at ". X" (the next word has started) or at a line break after text.
    """

    def __init__(self, tokenizer: Any, prompt_len: int, min_words: int = 6):
        self.tokenizer, self.prompt_len, self.min_words = tokenizer, prompt_len, min_words
        self.end = re.compile(r"[.!?][\"”')]?\s+\S|\S\s*\n")

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = []
        for t in texts:
            m = self.end.search(t.lstrip())
            done.append(bool(m) and len(t.lstrip()[: m.start() + 1].split()) >= self.min_words)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFBackend:
    """A local transformers causal LM; batched, left-padded generation. ``top_p`` applies when
    sampling (None: 0.95); ``stop_at_sentence`` ends a row at its first complete sentence."""

    def __init__(self, model_path: str | os.PathLike, max_new_tokens: int = 32, temperature: float = 0.0,
                 repetition_penalty: float = 1.1, device: Any = None, dtype: Any = None,
                 top_p: float | None = None, stop_at_sentence: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or get_device()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"  # generation continues right after each prompt
        ensure_pad_token(self.tokenizer, warn=False)  # left padding, masked out
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype or default_dtype(self.device))
        self.model.to(self.device).eval()
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.max_new_tokens, self.temperature, self.repetition_penalty = max_new_tokens, temperature, repetition_penalty
        self.top_p = 0.95 if top_p is None else top_p
        self.stop_at_sentence = stop_at_sentence
        self.name = str(model_path)
        self._torch = torch

    def render(self, messages: Messages) -> str:
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_prompt(messages)

    def prompt_length(self, messages: Messages) -> int:
        return len(self.tokenizer(self.render(messages), add_special_tokens=False).input_ids)

    def generate(self, batch: list[Messages], sample: bool = False) -> list[str]:
        from transformers import GenerationConfig, StoppingCriteriaList

        texts = [self.render(m) for m in batch]
        # The chat template already has its special tokens; a plain prompt gets the usual BOS.
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.has_chat_template)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        do_sample = sample or self.temperature > 0
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=do_sample,
            temperature=max(self.temperature, 0.7 if sample else 0.0) if do_sample else None,
            top_p=self.top_p if do_sample else None,
            top_k=None,
            repetition_penalty=self.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        prompt_len = enc["input_ids"].shape[1]
        stop = StoppingCriteriaList([SentenceStop(self.tokenizer, prompt_len)] if self.stop_at_sentence else [])
        with self._torch.inference_mode():
            out = self.model.generate(**enc, generation_config=config, stopping_criteria=stop)
        return self.tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint, with retries and exponential backoff.

    ``batch`` requests run concurrently (one thread each). Transient failures (connection
    errors, timeouts, HTTP 429 and 5xx) are retried up to ``max_retries`` times, waiting
    ``retry_delay * 2**attempt`` seconds (or the server's Retry-After, when longer); other
    HTTP errors (bad key, unknown model) stop the run at once with the server's message.
    """

    def __init__(self, api_base: str, model_name: str, api_key: str = "EMPTY", max_new_tokens: int = 80,
                 temperature: float = 0.0, max_retries: int = 5, retry_delay: float = 1.0, timeout: float = 120.0,
                 concurrency: int = 8, sleep: Callable[[float], None] = time.sleep, top_p: float | None = None):
        import openai

        self._openai = openai
        # Retries are ours (below): the client's own would hide them from the tests and the log.
        self.client = openai.OpenAI(base_url=api_base, api_key=api_key, max_retries=0, timeout=timeout)
        self.model_name, self.max_new_tokens, self.temperature = model_name, max_new_tokens, temperature
        self.top_p = top_p  # None: the server's default (1 for OpenAI's)
        self.max_retries, self.retry_delay, self.concurrency, self.sleep = max_retries, retry_delay, concurrency, sleep
        self.name = f"{api_base} {model_name}"
        self.retries_done = 0

    def prompt_length(self, messages: Messages) -> int:
        return sum(len(m["content"]) for m in messages)

    def _retry_wait(self, error: Exception, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the error is not transient."""
        o = self._openai
        if isinstance(error, (o.APIConnectionError, o.APITimeoutError)):  # timeout is a subclass
            status = None
        elif isinstance(error, o.APIStatusError):
            status = error.status_code
            if status != 429 and status < 500:
                return None
        else:
            return None
        wait = self.retry_delay * 2**attempt * (1 + 0.1 * random.random())
        headers = getattr(getattr(error, "response", None), "headers", None) or {}
        try:
            wait = max(wait, min(float(headers.get("retry-after", 0)), 60.0))
        except ValueError:
            pass
        return wait

    def _one(self, messages: Messages, sample: bool) -> str:
        temperature = max(self.temperature, 0.7) if sample else self.temperature
        for attempt in range(self.max_retries + 1):
            try:
                extra = {} if self.top_p is None else {"top_p": self.top_p}
                reply = self.client.chat.completions.create(
                    model=self.model_name, messages=messages, max_tokens=self.max_new_tokens, temperature=temperature,
                    **extra
                )
                return (reply.choices[0].message.content or "") if reply.choices else ""
            except Exception as e:  # noqa: BLE001 -- sorted into transient / fatal just below
                wait = self._retry_wait(e, attempt)
                if wait is None:
                    raise BackendError(f"--api_base {self.client.base_url}: request failed: {e}") from e
                if attempt == self.max_retries:
                    raise BackendError(
                        f"--api_base {self.client.base_url}: still failing after {self.max_retries} retries: {e}"
                    ) from e
                self.retries_done += 1
                tqdm.write(f"request failed ({type(e).__name__}); retry {attempt + 1}/{self.max_retries} in {wait:.1f}s")
                self.sleep(wait)
        raise AssertionError("unreachable")

    def generate(self, batch: list[Messages], sample: bool = False) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(batch)))) as pool:
            return list(pool.map(lambda m: self._one(m, sample), batch))
