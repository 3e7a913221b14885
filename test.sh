#!/usr/bin/env bash
# Evaluate a fine-tuned checkpoint with the paper's flags.
#   NPROC=1 (default): python test.py on one device (cuda:$GPU_ID, or cpu without CUDA)
#   NPROC=N          : torchrun --nproc_per_node=N test_ddp.py (nccl on GPUs, gloo on CPU)
# Every setting comes from the environment; extra arguments are passed on, e.g.
#   CKPT_PATH=./ckpt/ml-100k bash test.sh --sample_num 100 --lora --base_model $BASE_MODEL
set -euo pipefail
cd "$(dirname "$0")"

DATASET=${DATASET:-ml-100k}
DATA_PATH=${DATA_PATH:-./data}
CKPT_PATH=${CKPT_PATH:-./ckpt/$DATASET}
RESULTS_FILE=${RESULTS_FILE:-./results/$DATASET/seqrec.json}
INDEX_FILE=${INDEX_FILE:-.index.json}
TEST_TASK=${TEST_TASK:-seqrec}
TEST_BATCH_SIZE=${TEST_BATCH_SIZE:-1}
NUM_BEAMS=${NUM_BEAMS:-20}
TEST_PROMPT_IDS=${TEST_PROMPT_IDS:-all}
NPROC=${NPROC:-1}
GPU_ID=${GPU_ID:-0}
MASTER_PORT=${MASTER_PORT:-4324}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

FLAGS=(--ckpt_path "$CKPT_PATH" --dataset "$DATASET" --data_path "$DATA_PATH"
       --results_file "$RESULTS_FILE" --test_batch_size "$TEST_BATCH_SIZE" --num_beams "$NUM_BEAMS"
       --test_prompt_ids "$TEST_PROMPT_IDS" --index_file "$INDEX_FILE" --test_task "$TEST_TASK")

if [ "$NPROC" -gt 1 ]; then
  torchrun --nproc_per_node="$NPROC" --master_port="$MASTER_PORT" test_ddp.py "${FLAGS[@]}" "$@"
else
  python test.py --gpu_id "$GPU_ID" "${FLAGS[@]}" "$@"
fi
