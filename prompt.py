"""Prompt templates of the six alignment tasks and the instruction wrapper around them.

Every example becomes ``wrap(instruction)`` followed by the response:

    <PREAMBLE>

    ### Instruction:
    <instruction>

    ### Response:
    <response>

The templates are plain data: one list of ``{"instruction": ..., "response": ...}`` dicts per
task in ``TEMPLATES``. To add a template, append a dict to a list; placeholders are filled with
``str.format`` from the fields a dataset provides (see ``FIELDS``). A template id is its position
in its task's list, so append new templates at the end to keep existing ids stable.

``--prompt_templates FILE.json`` replaces the wrapper and the templates with a file's
(``{"wrapper": "...{instruction}...{response}", "templates": {task: [...]}}``, checked on load by
``check_prompt_set``); convert/original_prompts.py writes such a file from the original LC-Rec
``prompt.py``. Every script reaches the templates through ``prompt_set(args)``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import DataError

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_HEADER = "### Instruction:"
RESPONSE_HEADER = "### Response:"

# Fields each task's dataset fills in (templates may use any subset of them).
#   history        the user's past items as indices, "<a_1><b_2><c_3>, <a_4>..." (his_sep, add_prefix)
#   title_history  the same items by title, each in double quotes
#   item           the index string of the item in question, "<a_1><b_2><c_3>"
#   title, description            text of that item
#   explicit_preference           one of the user's preference sentences
#   user_related_intention, item_related_intention   the two vague intentions of the user file
#   query                         one of those two intentions, drawn at each access
FIELDS = {
    "seqrec": ("history", "item"),
    "item2index": ("item", "title", "description"),
    "index2item": ("item", "title", "description"),
    "fusionseqrec": ("history", "title_history", "item", "title", "description"),
    "itemsearch": ("history", "item", "explicit_preference", "user_related_intention", "item_related_intention",
                   "query"),
    "preferenceobtain": ("history", "explicit_preference"),
}

ITEM_RESPONSE = "{item}"  # the response of every index-output template (what evaluation scores)


def _t(instruction: str, response: str = ITEM_RESPONSE) -> dict[str, str]:
    return {"instruction": instruction, "response": response}


TEMPLATES: dict[str, list[dict[str, str]]] = {
    # ------------------------------------------------------------------ history -> next index
    "seqrec": [
        _t("Here are the items a user has interacted with, in chronological order: {history}. "
           "Which item will the user interact with next?"),
        _t("A user's interaction history, oldest first, is {history}. Predict the next item this user will choose."),
        _t("Given the sequence of items {history} that a user engaged with, recommend the item they are most "
           "likely to engage with next."),
        _t("The user has consumed these items one after another: {history}. Suggest the item that should come next."),
        _t("Based on the items this user has previously interacted with ({history}), what is the next item they "
           "will pick?"),
        _t("Look at this ordered record of a user's interactions: {history}. Guess the item that follows."),
        _t("Interaction history: {history}. Using this history, name the item the user will most probably "
           "interact with next."),
        _t("A customer went through the items {history} in this order. Recommend one item for them to try next."),
        _t("From the chronological interactions {history}, infer the user's taste and output the next item "
           "they will want."),
        _t("These are the items a user enjoyed, listed by time: {history}. What should we recommend to them now?"),
        _t("You are a recommender system. The user's recent activity is {history}. Output the index of the "
           "next item."),
        _t("Considering that the user interacted with {history}, determine which item they are going to "
           "interact with after that."),
        _t("Sequence of past items: {history}. Continue the sequence with the item the user will choose next."),
        _t("The following items show what a user has been interested in over time: {history}. Predict their "
           "next interaction."),
        _t("Please recommend the next item for a user whose history is {history}."),
        _t("Given that a user interacted with the items {history} in turn, which item is the natural next "
           "step for them?"),
        _t("Analyse the user's history {history} and forecast the item they will select next."),
    ],
    # ------------------------------------------------------------------ text -> index
    # 0-5: title, 6-11: description, 12-18: both (the original's 6 / 6 / 7 split).
    "item2index": [
        _t('Which item has the title "{title}"?'),
        _t('What is the index of the item titled "{title}"?'),
        _t('Give the identifier of the item called "{title}".'),
        _t('An item is named "{title}". Output its index.'),
        _t('Find the item whose title is "{title}".'),
        _t('Map the title "{title}" to the corresponding item index.'),
        _t('An item is described as follows: "{description}". Which item is it?'),
        _t('Identify the item that matches this description: "{description}".'),
        _t('Here is an item\'s description: "{description}". Output the item\'s index.'),
        _t('Which item does the description "{description}" refer to?'),
        _t('Find the index of the item with the description "{description}".'),
        _t('Description: "{description}". Give the item it describes.'),
        _t('The item titled "{title}" is described as "{description}". What is its index?'),
        _t('Identify the item with the title "{title}" and the description "{description}".'),
        _t('Title: "{title}". Description: "{description}". Output the matching item.'),
        _t('Which item is called "{title}" and described by "{description}"?'),
        _t('Using both the title "{title}" and the description "{description}", find the item\'s index.'),
        _t('An item named "{title}" has the following description: "{description}". Give its index.'),
        _t('Both the title, "{title}", and the description, "{description}", belong to one item. Name it.'),
    ],
    # ------------------------------------------------------------------ index -> text
    "index2item": [
        _t("What is the title of item {item}?", "{title}"),
        _t("Give the name of the item {item}.", "{title}"),
        _t("What is item {item} called?", "{title}"),
        _t("Tell me the title that belongs to item {item}.", "{title}"),
        _t("Output the title of the item with index {item}.", "{title}"),
        _t("Which title corresponds to {item}?", "{title}"),
        _t("Describe item {item}.", "{description}"),
        _t("What is the description of item {item}?", "{description}"),
        _t("Write the description of the item with index {item}.", "{description}"),
        _t("Give a short description of item {item}.", "{description}"),
        _t("What is item {item} like? Provide its description.", "{description}"),
        _t("Item {item}: what is it about?", "{description}"),
        _t("What are the title and the description of item {item}?", "Title: {title}\nDescription: {description}"),
        _t("Give the name of item {item} and describe it.", "{title}: {description}"),
        _t("Tell me about item {item}: its title and its description.", "Title: {title}. Description: {description}"),
        _t("Provide the title and a description of the item with index {item}.", '"{title}", {description}'),
        _t("Which item is {item}? Answer with its title, then its description.", "{title}\n{description}"),
    ],
    # ------------------------------------------------------------------ indices <-> titles
    # 0-3: index history -> title, 4-7: index history -> description, 8-11: title history -> index.
    "fusionseqrec": [
        _t("A user interacted with these items in order: {history}. What is the title of the item they will "
           "interact with next?", "{title}"),
        _t("Given the user's history {history}, predict the title of the next item.", "{title}"),
        _t("The items {history} were chosen by a user one after another. Name the next item they will choose "
           "by its title.", "{title}"),
        _t("Based on the interaction sequence {history}, recommend the next item and give its title.", "{title}"),
        _t("A user interacted with these items in order: {history}. Describe the item they will interact with "
           "next.", "{description}"),
        _t("Given the user's history {history}, write the description of the next item they will like.",
           "{description}"),
        _t("Here is a user's item sequence: {history}. What will the next item be like? Give its description.",
           "{description}"),
        _t("From the interactions {history}, predict the next item and describe it.", "{description}"),
        _t("A user interacted with the items titled {title_history}, in that order. Which item will they "
           "interact with next?"),
        _t("The user's history, by title, is {title_history}. Predict the index of the next item."),
        _t("Given the titles of the items a user engaged with ({title_history}), recommend the next item."),
        _t("Titles of past interactions: {title_history}. Output the item the user is likely to choose next."),
    ],
    # ------------------------------------------------------------------ preference + intention -> index
    # 0: preference + history, no intention; 1: history + user-related intention; 2: history +
    # item-related intention; 3-5: the drawn {query} with history and/or preference; 6-10: the
    # drawn {query} alone (a bare search request).
    "itemsearch": [
        _t("A user's past interactions are {history}, and the user's tastes are summarised as follows: "
           "{explicit_preference} Recommend an item that suits these tastes."),
        _t("The user has interacted with {history}. Speaking about what they want now, the user says: "
           '"{user_related_intention}" Retrieve the item that meets this need.'),
        _t("After interacting with {history}, the user is looking for an item described like this: "
           '"{item_related_intention}" Find that item.'),
        _t('Here is a user\'s interaction history: {history}. The user now searches for "{query}" '
           "Which item should be returned?"),
        _t('A user whose preferences are "{explicit_preference}" issues the query "{query}" '
           "Pick the item that answers it."),
        _t("Interaction history: {history}\nPreferences: {explicit_preference}\nQuery: {query}\n"
           "Using all of this, recommend the item the user is searching for."),
        _t('Query: "{query}" Return the item that best answers this query.'),
        _t('Find the item a user is after when they say: "{query}"'),
        _t('Search the catalogue for an item that fits the request "{query}"'),
        _t('Which item would you suggest to someone asking for the following? "{query}"'),
        _t('A user types the search "{query}" Output the index of the matching item.'),
    ],
    # ------------------------------------------------------------------ history -> preference text
    "preferenceobtain": [
        _t("A user has interacted with the items {history}. Summarise this user's preferences.",
           "{explicit_preference}"),
        _t("Based on the interaction history {history}, describe what the user likes.", "{explicit_preference}"),
        _t("What can you infer about a user's tastes from these items: {history}?", "{explicit_preference}"),
        _t("The items {history} were chosen by a user over time. Write a description of their preferences.",
           "{explicit_preference}"),
        _t("Analyse the history {history} and state the user's preferences.", "{explicit_preference}"),
        _t("Interaction history: {history}. What kind of items does this user enjoy?", "{explicit_preference}"),
        _t("Given the user's past items {history}, explain their interests.", "{explicit_preference}"),
        _t("From the sequence {history}, deduce the user's preferences.", "{explicit_preference}"),
        _t("Describe the preferences of a user who interacted with {history}.", "{explicit_preference}"),
        _t("What does a user with history {history} look for in an item?", "{explicit_preference}"),
        _t("Here is the list of items a user engaged with: {history}. Characterise the user's taste.",
           "{explicit_preference}"),
    ],
}


WRAPPER = f"{PREAMBLE}\n\n{INSTRUCTION_HEADER}\n{{instruction}}\n\n{RESPONSE_HEADER}\n{{response}}"
TEST_TASKS = ("seqrec", "itemsearch", "fusionseqrec")  # the tasks test.py scores (item-output templates)


def placeholders(text: str) -> set[str]:
    """Names of the ``{fields}`` used in a template string."""
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def template_fields(template: dict[str, str]) -> set[str]:
    return placeholders(template["instruction"]) | placeholders(template["response"])


@dataclass(frozen=True)
class PromptSet:
    """An instruction wrapper and each task's templates: this repository's (``BUILTIN``) or those of a
    ``--prompt_templates`` file (``load_prompt_set``). ``source`` names where they came from."""

    wrapper: str
    templates: dict[str, list[dict[str, str]]]
    source: str = "built-in"

    @property
    def sha256(self) -> str:
        """A content hash of the wrapper and the templates (what a checkpoint records it was trained with)."""
        text = json.dumps({"wrapper": self.wrapper, "templates": self.templates}, sort_keys=True,
                          ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def task(self, name: str) -> list[dict[str, str]]:
        """The templates of task ``name``; a file without them is refused with its name."""
        if name not in self.templates:
            raise DataError(f"{self.source}: templates: no templates for task {name!r} (the file has "
                            f"{sorted(self.templates)})")
        return self.templates[name]

    def wrap(self, instruction: str) -> str:
        """The full prompt for an instruction: the wrapper up to where the response starts."""
        return self.wrapper[: self.wrapper.index("{response}")].format(instruction=instruction)

    def render(self, template: dict[str, str], fields: dict[str, str]) -> tuple[str, str]:
        """(prompt, response) of one example. The prompt ends where the response starts."""
        return self.wrap(template["instruction"].format(**fields)), template["response"].format(**fields)

    def item_output_ids(self, task: str) -> list[int]:
        """Ids of the templates of ``task`` whose response is the item index (the testable ones)."""
        return [i for i, t in enumerate(self.task(task)) if t["response"].strip() == ITEM_RESPONSE]

    def template_id(self, task: str, fields: set[str]) -> int | None:
        """The first item-output template of ``task`` that uses exactly ``fields`` (besides the item);
        None when there is none (or the file has no such task)."""
        if task not in self.templates:
            return None
        for i in self.item_output_ids(task):
            if template_fields(self.task(task)[i]) == fields | {"item"}:
                return i
        return None


BUILTIN = PromptSet(WRAPPER, TEMPLATES)


def wrap(instruction: str) -> str:
    """The full prompt of this repository's wrapper for an instruction (up to the response)."""
    return BUILTIN.wrap(instruction)


