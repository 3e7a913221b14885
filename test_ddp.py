"""Evaluate a fine-tuned checkpoint on several processes (nccl on GPUs, gloo on CPU).

    torchrun --nproc_per_node=8 --master_port=4324 test_ddp.py (the flags of test.py)

The test set is split into contiguous shards, one per rank, that cover every example exactly
once (no drop_last, no padded duplicates). Each rank ranks its shard; rank 0 gathers the
per-example ranks with all_gather_object and computes the metrics, so they equal test.py's.
"""
import logging
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from arguments import parse_args  # noqa: E402
from evaluation import evaluate_checkpoint  # noqa: E402
from utils import exit_on_data_error, get_device  # noqa: E402


def all_gather(obj: list) -> list[list]:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def main() -> None:
    args = parse_args("test", description=__doc__.split("\n")[0])
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(get_device())
        dist.init_process_group(backend)
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    try:
        with exit_on_data_error():
            evaluate_checkpoint(args, rank, world_size, gather=all_gather if world_size > 1 else None)
        if distributed:  # every rank done before any tears gloo down (a rank leaving early was seen to abort)
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
