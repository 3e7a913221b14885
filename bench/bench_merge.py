"""merge_delta memory benchmark: peak resident memory (RSS high-water mark) of
convert/merge_delta.py with and without --low-cpu-mem, on the embedded SmolLM2-135M (538 MB fp32)
as base and a perturbed copy with 1024 added tokens as target, saved in ~100 MB shards.

Each merge runs in a fresh Python process that reports its own ru_maxrss; a process that only
imports the same modules gives the baseline. One figure per line on stdout.

    python bench/bench_merge.py [--work_dir /tmp/lcrec_bench_merge] [--shard_size 100MB]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from convert.weights import WeightReader  # noqa: E402

# Runs a script as __main__, then prints the peak RSS in MB: VmHWM of this address space (Linux;
# unlike ru_maxrss it starts afresh at exec, so the parent's memory at fork does not count).
RUNNER = """
import re, runpy, sys
script, *argv = sys.argv[1:]
if script != "-":
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
else:
    import torch, transformers, safetensors, tqdm  # noqa: F401  (what merge_delta imports)
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024)
"""


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in WeightReader(folder).files) / 1e6


def build_inputs(base: Path, work: Path, shard_size: str) -> tuple[Path, Path]:
    """Target = base with 1024 index tokens and small weight changes; delta = target - base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, delta = work / "target", work / "delta"
    if not (delta / "delta_info.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(base)
        tok.add_tokens([f"<{level}_{code}>" for level in "abcd" for code in range(256)])
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        model.save_pretrained(target, max_shard_size=shard_size)
        tok.save_pretrained(target)
        del model
        run(["convert/make_delta.py", "--base-model-path", str(base), "--target-model-path", str(target),
             "--delta-path", str(delta), "--max-shard-size", shard_size])
    return target, delta


def run(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one script run in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def same_weights(a: Path, b: Path) -> bool:
    ra, rb = WeightReader(a), WeightReader(b)
    return set(ra.names()) == set(rb.names()) and all(torch.equal(ra.get(n), rb.get(n)) for n in ra.names())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default=None, help="default: the embedded SmolLM2 folder (built if needed)")
    p.add_argument("--work_dir", default="/tmp/lcrec_bench_merge")
    p.add_argument("--shard_size", default="100MB")
    args = p.parse_args()
    if args.base_model:
        base = Path(args.base_model)
    else:
        from data_process.base_model import build_base_model

        base = build_base_model()
    work = Path(args.work_dir)
    target, delta = build_inputs(base, work, args.shard_size)
    delta_files = WeightReader(delta).files
    print(f"base weights: {folder_mb(base):.0f} MB")
    print(f"target weights: {folder_mb(target):.0f} MB")
    print(f"delta: {folder_mb(delta):.0f} MB in {len(delta_files)} shards, "
          f"largest {max(f.stat().st_size for f in delta_files) / 1e6:.0f} MB")
    print(f"import-only peak RSS: {run(['-'])[0]:.0f} MB")
    for mode in ([], ["--low-cpu-mem"]):
        out = work / ("merged-low" if mode else "merged")
        rss, seconds = run(["convert/merge_delta.py", "--base-model-path", str(base), "--target-model-path", str(out),
                            "--delta-path", str(delta), "--dtype", "float32", "--overwrite", *mode])
        name = "--low-cpu-mem" if mode else "plain"
        print(f"merge_delta {name} peak RSS: {rss:.0f} MB")
        print(f"merge_delta {name} seconds: {seconds:.1f}")
        print(f"merge_delta {name} rebuilt target exactly: {same_weights(out, target)}")


if __name__ == "__main__":
    main()