def render(template: dict[str, str], fields: dict[str, str]) -> tuple[str, str]:
    return BUILTIN.render(template, fields)


def item_output_ids(task: str) -> list[int]:
    return BUILTIN.item_output_ids(task)


# --------------------------------------------------------------------------- templates from a file
def check_prompt_set(obj: Any, source: str) -> PromptSet:
    """``{"wrapper": str, "templates": {task: [{"instruction", "response"}, ...]}}`` checked field by
    field; a problem raises DataError naming ``source`` and the field."""
    def fail(field: str, msg: str) -> None:
        raise DataError(f"{source}: {field}: {msg}")

    def names(text: str, field: str) -> set[str]:
        try:
            return placeholders(text)
        except ValueError as e:
            fail(field, f"not a format string ({e}); write a literal brace as {{{{ or }}}}")

    if not isinstance(obj, dict):
        fail("(top level)", 'expected an object {"wrapper": ..., "templates": ...}')
    unknown = set(obj) - {"wrapper", "templates", "source"}
    if unknown:
        fail(sorted(unknown)[0], 'unknown key; expected "wrapper", "templates" (and an optional "source")')
    wrapper = obj.get("wrapper")
    if not isinstance(wrapper, str):
        fail("wrapper", "expected a string with {instruction} and {response}")
    if names(wrapper, "wrapper") != {"instruction", "response"}:
        fail("wrapper", f"expected the placeholders {{instruction}} and {{response}} only, got "
                        f"{sorted(names(wrapper, 'wrapper'))}")
    if not wrapper.endswith("{response}"):
        fail("wrapper", "must end with {response}: the model writes the response after the prompt")
    templates = obj.get("templates")
    if not isinstance(templates, dict) or not templates:
        fail("templates", "expected an object of task name -> list of templates")
    for task, entries in templates.items():
        where = f"templates.{task}"
        if task not in FIELDS:
            fail(where, f"unknown task; expected names from {list(FIELDS)}")
        if not isinstance(entries, list) or not entries:
            fail(where, "expected a non-empty list of templates")
        for i, t in enumerate(entries):
            if not isinstance(t, dict) or set(t) != {"instruction", "response"} or not all(
                    isinstance(v, str) and v.strip() for v in t.values()):
                fail(f"{where}[{i}]", 'expected {"instruction": "...", "response": "..."} with non-empty strings')
            for part in ("instruction", "response"):
                bad = names(t[part], f"{where}[{i}].{part}") - set(FIELDS[task])
                if bad:
                    fail(f"{where}[{i}].{part}", f"unknown placeholder {{{sorted(bad)[0]}}}; {task} fills "
                                                 f"{list(FIELDS[task])}")
            if "item" in placeholders(t["response"]) and t["response"].strip() != ITEM_RESPONSE:
                fail(f"{where}[{i}].response", f"an answer with the item must be exactly {ITEM_RESPONSE} "
                                               f"(what the evaluation decodes), got {t['response']!r}")
            if t["response"].strip() == ITEM_RESPONSE and "item" in placeholders(t["instruction"]):
                fail(f"{where}[{i}].instruction", "shows {item}, the answer of this template")
        if task in TEST_TASKS and not any(t["response"].strip() == ITEM_RESPONSE for t in entries):
            fail(where, f"no template answers with {ITEM_RESPONSE}; test.py scores only those")
    return PromptSet(wrapper, {task: [dict(t) for t in entries] for task, entries in templates.items()}, source)


@functools.lru_cache(maxsize=8)
def load_prompt_set(path: str | None = None) -> PromptSet:
    """The templates of a ``--prompt_templates`` JSON file, checked; this repository's without one."""
    if not path:
        return BUILTIN
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"--prompt_templates {path}: cannot be read ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"--prompt_templates {path}: not a JSON file ({e})") from e
    return check_prompt_set(obj, str(path))


def prompt_set(args: Any) -> PromptSet:
    """The templates a script's arguments choose (``--prompt_templates``, absent = this repository's)."""
    return load_prompt_set(getattr(args, "prompt_templates", None) or None)


def to_json(prompts: PromptSet) -> dict[str, Any]:
    """The file form of a prompt set (what ``--prompt_templates`` reads)."""
    return {"wrapper": prompts.wrapper, "templates": prompts.templates}
