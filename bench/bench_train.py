"""Fine-tuning throughput on real training batches: the plain path against the fast one, in one run.

Both paths take optimizer steps (forward, backward, AdamW) on batches of the given dataset's
training mixture, rendered and tokenized exactly as finetune.py does:
- ``plain``: random batches, right padding, the output layer on every token, fp32 on CPU
  (bf16 autocast on GPUs);
- ``fast``: what finetune.py does by default: the output layer on the response positions only,
  bf16 autocast wherever the device has native bf16 (GPUs, CPUs with avx512_bf16 or AMX;
  run.sh's PRECISION=auto), and AdamW in one fused pass (``--optim adamw_torch_fused``) instead
  of a loop over the weights.
Each path has its own optimizer over the same weights.
Both paths take the same random batches; ``padding_share`` says how much batching by length
could still save.
Steps of the two paths alternate, so that a machine whose speed drifts slows both alike; the
figures are medians over the timed steps. Before any step, both collators score the same batch
with the same weights: their losses must agree (exactly in fp32, within bf16 rounding otherwise).

One figure per line on stdout:
    device, loss_plain, loss_fast, <path>_examples_per_second (and the interquartile range of the
    steps' rates), <path>_tokens_per_second, <path>_padding_share, speedup

    python bench/bench_train.py --data_path runs/ml-100k-SmolLM2-135M-Instruct-quick/data --dataset ml-100k \
        [--tasks seqrec --train_data_sample_num 0 --max_his_len 5] [--batch_size 16] [--steps 8]

``--breakdown``: where a step of ``finetune.py`` itself goes (its Trainer, collator and loss, with
the cpu profile's recipe unless ``--finetune_flags`` says otherwise): per step, the data (dataset
and collator), the model's forward, the loss (the index softmax when on), backward, gradient
clipping, the optimizer, logging and the rest, as medians and interquartile ranges over the steps
after ``--warmup``; ``--trace`` adds torch.profiler's table of the costliest operators.
``--variants`` repeats the run once per named setting (e.g. ``"base=;eager=--attn_implementation eager"``),
their steps interleaved in rounds so that a machine whose load drifts slows each alike.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import shlex
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from arguments import parse_args  # noqa: E402
from collator import TrainCollator  # noqa: E402
from modeling import load_for_training  # noqa: E402
from utils import cpu_description, cpu_supports_bf16, get_device, set_seed  # noqa: E402

# The cpu profile's fine-tuning (run.sh: collab_recipe with its index rate, global token normalisation);
# run.sh adds --bf16 where the CPU has native bf16
CPU_PROFILE_FLAGS = ("--max_his_len 20 --tasks seqrec,item2index,index2item,fusionseqrec --train_prompt_sample_num 1,1,1,1 "
                     "--train_data_sample_num 0,1682,1682,2000 --per_device_batch_size 8 --gradient_accumulation_steps 1 "
                     "--learning_rate 1e-4 "
                     "--weight_decay 0.01 --only_train_response --history_loss --index_softmax trie "
                     "--index_prior popularity --index_token_init collab --index_lr 2e-3 "
                     "--loss_normalization global_tokens --logging_step 10")
PHASES = ["data", "forward", "loss", "backward", "clip", "optimizer", "logging", "other"]




class PhaseClock:
    """Wall seconds (``phase``) and the process's CPU seconds (``phase_cpu``: all its threads, which
    a machine's other jobs slow far less than the wall clock) per named phase of the current step;
    the wrapped calls add to them."""

    def __init__(self):
        self.now: dict[str, float] = {}

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[phase] = self.now.get(phase, 0.0) + time.perf_counter() - start
                self.now[phase + "_cpu"] = self.now.get(phase + "_cpu", 0.0) + time.process_time() - start_cpu
        return timed


def breakdown_trainer(model_path: str, data_path: str, dataset: str, flags: str, out_dir: str,
                      trace_steps: range | None = None):
    """finetune.py's Trainer for ``flags`` with each phase of a step timed, and a generator that runs
    its training one optimizer step per ``next()`` (in a thread held in lock-step, so that several
    trainers' steps can interleave): (trainer, per-step records, steps generator, profiler or None).
    One flag of this benchmark's own among ``flags``: ``--threads N`` trains on N threads.
    ``trace_steps``: the steps torch.profiler records (in the training thread: the profiler sees
    only the thread that starts it)."""
    import threading

    import finetune

    argv = shlex.split(flags) + ["--base_model", model_path, "--data_path", data_path, "--dataset", dataset,
                                 "--output_dir", out_dir, "--save_and_eval_strategy", "no", "--report_to", "none"]
    threads = torch.get_num_threads()
    if "--threads" in argv:
        at = argv.index("--threads")
        threads = int(argv[at + 1])
        del argv[at:at + 2]
    args = parse_args("train", argv)
    set_seed(args.seed)
    training_args = finetune.training_arguments(args)
    trainer_flags = args
    indices = data.load_item_indices(args)
    train_set, valid_set = data.load_datasets(args)
    files = data.load_files(args)
    titles = {item: feat.get("title", "") for item, feat in files.items.items()} if args.index_token_init == "title" else None
    inters = files.inters if args.index_token_init == "collab" else None
    model, tokenizer = load_for_training(args.base_model, indices, dtype=args.torch_dtype, titles=titles, inters=inters,
                                         mean_resizing=args.index_token_init != "normal",
                                         **({"attn_implementation": args.attn_implementation} if args.attn_implementation else {}))
    trainer = finetune.build_trainer(args, training_args, model, tokenizer, train_set, valid_set)
    clock, steps = PhaseClock(), []
    fetch = clock.wrap("data", trainer.get_batch_samples)
    trainer.compute_loss = clock.wrap("forward", trainer.compute_loss)  # the loss's share is taken out later
    if hasattr(trainer, "index_softmax"):
        trainer.index_softmax = clock.wrap("loss", trainer.index_softmax)
    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
    trainer._clip_grad_norm = clock.wrap("clip", trainer._clip_grad_norm)
    trainer._maybe_log_save_evaluate = clock.wrap("logging", trainer._maybe_log_save_evaluate)
    optimizer_step = trainer.create_optimizer

    def create_optimizer(*a, **k):  # the optimizer's step timed where the Trainer calls it
        optimizer = optimizer_step(*a, **k)
        optimizer.step = clock.wrap("optimizer", optimizer.step)
        return optimizer

    trainer.create_optimizer = create_optimizer
    go, done = threading.Semaphore(0), threading.Semaphore(0)
    started: list[float] = []
    profiler = None
    if trace_steps:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])

    def next_step(*a, **k):
        """Wraps the fetch of a step's batch: closes the step before (after its logging), then waits."""
        if started:
            steps.append({**clock.now, "total": time.perf_counter() - started[0],
                          "total_cpu": time.process_time() - started[1]})
            if profiler is not None and len(steps) == trace_steps.stop:
                profiler.__exit__(None, None, None)
            done.release()
            go.acquire()
        if profiler is not None and len(steps) == trace_steps.start:
            profiler.__enter__()
        torch.set_num_threads(threads)  # this thread's team: each variant keeps its own
        clock.now = {}
        started[:] = [time.perf_counter(), time.process_time()]
        return fetch(*a, **k)

    trainer.get_batch_samples = next_step

    def run():
        thread = threading.Thread(target=trainer.train, daemon=True)
        thread.start()
        while True:
            done.acquire()
            yield
            go.release()

    trainer.flags = trainer_flags  # for curve_point
    return trainer, steps, run(), profiler


def curve_point(trainer, users: int, beams: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one learning-curve point (learning_curve.py's scoring) on ``users`` users."""
    import argparse
    import tempfile

    from learning_curve import LearningCurve
    from transformers import TrainerState

    args = argparse.Namespace(**{**vars(trainer.flags), "curve_users": users, "curve_beams": beams, "curve_steps": 1})
    curve = LearningCurve(args, trainer.processing_class, tempfile.mkdtemp(prefix="bench_curve_"), 8)
    state = TrainerState()
    state.global_step = 1
    start, start_cpu = time.perf_counter(), time.process_time()
    curve.score(trainer.model, state)
    return time.perf_counter() - start, time.process_time() - start_cpu


def step_table(steps: list[dict], warmup: int) -> dict[str, tuple[float, float, float, float]]:
    """phase -> (median, q1, q3 wall seconds, median CPU seconds) per step, over the steps after ``warmup``.
    ``forward`` is the model's alone (the loss timed inside it is taken out); ``other`` is the rest
    of the step (learning-rate schedule, zeroing the gradients, callbacks)."""
    kept = [dict(s) for s in steps[warmup:]]
    for s in kept:
        for unit in ("", "_cpu"):
            s["forward" + unit] = s.get("forward" + unit, 0.0) - s.get("loss" + unit, 0.0)
            s["other" + unit] = s["total" + unit] - sum(s.get(p + unit, 0.0) for p in PHASES if p != "other")
    out = {}
    for phase in PHASES + ["total"]:
        values = [s.get(phase, 0.0) for s in kept]
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
        out[phase] = (med, q1, q3, statistics.median(s.get(phase + "_cpu", 0.0) for s in kept))
    return out


def breakdown(args) -> None:
    """--breakdown: the phases of finetune.py's steps, per setting of --variants, in interleaved rounds."""
    import tempfile

    variants = [v.split("=", 1) for v in args.variants.split(";") if v.strip()] if args.variants else [["base", ""]]
    flags = CPU_PROFILE_FLAGS + (" --bf16" if cpu_supports_bf16() and not args.no_bf16 else "")
    print(f"cpu {cpu_description()}")
    print(f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    print(f"load_average_start {os.getloadavg()[0]:.2f}")
    runs, loops = {}, {}
    for name, more in variants:
        out = tempfile.mkdtemp(prefix=f"bench_train_{name}_")
        max_steps = args.rounds * args.steps + args.warmup + 1  # one more: a step closes at the next fetch
        trace = range(args.warmup, args.warmup + args.steps) if args.trace else None  # the first round
        trainer, steps, loop, profiler = breakdown_trainer(
            args.model, args.data_path, args.dataset, f"{flags} {args.finetune_flags} {more} --max_steps {max_steps}",
            out, trace)
        runs[name], loops[name] = (trainer, steps, more, profiler), loop
    for loop in loops.values():  # warm-up steps first
        for _ in range(args.warmup):
            next(loop)
    for _ in range(args.rounds):  # each variant's steps a round at a time, in turn
        for loop in loops.values():
            for _ in range(args.steps):
                next(loop)
    print(f"load_average_end {os.getloadavg()[0]:.2f}")
    for name, (trainer, steps, more, profiler) in runs.items():
        table = step_table(steps[: args.warmup + args.rounds * args.steps], args.warmup)
        total = table["total"][0]
        print(f"variant {name}: {more or '(the profile as is)'}; {len(steps) - args.warmup} steps")
        for phase in PHASES + ["total"]:
            med, q1, q3, cpu = table[phase]
            print(f"  {phase:<10} {med:7.3f} s  (IQR {q1:.3f}-{q3:.3f})  {100 * med / total:5.1f}%  cpu {cpu:7.3f} s")
        print(f"  examples_per_second {trainer.args.per_device_train_batch_size / total:.2f}")
        if profiler is not None:
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.trace))
    if args.curve_users:  # the learning curve's cost beside the steps (run.sh's cpu profile: a point every 150)
        trainer, steps, _, _ = next(iter(runs.values()))
        wall, cpu = curve_point(trainer, args.curve_users, args.curve_beams)
        print(f"curve_point {args.curve_users} users, {args.curve_beams} beams: {wall:.1f} s (cpu {cpu:.1f} s); "
              f"{wall / args.curve_users:.2f} s a user")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=str, default=None, help="HF folder (default: the embedded SmolLM2)")
    p.add_argument("--data_path", type=str, required=True)
    p.add_argument("--dataset", type=str, default="ml-100k")
    p.add_argument("--tasks", type=str, default="seqrec")
    p.add_argument("--train_data_sample_num", type=str, default="0")
    p.add_argument("--max_his_len", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per path")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    p.add_argument("--paths", type=str, default="plain,fast")
    p.add_argument("--breakdown", action="store_true", help="time the phases of finetune.py's own steps (above)")
    p.add_argument("--finetune_flags", type=str, default="", help="--breakdown: flags added to the cpu profile's")
    p.add_argument("--variants", type=str, default="", help="--breakdown: 'name=flags;name=flags', interleaved")
    p.add_argument("--rounds", type=int, default=3, help="--breakdown: rounds of --steps steps per variant")
    p.add_argument("--no_bf16", action="store_true", help="--breakdown: fp32 even on a CPU with native bf16")
    p.add_argument("--curve_users", type=int, default=0,
                   help="--breakdown: also time one learning-curve point on this many validation users")
    p.add_argument("--curve_beams", type=int, default=20, help="--breakdown: its beams (the cpu profile's 20)")
    p.add_argument("--trace", type=int, default=0, help="--breakdown: print torch.profiler's N costliest operators")
    args = p.parse_args()

    if args.model is None:
        from data_process.base_model import build_base_model

        args.model = str(build_base_model())
    if args.breakdown:
        breakdown(args)
        return
    n_tasks = len(args.tasks.split(","))
    train_args = parse_args("train", [
        "--base_model", args.model, "--data_path", args.data_path, "--dataset", args.dataset,
        "--tasks", args.tasks, "--train_data_sample_num", args.train_data_sample_num,
        "--train_prompt_sample_num", ",".join(["1"] * n_tasks), "--max_his_len", str(args.max_his_len),
        "--only_train_response"])
    set_seed(0)
    device = get_device()
    train_set, _ = data.load_datasets(train_args)
    model, tokenizer = load_for_training(args.model, data.load_item_indices(train_args), dtype=torch.float32)
    model.to(device).train()
    optimizers = {path: torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=path == "fast")
                  for path in ("plain", "fast")}
    native_bf16 = device.type == "cuda" or cpu_supports_bf16()

    collators = {"plain": TrainCollator(tokenizer, True, 2048, response_logits_only=False),
                 "fast": TrainCollator(tokenizer, True, 2048, response_logits_only=True)}
    autocasts = {"plain": device.type == "cuda", "fast": native_bf16}
    n_batches = args.warmup + args.steps
    pool = random.Random(0).sample(range(len(train_set)), min(len(train_set), args.batch_size * n_batches))
    same_batches = [pool[k * args.batch_size:(k + 1) * args.batch_size] for k in range(n_batches)]
    batches = {"plain": same_batches, "fast": same_batches}

    def encode(path: str, idx: list[int]) -> dict:
        batch = collators[path]([train_set[i] for i in idx])
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def loss_of(path: str, batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocasts[path]):
            return model(**batch).loss

    with torch.no_grad():  # same weights, same examples: the two paths must give the same loss
        same = batches["plain"][0]
        print(f"loss_plain {loss_of('plain', encode('plain', same)).item():.5f}")
        print(f"loss_fast {loss_of('fast', encode('fast', same)).item():.5f}")

    paths = [q for q in args.paths.split(",") if q]
    times: dict[str, list[float]] = {q: [] for q in paths}
    tokens: dict[str, list[int]] = {q: [] for q in paths}
    padded: dict[str, list[int]] = {q: [] for q in paths}
    for step in tqdm(range(n_batches), desc="steps", file=sys.stderr):
        for path in paths:
            batch = encode(path, batches[path][step])
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_of(path, batch).backward()
            optimizers[path].step()
            optimizers[path].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[path].append(time.perf_counter() - start)
                tokens[path].append(int(batch["attention_mask"].sum()))
                padded[path].append(batch["attention_mask"].numel())

    cpu = f"{cpu_description()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, native bf16 {native_bf16}"
    print(f"device {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu})")
    rate = {}
    for path in paths:
        median = statistics.median(times[path])
        rate[path] = args.batch_size / median
        q1, _, q3 = statistics.quantiles(times[path], n=4) if len(times[path]) > 1 else [median] * 3
        print(f"{path}_examples_per_second {rate[path]:.2f}")
        print(f"{path}_examples_per_second_iqr {args.batch_size / q3:.2f}-{args.batch_size / q1:.2f}")
        print(f"{path}_tokens_per_second {statistics.median(tokens[path]) / median:.1f}")
        print(f"{path}_padding_share {1 - sum(tokens[path]) / sum(padded[path]):.3f}")
    if len(paths) == 2:
        print(f"speedup {rate[paths[1]] / rate[paths[0]]:.2f}")


if __name__ == "__main__":
    main()
