"""Small synthetic inputs shared by the tests: a dataset in the SPEC formats, a tokenizer
trained on the fly, and a tiny random LlamaForCausalLM. Nothing is downloaded."""
from __future__ import annotations

import json
import random
from pathlib import Path

GENRES = ["action", "comedy", "drama", "horror", "romance", "thriller", "sci-fi", "western"]
WORDS = ["red", "blue", "night", "river", "king", "star", "city", "ghost", "summer", "dream", "iron", "road"]


def make_indices(n_items: int, levels: int = 3, codes: int = 4, seed: int = 0) -> dict[str, list[str]]:
    """Distinct random indices <a_i><b_j>..., one list per item."""
    rng = random.Random(seed)
    prefixes = "abcdefgh"
    assert codes**levels >= n_items
    seen: set[tuple[int, ...]] = set()
    out: dict[str, list[str]] = {}
    for item in range(n_items):
        while True:
            code = tuple(rng.randrange(codes) for _ in range(levels))
            if code not in seen:
                seen.add(code)
                break
        out[str(item)] = [f"<{prefixes[lvl]}_{c}>" for lvl, c in enumerate(code)]
    return out


def make_dataset(root: Path, name: str = "Tiny", n_users: int = 15, n_items: int = 24, levels: int = 3,
                 codes: int = 4, seed: int = 0, with_users: bool = True, unique_items: bool = False) -> Path:
    """Write <root>/<name>/<name>.{inter,item,index,user}.json and return <root>.

    ``unique_items``: no item repeats within a user's sequence (so items can be told apart by value)."""
    rng = random.Random(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    if unique_items:
        inters = {str(u): rng.sample(range(n_items), rng.randint(4, 9)) for u in range(n_users)}
    else:
        inters = {str(u): [rng.randrange(n_items) for _ in range(rng.randint(4, 9))] for u in range(n_users)}
    items = {
        str(i): {
            "title": f"The {rng.choice(WORDS)} {rng.choice(WORDS)} {i}",
            "description": f"A {rng.choice(GENRES)} film about the {rng.choice(WORDS)}.",
        }
        for i in range(n_items)
    }
    (folder / f"{name}.inter.json").write_text(json.dumps(inters))
    (folder / f"{name}.item.json").write_text(json.dumps(items))
    (folder / f"{name}.index.json").write_text(json.dumps(make_indices(n_items, levels, codes, seed)))
    if with_users:
        pref = {u: [f"Likes {rng.choice(GENRES)} films.", f"Lately into {rng.choice(GENRES)}."] for u in inters}
        intent = {"train": {}, "test": {}}
        for u, seq in inters.items():
            intent["train"][u] = {"item": seq[-3], "inters": seq[:-3],
                                  "querys": ["I want something gripping.", f"A {rng.choice(GENRES)} story."]}
            intent["test"][u] = {"item": seq[-1], "inters": seq[:-1],
                                 "querys": ["Something for tonight.", f"A {rng.choice(GENRES)} tale."]}
        user = {"user_explicit_preference": pref, "user_vague_intention": intent}
        (folder / f"{name}.user.json").write_text(json.dumps(user))
    return Path(root)


def train_tokenizer(extra_texts: list[str] | None = None, vocab_size: int = 600):
    """A byte-level BPE tokenizer trained in memory. pad == eos, as in SmolLM2, on purpose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(WORDS + GENRES)] * 5 + list(extra_texts or [])
    corpus += ["Below is an instruction that describes a task. Write a response that appropriately completes the request.",
               "### Instruction:", "### Response:", "The user has watched the following items in order."]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def make_tiny_model(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, tie: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=tie,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config)


def make_indexed_tiny_model():
    """A tokenizer with the index tokens of a 24-item, 3-level index added, and a tiny random model in
    eval mode over that vocabulary -> (tokenizer, model, indices)."""
    from dataset_files import index_tokens

    indices = make_indices(24, levels=3, codes=4, seed=1)
    tok = train_tokenizer()
    tok.add_tokens(index_tokens(indices))
    return tok, make_tiny_model(len(tok), seed=3).eval(), indices


def save_tiny_checkpoint(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random base model + trained tokenizer saved as an HF folder (no index tokens)."""
    tok = train_tokenizer()
    model = make_tiny_model(len(tok), hidden, layers, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
