#!/usr/bin/env bash
# The gpu profile end to end on one GPU, then its two figures: NDCG@10 (and HR@10) on all test
# users with standard errors, and the fine-tuning throughput in tokens per second.
#
#   bash bench/run_gpu_profile.sh            # RUN_DIR and any run.sh variable can be set as usual
#
# One figure per line on stdout after run.sh's own output:
#   gpu, ndcg@10, hit@10, distinct_top1, train_tokens_per_second, train_seconds, total_seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())')" != True ]; then
  echo "error: no CUDA GPU here; the gpu profile is sized for one (use PROFILE=cpu on a CPU)" >&2
  exit 2
fi
export PROFILE=gpu
export RUN_DIR=${RUN_DIR:-./runs/gpu-profile}
start=$SECONDS
bash run.sh
"$PYTHON" - "$RUN_DIR" $((SECONDS - start)) <<'PY'
import json, sys
from pathlib import Path

import torch

run, total = Path(sys.argv[1]), int(sys.argv[2])
res = json.loads((run / "results" / "lcrec.json").read_text())
pid = str(res["prompt_ids"][0])
state = json.loads((run / "ckpt" / "trainer_state.json").read_text())
speed = [h for h in state["log_history"] if "train_tokens_per_second" in h]
print(f"gpu {torch.cuda.get_device_name(0)}")
for m in ("ndcg@10", "hit@10"):
    print(f"{m} {res['mean'][m]:.4f} ± {res['stderr'][pid][m]:.4f} ({res['num_examples']} users)")
print(f"distinct_top1 {res['personalisation'][pid]['distinct_top1']}")
if speed:
    print(f"train_tokens_per_second {speed[-1]['train_tokens_per_second']:.0f}")
    print(f"train_seconds {speed[-1].get('train_runtime', float('nan')):.0f}")
print(f"total_seconds {total}")
PY
