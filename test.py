"""Evaluate a fine-tuned checkpoint on one device (cuda:<gpu_id>, or cpu without CUDA).

    python test.py --gpu_id 0 --ckpt_path $CKPT_PATH --dataset $DATASET --data_path $DATA_PATH \
        --results_file $RESULTS_FILE --test_batch_size 1 --num_beams 20 --test_prompt_ids all \
        --index_file .index.json

Beam search constrained to the real item indices; HR@K / NDCG@K per prompt template and their
mean/min/max, written as JSON to --results_file. ``--decoding trie,position`` also scores the
original's per-position rule with the same loaded model, into <results stem>_position.json, each
table printed under its label. The loop lives in evaluation.py.
"""
import logging
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # faster and steadier on small CPU machines

from arguments import parse_args  # noqa: E402
from evaluation import evaluate_checkpoint  # noqa: E402
from utils import exit_on_data_error  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args("test", description=__doc__.split("\n")[0])
    with exit_on_data_error():
        evaluate_checkpoint(args)


if __name__ == "__main__":
    main()
