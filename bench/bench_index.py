"""RQ-VAE benchmark: seconds per training epoch, seconds of generate_indices, and the
collision rate before and after generate_indices, on ml-100k embeddings (paper settings,
fewer epochs). One figure per line on stdout; progress goes to stderr.

    python bench/bench_index.py [--data_path data/ml-100k/ml-100k.emb-smollm2-td.npy] [--epochs 20]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from index import generate_indices, main as index_main  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_path", default="data/ml-100k/ml-100k.emb-smollm2-td.npy")
    p.add_argument("--random", action="store_true", help="random data of ml-100k's shape [1682, 576] instead")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--eval_step", type=int, default=10)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        data_path = args.data_path
        if args.random:
            data_path = str(Path(tmp) / "random.npy")
            np.save(data_path, np.random.default_rng(0).standard_normal((1682, 576)).astype(np.float32))
        train = index_main.main(["--data_path", data_path, "--ckpt_dir", f"{tmp}/ckpt", "--epochs", str(args.epochs),
                                 "--eval_step", str(args.eval_step), "--device", args.device])
        start = time.perf_counter()
        report = generate_indices.main(["--ckpt_path", train["best_collision_ckpt"], "--data_path", data_path,
                                        "--output_file", f"{tmp}/bench.index.json", "--device", args.device])
        gen_seconds = time.perf_counter() - start
    print(f"rqvae_seconds_per_epoch {train['seconds_per_epoch']:.3f}")
    print(f"generate_indices_seconds {gen_seconds:.2f}")
    print(f"collision_rate_before {report['before']['collision_rate']:.4f}")
    print(f"collision_rate_after {report['after']['collision_rate']:.4f}")


if __name__ == "__main__":
    main()
