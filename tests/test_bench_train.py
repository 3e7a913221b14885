"""bench/bench_train.py --breakdown: where finetune.py's steps go, phase by phase."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_step_table_takes_the_loss_out_of_the_forward_and_keeps_the_rest_as_other():
    steps = [{"data": 0.1, "forward": 9.0, "loss": 9.0, "backward": 9.0, "total": 99.0}]  # warm-up: dropped
    for k in range(3):
        steps.append({"data": 0.1, "forward": 3.0 + k, "loss": 1.0, "backward": 4.0, "clip": 0.1, "optimizer": 0.5,
                      "logging": 0.0, "total": 10.0 + k, "forward_cpu": 2.0, "loss_cpu": 0.5, "total_cpu": 8.0})
    table = bench.step_table(steps, warmup=1)
    assert table["forward"][0] == pytest.approx(3.0)  # median of 2, 3, 4 after the loss's 1 s
    assert table["forward"][1:3] == pytest.approx((2.5, 3.5))  # its interquartile range
    assert table["loss"][0] == pytest.approx(1.0) and table["forward"][3] == pytest.approx(1.5)
    assert table["total"][0] == pytest.approx(11.0)
    # other: what no phase covered (11 - 0.1 - 3 - 1 - 4 - 0.1 - 0.5 on the median step)
    assert table["other"][0] == pytest.approx(2.3)
    assert steps[1]["forward"] == 3.0  # the records themselves are left as they were


def test_cpu_description_names_the_processor():
    from utils import cpu_description

    text = cpu_description()
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    if names:
        assert text.startswith(names[0])
    assert "cpus" in text and ("bf16" in text)


def test_breakdown_times_the_phases_of_finetune_steps(tiny_data, tiny_base_model):
    data_path, _ = tiny_data
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--breakdown", "--model", str(tiny_base_model),
         "--data_path", str(data_path), "--dataset", "Tiny", "--warmup", "1", "--rounds", "2", "--steps", "1",
         "--finetune_flags", "--max_his_len 5 --train_data_sample_num 0,0,0,0 --per_device_batch_size 2",
         "--variants", "sdpa=;eager=--attn_implementation eager"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.startswith("cpu ") and "load_average_end" in text
    for variant in ("sdpa", "eager"):
        block = text.split(f"variant {variant}:")[1].split("variant ")[0]
        assert "2 steps" in block.splitlines()[0]
        seconds = {m[0]: float(m[1]) for m in re.findall(r"^  (\w+)\s+([\d.]+) s", block, re.M)}
        assert set(seconds) == set(bench.PHASES) | {"total"}
        # a tiny model's loss and optimizer phases can print as 0.000 s: forward and backward hold the work
        assert seconds["forward"] > 0 and seconds["backward"] > 0 and all(seconds[p] >= 0 for p in bench.PHASES)
        assert sum(seconds[p] for p in bench.PHASES) <= seconds["total"] * 1.5  # medians: only roughly additive
