"""The six alignment-task datasets (training and validation) and the three test datasets.

Splits are leave-one-out (SPEC section 4): for a user with items ``s``, ``s[-1]`` is the test
item, ``s[-2]`` the validation item and ``s[:-2]`` the training part. No training example of
any task ever contains ``s[-2]`` or ``s[-1]`` by position.

Every dataset is a list of *examples* (a dict of raw fields) plus, per example, the templates it
can be rendered with. A training item is ``{"prompt", "response"}``; which template renders it
is drawn at ``__getitem__`` from an RNG keyed on (seed, epoch, example), so it is re-drawn each
epoch (``set_epoch``) and identical on every rank. Fields with several candidates (a user's
preference sentences, the itemsearch query) are drawn the same way, from a second RNG keyed on
the example and its template slot; at test time that RNG is keyed on (seed, user, template id),
so a test set renders identically on every run with the same seed, whatever ``--sample_num``
keeps. Test items are ``{"prompt", "target", "user"}``.
"""
from __future__ import annotations

import argparse
import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

import prompt
from arguments import check_task_args, parse_list, training_default
from dataset_files import (dataset_file, held_out, intention_target, load_indices, load_inters, load_items,
                           load_user_profiles, train_part)
from utils import DataError

# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class DatasetFiles:
    """The validated contents of one dataset folder (shared by every task dataset)."""

    inters: dict[str, list[int]]
    items: dict[str, dict[str, Any]]
    indices: dict[str, list[str]]

    def index_str(self, item: int | str) -> str:
        return "".join(self.indices[str(item)])


@functools.lru_cache(maxsize=4)
def _load_files(data_path: str, dataset: str, index_file: str) -> DatasetFiles:
    inter_path = dataset_file(data_path, dataset, ".inter.json")
    item_path = dataset_file(data_path, dataset, ".item.json")
    index_path = dataset_file(data_path, dataset, index_file)
    inters = load_inters(inter_path)
    used = {i for seq in inters.values() for i in seq}
    indices = load_indices(index_path, required_items=used)  # SPEC 7: every item needs an index
    items = load_items(item_path)
    missing = sorted({str(i) for i in used} - set(items), key=lambda s: (len(s), s))
    if missing:
        raise DataError(f"{item_path}: {len(missing)} items of {inter_path.name} have no entry (first: {missing[:5]})")
    return DatasetFiles(inters, items, indices)


def load_files(args: argparse.Namespace) -> DatasetFiles:
    return _load_files(str(args.data_path), args.dataset, args.index_file)


def load_item_indices(args: argparse.Namespace) -> dict[str, list[str]]:
    """``{item: [token, ...]}`` of the dataset, validated against its interactions."""
    return load_files(args).indices


@functools.lru_cache(maxsize=4)
def _load_user_file(path: str, data_path: str, dataset: str) -> dict[str, Any]:
    return load_user_profiles(path, load_inters(dataset_file(data_path, dataset, ".inter.json")))


