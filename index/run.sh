#!/usr/bin/env bash
# Train the RQ-VAE item indexer with the paper's settings, then write <D>.index.json.
#
#   bash index/run.sh                                   # ml-100k, SmolLM2 embeddings, 10000 epochs
#   DATASET=Instruments PLM=llama EPOCHS=10000 bash index/run.sh
#   EPOCHS=60 EVAL_STEP=10 bash index/run.sh --batch_size 256   # extra flags go to index/main.py
#
# Environment: DATASET, DATA_PATH, PLM (embedding name: <D>.emb-<PLM>-td.npy), EMB_FILE,
# CKPT_DIR, CKPT (which checkpoint indexes the items), INDEX_FILE, EPOCHS, EVAL_STEP, DEVICE,
# PYTHON, OMP_NUM_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-ml-100k}
DATA_PATH=${DATA_PATH:-./data}
PLM=${PLM:-smollm2}
EMB_FILE=${EMB_FILE:-$DATA_PATH/$DATASET/$DATASET.emb-$PLM-td.npy}
CKPT_DIR=${CKPT_DIR:-./ckpt/index/$DATASET}
CKPT=${CKPT:-best_collision_model.pth}
INDEX_FILE=${INDEX_FILE:-$DATA_PATH/$DATASET/$DATASET.index.json}
EPOCHS=${EPOCHS:-10000}
EVAL_STEP=${EVAL_STEP:-50}
DEVICE=${DEVICE:-auto}
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The paper's settings (seed 2024, as the original); flags given to this script come last and win. BatchNorm is on: the
# original passed `--bn False` to a bool-typed flag, which reads any non-empty string as true.
"$PYTHON" index/main.py --data_path "$EMB_FILE" --ckpt_dir "$CKPT_DIR" \
  --num_emb_list 256 256 256 256 --e_dim 32 --layers 2048 1024 512 256 128 64 \
  --sk_epsilons 0.0 0.0 0.0 0.003 --sk_iters 50 --beta 0.25 --quant_loss_weight 1.0 --loss_type mse \
  --learner AdamW --lr 1e-3 --weight_decay 1e-4 --warmup_epochs 50 --lr_scheduler_type linear \
  --batch_size 1024 --dropout_prob 0.0 --bn true --kmeans_init true --kmeans_iters 100 --seed 2024 \
  --epochs "$EPOCHS" --eval_step "$EVAL_STEP" --device "$DEVICE" "$@"

"$PYTHON" index/generate_indices.py --ckpt_path "$CKPT_DIR/$CKPT" --data_path "$EMB_FILE" \
  --output_file "$INDEX_FILE" --device "$DEVICE"
