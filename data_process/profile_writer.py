"""Which model or server will write the user profiles: said, and refused when it cannot work,
before run.sh runs any step.

    python data_process/profile_writer.py --user_file D.user.json --backend hf --model_path PATH \
        [--force] [user_profiles.py flags, of which --require_instruct is read]

Prints one line: the hf model folder or the OpenAI-compatible endpoint that will write the
profiles, or that the existing ``--user_file`` will be used (unless ``--force``). Exits with
status 2 and one ``error: ...`` line when the profiles could not be written: ``--require_instruct``
with a model folder whose tokenizer has no chat template (a base model), or the openai back-end
without $OPENAI_BASE_URL, $OPENAI_MODEL and $OPENAI_API_KEY. Only small files are read (no model,
no tokenizer, no torch), so a refusal is instant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

OPENAI_ENV = ("OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY")
OPENAI_HINT = ("or use an OpenAI-compatible endpoint: --backend openai with $OPENAI_BASE_URL, $OPENAI_MODEL and "
               "$OPENAI_API_KEY set (or --api_base, --model_name, --api_key_env)")


def no_chat_template_message(model_path: str | os.PathLike) -> str:
    """The refusal of ``--require_instruct`` (also user_profiles.check_instruct_model's)."""
    return (f"--model_path {model_path}: the tokenizer has no chat template, so this is not an instruction-tuned "
            "model and --require_instruct refuses to write profiles with it; name an instruction model with "
            f"--model_path (run.sh: PROFILE_MODEL=...) {OPENAI_HINT}")


def chat_template_in(model_path: str | os.PathLike) -> bool | None:
    """Whether a local model folder ships a chat template, from the files a tokenizer reads it
    from (tokenizer_config.json's ``chat_template``, chat_template.jinja / .json, named templates
    under additional_chat_templates/); None when ``model_path`` is no local folder (a Hub id)."""
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return None
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("chat_template"):
            return True
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and jinja.read_text(encoding="utf-8").strip():
        return True
    extra = folder / "additional_chat_templates"
    return extra.is_dir() and any(extra.glob("*.jinja"))


def writer_line(args: argparse.Namespace, env: dict[str, str] | None = None) -> str:
    """The line run.sh prints; raises ValueError with the refusal when the profiles cannot be written."""
    env = os.environ if env is None else env
    ready = Path(args.user_file).is_file()
    if ready and not args.force:
        return f"user profiles: {args.user_file} exists and will be used (FORCE=1 writes it again)"
    instead = f"; or put a ready user.json at {args.user_file}"
    if args.backend == "openai":
        missing = [f"${v}" for v in OPENAI_ENV if not env.get(v)]
        if missing:
            raise ValueError(f"the openai back-end (run.sh: PROFILE_BACKEND=openai) needs {', '.join(missing)} "
                             f"set (OPENAI_API_KEY=EMPTY for a local server without keys){instead}")
        return (f"user profiles: written by the OpenAI-compatible endpoint {env['OPENAI_BASE_URL']}, "
                f"model {env['OPENAI_MODEL']}")
    template = chat_template_in(args.model_path)
    if template is False and args.require_instruct:
        raise ValueError(no_chat_template_message(args.model_path) + instead)
    said = {True: "has a chat template", False: "no chat template: a plain 'User:/Assistant:' prompt",
            None: "not a local folder: its chat template is checked when the step runs"}[template]
    return f"user profiles: written by the hf model {args.model_path} ({said})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--user_file", required=True, help="the <D>.user.json the profiles step writes")
    p.add_argument("--backend", choices=("hf", "openai"), default="hf")
    p.add_argument("--model_path", default="", help="the hf model folder")
    p.add_argument("--force", action="store_true", help="the step writes --user_file even if it exists")
    p.add_argument("--require_instruct", action="store_true")
    args, _ = p.parse_known_args(argv)  # the other user_profiles.py flags do not matter here
    try:
        print(writer_line(args), flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
