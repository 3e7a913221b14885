"""Turn your own copy of the original LC-Rec ``prompt.py`` into a ``--prompt_templates`` file.

    python convert/original_prompts.py <LC-Rec>/prompt.py --output prompts/original.json
    python test.py ... --prompt_templates prompts/original.json

The released checkpoints were trained on the original wording and wrapper, so evaluating them with
these templates gives figures comparable with the paper's (docs/conversion.md). Nothing of the
original is shipped here: the file is read from the path given.

The file is parsed, not run: its top-level statements are read with ``ast`` and only literal values
are evaluated (``name = "..."``, ``name = {}`` / ``[]``, ``name["key"] = value``,
``name.append(value)``), which is all the original's template definitions use. Its wrapper is
``sft_prompt`` and its templates ``all_prompt[task]``; the placeholders ``{inters}`` and
``{inter_titles}`` become this repository's ``{history}`` and ``{title_history}``. The result is
checked like any ``--prompt_templates`` file before it is written.
"""
from __future__ import annotations

import argparse
import ast
import string
from pathlib import Path
from typing import Any

from prompt import check_prompt_set
from utils import DataError, exit_on_data_error, write_json_atomic

WRAPPER_NAME = "sft_prompt"
TEMPLATES_NAME = "all_prompt"
RENAMED = {"inters": "history", "inter_titles": "title_history"}  # the original's field -> this repository's


class _Unknown:
    """A value the reader does not evaluate (a call, an expression); using it is an error later."""


def read_assignments(source: str, path: str) -> dict[str, Any]:
    """The top-level names of a Python file bound to literals, as the file leaves them (lists and
    dicts are shared by reference, as in Python: ``x.append(d)`` then ``d["k"] = v`` is seen)."""
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise DataError(f"{path}: not a Python file (line {e.lineno}: {e.msg})") from None
    env: dict[str, Any] = {}

    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return env.get(node.id, _Unknown())
        try:
            return ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return _Unknown()

    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if isinstance(target, ast.Name):
                env[target.id] = value(stmt.value)
            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                holder, key = env.get(target.value.id), value(target.slice)
                if isinstance(holder, dict) and not isinstance(key, _Unknown):
                    holder[key] = value(stmt.value)
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            call = stmt.value
            if (isinstance(call.func, ast.Attribute) and call.func.attr == "append"
                    and isinstance(call.func.value, ast.Name) and len(call.args) == 1):
                holder = env.get(call.func.value.id)
                if isinstance(holder, list):
                    holder.append(value(call.args[0]))
    return env


def rename_fields(text: str) -> str:
    """``text`` with the original's placeholder names replaced (literal braces kept escaped)."""
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(text):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is not None:
            out.append("{" + RENAMED.get(name, name) + (f"!{conversion}" if conversion else "")
                       + (f":{spec}" if spec else "") + "}")
    return "".join(out)


def convert(path: str | Path) -> dict[str, Any]:
    """The ``--prompt_templates`` object of the original ``prompt.py`` at ``path``, checked."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    env = read_assignments(source, str(path))
    wrapper, templates = env.get(WRAPPER_NAME), env.get(TEMPLATES_NAME)
    if not isinstance(wrapper, str):
        raise DataError(f"{path}: no string {WRAPPER_NAME} (the instruction wrapper); is this the original "
                        "LC-Rec prompt.py?")
    if not isinstance(templates, dict) or not templates:
        raise DataError(f"{path}: no dictionary {TEMPLATES_NAME} of task -> templates; is this the original "
                        "LC-Rec prompt.py?")
    out: dict[str, list[dict[str, str]]] = {}
    for task, entries in templates.items():
        if not isinstance(entries, list) or not all(
                isinstance(t, dict) and isinstance(t.get("instruction"), str) and isinstance(t.get("response"), str)
                for t in entries):
            raise DataError(f"{path}: {TEMPLATES_NAME}[{task!r}]: expected a list of dicts with string "
                            "'instruction' and 'response' (only literal strings are read)")
        out[str(task)] = [{"instruction": rename_fields(t["instruction"]), "response": rename_fields(t["response"])}
                          for t in entries]
    obj = {"source": f"converted from {path.name} by convert/original_prompts.py", "wrapper": wrapper,
           "templates": out}
    check_prompt_set(obj, f"{path} (converted)")
    return obj


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompt_py", help="your copy of the original repository's prompt.py")
    p.add_argument("--output", "-o", required=True, help="the JSON file to write (for --prompt_templates)")
    args = p.parse_args(argv)
    obj = convert(args.prompt_py)
    try:
        write_json_atomic(obj, args.output, indent=1)
    except OSError as e:
        raise DataError(f"--output {args.output}: cannot be written ({e.strerror or e})") from e
    counts = ", ".join(f"{task} {len(v)}" for task, v in obj["templates"].items())
    print(f"wrote {args.output}: the wrapper and {counts} templates")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
