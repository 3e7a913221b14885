#!/usr/bin/env bash
# Consolidate every checkpoint-<step> under a training output folder into final-checkpoint-<step>:
# ZeRO shards become safetensors (DeepSpeed's zero-to-fp32), with config, tokenizer, generation
# config and trainer_state.json; checkpoints already in plain HF form are hard-linked unchanged.
#   bash convert/convert.sh <output_dir> [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]
set -euo pipefail
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: $0 <output_dir> [--dtype float32|bfloat16|float16] [--max-shard-size 5GB] [--overwrite]" >&2
    exit 2
fi
OUT_DIR=$1
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python3}" "$(dirname "$0")/convert.py" --all "$OUT_DIR" "$@"