def load_user_file(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """One top-level section of ``<D>.user.json`` (needed by itemsearch and preferenceobtain)."""
    path = dataset_file(args.data_path, args.dataset, args.user_file)
    if not path.is_file():
        raise DataError(
            f"{path}: user profile file not found; the itemsearch and preferenceobtain tasks need it "
            "(build it with data_process/user_profiles.py or drop those tasks from --tasks)"
        )
    return _load_user_file(str(path), str(args.data_path), args.dataset)[section]


def seeded_subset(n: int, sample_num: int, key: str) -> list[int]:
    """Sorted positions of a seeded random subset of ``sample_num`` out of ``n`` (all when
    ``sample_num`` is not in 1..n-1)."""
    if 0 < sample_num < n:
        return sorted(random.Random(key).sample(range(n), sample_num))
    return list(range(n))


def test_subset_key(seed: int) -> str:
    """The seed key of ``--sample_num`` test subsets: every test task and baseline scores the same users."""
    return f"{seed}:test"


def _sentence(text: str) -> str:
    """Trim, and end with punctuation so that the text can be followed by another sentence."""
    text = " ".join(str(text).split())
    return text if not text or text[-1] in ".!?" else text + "."


# --------------------------------------------------------------------------- base class


class TaskDataset(Dataset):
    """What every task shares: files, history formatting, template sampling.

    Subclasses fill ``self.examples`` with dicts of raw fields (``user``, ``history`` as a list
    of items, ``item``, ...) and may override ``fields`` to turn them into template fields.
    """

    task: str = ""

    def __init__(self, args: argparse.Namespace, mode: str = "train", prompt_sample_num: int = 1,
                 sample_num: int = 0, prompt_id: int | None = None):
        if mode not in ("train", "valid", "test"):
            raise ValueError(f"mode must be train, valid or test, got {mode!r}")
        # Negative counts used to slip through as "all"; 0 is the only way to ask for everything.
        if int(prompt_sample_num) < 0:
            raise DataError(f"{self.task}: prompt sample number {prompt_sample_num} is negative; "
                            "expected >= 0 (0 = every template)")
        if int(sample_num) < 0:
            raise DataError(f"{self.task}: data sample number {sample_num} is negative; expected >= 0 (0 = all)")
        self.args = args
        self.mode = mode
        self.seed = int(args.seed)
        # an evaluation parser leaves these None until a checkpoint's record fills them (checkpoint_record.py)
        setting = {name: training_default(name) if getattr(args, name, None) is None else getattr(args, name)
                   for name in ("max_his_len", "add_prefix", "his_sep")}
        self.max_his_len = int(setting["max_his_len"])
        self.add_prefix = bool(setting["add_prefix"])
        self.his_sep = setting["his_sep"]
        self.prompt_sample_num = int(prompt_sample_num)
        self.prompt_id = prompt_id
        self.epoch = 0
        self.files = load_files(args)
        self.prompts = prompt.prompt_set(args)  # --prompt_templates, or this repository's templates
        self.templates = self.prompts.task(self.task)
        self.template_needs = [prompt.template_fields(t) for t in self.templates]
        self.examples: list[dict[str, Any]] = self.build_examples()
        if sample_num and 0 < sample_num < len(self.examples):
            # test subsets ignore the task so that seqrec and fusionseqrec score the same users
            key = test_subset_key(self.seed) if mode == "test" else f"{self.seed}:{self.task}:{mode}"
            self.examples = [self.examples[i] for i in seeded_subset(len(self.examples), sample_num, key)]
        # Templates each example can use: those whose fields are all non-empty for it.
        # Test sets keep every user (an empty field renders empty) so that all ids see the same users.
        allowed = range(len(self.templates)) if prompt_id is None else [prompt_id]
        self.choices = []
        for ex in self.examples:
            missing = set() if mode == "test" else self.missing_fields(ex)  # once per example, not per template
            self.choices.append([t for t in allowed if not self.template_needs[t] & missing])
        keep = [i for i, c in enumerate(self.choices) if c]
        self.examples = [self.examples[i] for i in keep]
        self.choices = [self.choices[i] for i in keep]

    # ------------------------------------------------------------------ to override
    def build_examples(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def fields(self, ex: dict[str, Any], rng: random.Random) -> dict[str, str]:
        """Template fields of an example; the base covers items, histories and item text."""
        out: dict[str, str] = {}
        if "history" in ex:
            out["history"] = self.format_history(ex["history"], by="index")
            out["title_history"] = self.format_history(ex["history"], by="title")
        if "item" in ex:
            feat = self.files.items[str(ex["item"])]
            out["item"] = self.files.index_str(ex["item"])
            out["title"] = self.title_of(ex["item"])
            out["description"] = " ".join(str(feat.get("description", "")).split())
        return out

    # ------------------------------------------------------------------ shared helpers
    def recent(self, items: list[int]) -> list[int]:
        return items[-self.max_his_len:] if self.max_his_len > 0 else list(items)

    def title_of(self, item: int | str) -> str:
        """The item's title with whitespace collapsed ("" when it has none)."""
        return " ".join(str(self.files.items[str(item)].get("title", "")).split())

    def format_history(self, items: list[int], by: str = "index") -> str:
        """The last ``max_his_len`` items as index strings (or quoted titles), numbered with add_prefix.

        ``by="title"``: items of that window without a title (empty or blank) are left out, since
        an empty ``""`` tells the model nothing and an index string would mix the two
        modalities that fusionseqrec keeps apart; numbering (add_prefix) counts the items shown.
        When no item of the window has a title the result is "" and ``missing_fields`` reports
        ``title_history``, so training never draws a title-history template for that example.
        """
        if by == "index":
            texts = [self.files.index_str(item) for item in self.recent(items)]
        elif by == "title":
            texts = [f'"{t}"' for t in map(self.title_of, self.recent(items)) if t]
        else:
            raise ValueError(f"by must be 'index' or 'title', got {by!r}")
        return self.his_sep.join(f"{k}. {t}" if self.add_prefix else t for k, t in enumerate(texts, start=1))

    def missing_fields(self, ex: dict[str, Any]) -> set[str]:
        """Fields that would render empty for this example (cheap: no string building)."""
        missing = set()
        if "history" in ex and not ex["history"]:
            missing |= {"history", "title_history"}
        elif "history" in ex and not any(self.title_of(i) for i in self.recent(ex["history"])):
            missing.add("title_history")
        if "item" in ex:
            feat = self.files.items[str(ex["item"])]
            missing |= {f for f in ("title", "description") if not str(feat.get(f, "")).strip()}
        return missing

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, example_idx: int) -> random.Random:
        epoch = self.epoch if self.mode == "train" else 0  # evaluation sets are fixed
        return random.Random(f"{self.seed}:{self.task}:{self.mode}:{epoch}:{example_idx}")

    def _field_rng(self, example_idx: int, slot: int, template_id: int) -> random.Random:
        """RNG of the field draws (preference sentence, query) of one access.

        Training: keyed on (epoch, example, slot), so each of an example's k templates draws on
        its own and every epoch draws again. Test: keyed on (user, template id), so a user's
        draw does not depend on which users ``--sample_num`` keeps, and reruns agree.
        """
        if self.mode == "test":
            key = f"0:user={self.examples[example_idx].get('user')}:tid={template_id}"
        else:
            epoch = self.epoch if self.mode == "train" else 0
            key = f"{epoch}:{example_idx}:{slot}"
        return random.Random(f"{self.seed}:{self.task}:{self.mode}:fields:{key}")

    def _per_example(self) -> int:
        if self.prompt_id is not None:
            return 1
        return self.prompt_sample_num if self.prompt_sample_num > 0 else len(self.templates)

    def template_of(self, idx: int) -> tuple[int, int, random.Random]:
        """(example index, template id, rng for the fields) of dataset item ``idx``."""
        k = self._per_example()
        ex_idx, slot = divmod(idx, k)
        choices = self.choices[ex_idx]
        if self.prompt_id is not None:
            tid = self.prompt_id
        elif self.prompt_sample_num <= 0:  # every template once (those that fit; others repeat the first fits)
            tid = slot if slot in choices else choices[slot % len(choices)]
        else:
            # k distinct templates per example (with repeats only when fewer fit): one shared
            # order per example and epoch, read at position `slot`
            order = self._rng(ex_idx).sample(choices, len(choices))
            tid = order[slot % len(order)]
        return ex_idx, tid, self._field_rng(ex_idx, slot, tid)

    def __len__(self) -> int:
        return len(self.examples) * self._per_example()

    def render(self, idx: int) -> tuple[str, str, dict[str, Any]]:
        ex_idx, tid, rng = self.template_of(idx)
        ex = self.examples[ex_idx]
        p, r = self.prompts.render(self.templates[tid], self.fields(ex, rng))
        return p, r, ex

    def __getitem__(self, idx: int) -> dict[str, str]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        p, r, ex = self.render(idx)
        if self.mode == "test":
            return {"prompt": p, "target": self.files.index_str(ex["item"]), "user": str(ex["user"])}
        return {"prompt": p, "response": r}

    # ------------------------------------------------------------------ split helpers
    def history_examples(self) -> list[dict[str, Any]]:
        """Leave-one-out examples: every prefix of s[:-2] (train), s[:-2] -> s[-2], s[:-1] -> s[-1]."""
        out = []
        for user, seq in self.files.inters.items():
            if self.mode == "train":
                train = train_part(seq)
                out += [{"user": user, "history": train[:i], "item": train[i], "pos": i} for i in range(1, len(train))]
            else:
                history, item = held_out(seq, self.mode)
                out.append({"user": user, "history": history, "item": item, "pos": len(history)})
        return out


# --------------------------------------------------------------------------- the six tasks


class SeqRecDataset(TaskDataset):
    task = "seqrec"

    def build_examples(self):
        return self.history_examples()


class FusionSeqRecDataset(TaskDataset):
    task = "fusionseqrec"

    def build_examples(self):
        return self.history_examples()


class ItemDataset(TaskDataset):
    """All items of the index file that have text: item2index and index2item."""

    def __init__(self, args, mode="train", prompt_sample_num=1, sample_num=0, prompt_id=None):
        if mode != "train":
            raise ValueError(f"{self.task} has only a training split")
        super().__init__(args, mode, prompt_sample_num, sample_num, prompt_id)

    def build_examples(self):
        items = [i for i in self.files.indices if i in self.files.items]
        return [{"item": i} for i in sorted(items, key=lambda s: (len(s), s))]


class Item2IndexDataset(ItemDataset):
    task = "item2index"


class Index2ItemDataset(ItemDataset):
    task = "index2item"


def _texts(values: Any) -> list[str]:
    """The non-empty strings of a list (anything else is skipped)."""
    return [v for v in values if isinstance(v, str) and v.strip()] if isinstance(values, list) else []


class ItemSearchDataset(TaskDataset):
    """Explicit preference + vague intention (+ history) -> item. Users of the user file only.

    Train: the intention about s[-3] with history s[:-3]; test: about s[-1] with history s[:-1].
    At each access one of the user's preference sentences is drawn for ``{explicit_preference}``
    and one of the two intentions (user-related or item-related) for ``{query}``; templates 1 and
    2 name the user-related and the item-related intention themselves (see prompt.py).
    """

    task = "itemsearch"

    def build_examples(self):
        if self.mode == "valid":
            raise ValueError("itemsearch has no validation split")
        # the file is validated once, on loading: each intention is about its split's item
        intentions = load_user_file(self.args, "user_vague_intention")[self.mode]
        preferences = load_user_file(self.args, "user_explicit_preference")
        out = []
        for user, rec in intentions.items():
            out.append({"user": str(user), "history": rec["inters"], "item": rec["item"], "pos": len(rec["inters"]),
                        "querys": rec["querys"], "preferences": _texts(preferences.get(str(user)))})
        return out

    def missing_fields(self, ex):
        missing = super().missing_fields(ex)
        names = ("user_related_intention", "item_related_intention")
        missing |= {n for n, q in zip(names, ex["querys"]) if not q.strip()}
        if not any(q.strip() for q in ex["querys"]):
            missing.add("query")
        return missing | (set() if ex["preferences"] else {"explicit_preference"})

    def fields(self, ex, rng):
        out = super().fields(ex, rng)
        out["user_related_intention"] = _sentence(ex["querys"][0])
        out["item_related_intention"] = _sentence(ex["querys"][1])
        # Both draws happen at every access, in a fixed order, so a template's draw does not
        # depend on which fields it happens to use.
        prefs = ex["preferences"]
        out["explicit_preference"] = _sentence(rng.choice(prefs)) if prefs else ""
        queries = [q for q in ex["querys"] if q.strip()]
        out["query"] = _sentence(rng.choice(queries)) if queries else ""
        return out


class PreferenceObtainDataset(TaskDataset):
    """History s[:-3] -> explicit preference: one example per user, one of the user's preference
    sentences drawn at each access (so a new one each epoch)."""

    task = "preferenceobtain"

    def build_examples(self):
        if self.mode != "train":
            raise ValueError("preferenceobtain has only a training split")
        out = []
        for user, prefs in load_user_file(self.args, "user_explicit_preference").items():
            # the preferences were drawn from the history of the train intention only
            history = intention_target(self.files.inters[str(user)], "train")[1]
            out.append({"user": str(user), "history": history, "preferences": _texts(prefs)})
        return out

    def missing_fields(self, ex):
        # a user without any usable sentence has nothing to learn from: dropped by the base class
        return super().missing_fields(ex) | (set() if ex["preferences"] else {"explicit_preference"})

    def fields(self, ex, rng):
        out = super().fields(ex, rng)
        out["explicit_preference"] = " ".join(rng.choice(ex["preferences"]).split()) if ex["preferences"] else ""
        return out


TASK_DATASETS: dict[str, type[TaskDataset]] = {
    "seqrec": SeqRecDataset,
    "item2index": Item2IndexDataset,
    "index2item": Index2ItemDataset,
    "fusionseqrec": FusionSeqRecDataset,
    "itemsearch": ItemSearchDataset,
    "preferenceobtain": PreferenceObtainDataset,
}


# --------------------------------------------------------------------------- loading by task name


class MultiTaskDataset(ConcatDataset):
    """The training mixture; ``set_epoch`` reaches every task so templates are re-drawn."""

    def __init__(self, datasets: list[TaskDataset]):
        super().__init__(datasets)
        self.tasks = [d.task for d in datasets]

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_epoch(epoch)


def load_datasets(args: argparse.Namespace) -> tuple[MultiTaskDataset, TaskDataset]:
    """(train mixture of ``--tasks``, seqrec validation set) with the per-task sample numbers."""
    check_task_args(args)
    tasks = [t.lower() for t in parse_list(args.tasks, str, "--tasks")]
    prompt_nums = parse_list(args.train_prompt_sample_num, int, "--train_prompt_sample_num")
    data_nums = parse_list(args.train_data_sample_num, int, "--train_data_sample_num")
    train = []
    for task, k, n in zip(tasks, prompt_nums, data_nums):
        ds = TASK_DATASETS[task](args, "train", prompt_sample_num=k, sample_num=n)
        if len(ds) == 0:
            raise DataError(f"task {task}: no training examples in {Path(args.data_path) / args.dataset}")
        train.append(ds)
    valid_num = max(int(args.valid_sample_num), 0)
    if args.sample_valid and int(args.valid_prompt_sample_num) < 0:
        raise DataError(f"--valid_prompt_sample_num: {args.valid_prompt_sample_num} is negative; "
                        "expected >= 0 (0 = every template)")
    if args.sample_valid:
        valid = SeqRecDataset(args, "valid", prompt_sample_num=args.valid_prompt_sample_num, sample_num=valid_num)
    else:
        valid = SeqRecDataset(args, "valid", prompt_id=args.valid_prompt_id, sample_num=valid_num)
    return MultiTaskDataset(train), valid


def normalize_test_task(task: str) -> str:
    """``--test_task`` is case-insensitive: "SeqRec" -> "seqrec"; an unknown name is refused."""
    name = str(task).strip().lower()
    if name not in ("seqrec", "itemsearch", "fusionseqrec"):
        raise DataError(f"--test_task: {task!r} is not a test task; expected seqrec, itemsearch or fusionseqrec")
    return name


def test_prompt_ids(task: str, prompts: prompt.PromptSet = prompt.BUILTIN) -> list[int]:
    """Template ids of ``task`` whose response is an item index (fusionseqrec: the index-output ones)."""
    return prompts.item_output_ids(normalize_test_task(task))


def resolve_prompt_ids(spec: str, task: str, prompts: prompt.PromptSet = prompt.BUILTIN) -> list[int]:
    """``all`` -> every item-output template of ``task``; else the listed ids, checked."""
    valid = test_prompt_ids(task, prompts)
    if str(spec).strip().lower() == "all":
        return list(valid)
    ids = parse_list(spec, int, "--test_prompt_ids")
    bad = [i for i in ids if i not in valid]
    if bad or not ids:
        raise DataError(f"--test_prompt_ids: {bad or spec!r} not usable for {task}; "
                        f"its item-output templates are {valid}")
    return ids


def load_test_dataset(args: argparse.Namespace, task: str, prompt_id: int) -> TaskDataset:
    """Test set of ``task`` rendered with template ``prompt_id``: items {"prompt", "target", "user"}.

    ``args.sample_num`` (-1 = all) keeps a seeded random subset of users, the same for every id.
    """
    task = normalize_test_task(task)
    ids = test_prompt_ids(task, prompt.prompt_set(args))
    if prompt_id not in ids:
        raise DataError(f"--test_prompt_ids: {prompt_id} is not an item-output template of {task}; valid ids: {ids}")
    sample_num = int(args.sample_num)
    return TASK_DATASETS[task](args, "test", sample_num=max(sample_num, 0), prompt_id=prompt_id)
