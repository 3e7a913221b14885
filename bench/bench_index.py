"""RQ-VAE benchmark on ml-100k embeddings. One figure per line on stdout (progress on stderr):

    rqvae_paper_seconds_per_epoch       the paper's settings (layers 2048..64, batch 1024, BatchNorm on,
                                        50 warm-up epochs then linear decay), a few epochs
    rqvae_quickstart_seconds_per_epoch  the quick-start settings (layers 512 256 128 64, batch 128)
    generate_indices_seconds            index/generate_indices.py on the quick-start checkpoint
    collision_rate_before / _after      before and after generate_indices

    python bench/bench_index.py [--data_path data/ml-100k/ml-100k.emb-smollm2-td.npy] [--epochs 120]

With --report_epochs E1 E2 ..., the paper's settings train max(E) epochs instead (the linear decay
reaching 0 at the last one), evaluated every gcd(E) epochs, and at each E it prints

    rqvae_paper_epoch<E>_used_codes     codes used per level, a/b/c/d (nearest-code assignment)
    rqvae_paper_epoch<E>_collision_rate collision rate before generate_indices

(--skip_quick leaves out the quick-start training and indexing.)

Flags this script does not know go to the quick-start training (index/main.py), e.g. --layers.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from index import generate_indices, main as index_main  # noqa: E402

# The paper's model is too slow to train well in a CPU quick start: a narrower MLP with smaller
# batches (more steps per epoch) gives a well-spread index in about a minute on one core.
QUICK_START = ["--layers", "512", "256", "128", "64", "--batch_size", "128"]
# index/run.sh's settings beyond index/main.py's defaults.
PAPER = ["--bn", "true", "--warmup_epochs", "50", "--lr_scheduler_type", "linear"]


def main() -> None:
    p = argparse.ArgumentParser(description="RQ-VAE benchmark on ml-100k embeddings.")
    p.add_argument("--data_path", default="data/ml-100k/ml-100k.emb-smollm2-td.npy")
    p.add_argument("--random", action="store_true", help="random data of ml-100k's shape [1682, 576] instead")
    p.add_argument("--paper_epochs", type=int, default=3, help="epochs timed with the paper's settings")
    p.add_argument("--epochs", type=int, default=120, help="quick-start training epochs")
    p.add_argument("--eval_step", type=int, default=10)
    p.add_argument("--report_epochs", type=int, nargs="+", default=None,
                   help="train the paper's settings this long and report code usage and collisions at each")
    p.add_argument("--skip_quick", action="store_true", help="only the paper's settings")
    p.add_argument("--device", default="auto")
    args, train_flags = p.parse_known_args()
    if args.report_epochs and min(args.report_epochs) < 1:
        p.error("--report_epochs must be positive")
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        data_path = args.data_path
        if args.random:
            data_path = str(Path(tmp) / "random.npy")
            np.save(data_path, np.random.default_rng(0).standard_normal((1682, 576)).astype(np.float32))
        common = ["--data_path", data_path, "--device", args.device]
        report_epochs = sorted(set(args.report_epochs or []))
        paper_epochs, paper_eval = args.paper_epochs, args.paper_epochs
        if report_epochs:
            paper_epochs, paper_eval = report_epochs[-1], math.gcd(*report_epochs)
        paper = index_main.main([*common, "--ckpt_dir", f"{tmp}/paper", "--epochs", str(paper_epochs),
                                 "--eval_step", str(paper_eval), *PAPER])
        if not args.skip_quick:
            quick = index_main.main([*common, "--ckpt_dir", f"{tmp}/quick", "--epochs", str(args.epochs),
                                     "--eval_step", str(args.eval_step), *QUICK_START, *train_flags])
            start = time.perf_counter()
            report = generate_indices.main(["--ckpt_path", quick["best_collision_ckpt"], "--data_path", data_path,
                                            "--output_file", f"{tmp}/bench.index.json", "--device", args.device])
            gen_seconds = time.perf_counter() - start
    print(f"rqvae_paper_seconds_per_epoch {paper['seconds_per_epoch']:.3f}")
    for entry in paper["history"]:
        if entry["epoch"] in report_epochs:
            print(f"rqvae_paper_epoch{entry['epoch']}_used_codes {'/'.join(map(str, entry['used_codes']))}")
            print(f"rqvae_paper_epoch{entry['epoch']}_collision_rate {entry['collision_rate']:.4f}")
    if not args.skip_quick:
        print(f"rqvae_quickstart_seconds_per_epoch {quick['seconds_per_epoch']:.3f}")
        print(f"generate_indices_seconds {gen_seconds:.2f}")
        print(f"collision_rate_before {report['before']['collision_rate']:.4f}")
        print(f"collision_rate_after {report['after']['collision_rate']:.4f}")


if __name__ == "__main__":
    main()
