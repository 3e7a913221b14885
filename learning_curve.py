"""The learning curve: validation HR@10 and NDCG@10 while fine-tuning, every ``--curve_steps`` steps.

A fixed, seeded subset of ``--curve_users`` validation users (target ``s[-2]``, history
``s[:-2]``, the first item-output seqrec template of the run's templates, 0 for this repository's
and the original's) is ranked with the same trie-constrained beam search as test.py.
Each point records the step, the examples seen, the training seconds so far (scoring time left
out), each metric's standard error over the users (``stderr``; the plot draws it as a band) and
how many distinct items are ranked first, so that a model that recommends the same item to
everyone shows at a glance. Popularity on the same users is stored beside the curve.
A run trained with ``--bf16`` is scored under bf16 autocast too (``bf16_autocast`` in the file).
Points go to ``<output_dir>/learning_curve.json`` (rewritten atomically after each point);
``plot_learning_curve.py`` draws them.

On several processes the main process scores while the others wait at the next gradient
all-reduce. Under DeepSpeed ZeRO-3 the weights are partitioned, so the curve is skipped there.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from metrics import compute_metrics, personalisation, standard_errors, target_rank
from utils import write_json_atomic

CURVE_METRICS = ["hit@10", "ndcg@10"]
CURVE_FILE = "learning_curve.json"


def curve_examples(args: argparse.Namespace) -> list[dict]:
    """The fixed validation users as test items: {"prompt", "target", "user", "item"}."""
    import data
    from prompt import prompt_set

    first = prompt_set(args).item_output_ids("seqrec")[0]
    valid = data.SeqRecDataset(args, "valid", prompt_id=first, sample_num=args.curve_users)
    return [{"prompt": valid[i]["prompt"], "target": valid[i]["response"], "user": ex["user"], "item": str(ex["item"])}
            for i, ex in enumerate(valid.examples)]


class LearningCurve(TrainerCallback):
    """Scores the validation subset every ``every`` steps and at the end of training."""

    def __init__(self, args: argparse.Namespace, tokenizer, output_dir: str | Path, examples_per_step: int):
        import data
        from item_prior import item_prior, popularity_ranking

        self.args, self.tokenizer = args, tokenizer
        self.every = int(args.curve_steps)
        self.path = Path(output_dir) / CURVE_FILE
        self.examples_per_step = examples_per_step
        self.examples = curve_examples(args)
        files = data.load_files(args)
        self.indices = files.indices
        top = popularity_ranking(files.inters)[:10]
        # the scoring of test.py for a model trained with --index_prior
        self.prior = item_prior(args.index_prior, args, self.indices, files.inters)
        pop_ranks = [target_rank(top, ex["item"]) for ex in self.examples]
        self.curve = {"users": len(self.examples), "every": self.every, "num_beams": args.curve_beams,
                      "popularity": compute_metrics(pop_ranks, CURVE_METRICS),
                      "bf16_autocast": bool(args.bf16), "points": []}
        self.decoder = None
        self.train_start = 0.0
        self.scoring_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_start = time.perf_counter()
        self.scoring_seconds = 0.0
        if state.global_step and self.path.is_file():  # a resumed run keeps the points it already has
            try:
                old = json.loads(self.path.read_text())["points"]
                self.curve["points"] = [p for p in old if p["step"] <= state.global_step]
            except (OSError, ValueError, KeyError, TypeError):
                pass

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.score(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.every and (not self.curve["points"] or self.curve["points"][-1]["step"] != state.global_step):
            self.score(model, state)

    @torch.no_grad()
    def score(self, model, state) -> None:
        if not state.is_world_process_zero or model is None:
            return
        from evaluation import evaluate_prompt, prompt_budget
        from generation import Decoder, scoring_softmax

        start = time.perf_counter()
        device = next(model.parameters()).device
        if self.decoder is None:
            self.decoder = Decoder.build(self.tokenizer, self.indices, device=device,
                                         softmax=scoring_softmax(self.args.index_softmax), prior=self.prior)
        was_training = model.training
        model.eval()
        # score in the precision training runs in: a bf16 run decodes under bf16 autocast too (about twice
        # as fast on a CPU with native bf16); the beam scores stay fp32 either way
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.curve["bf16_autocast"]):
                records = evaluate_prompt(model, self.tokenizer, self.examples, self.decoder, CURVE_METRICS,
                                          range(len(self.examples)), batch_size=self.args.curve_batch_size,
                                          num_beams=self.args.curve_beams, oom_backoff=True, show=False,
                                          max_prompt_length=prompt_budget(self.args.model_max_length,
                                                                          self.decoder.trie.index_len))
        finally:
            model.train(was_training)
        ranks = [r["rank"] for r in records]
        values = compute_metrics(ranks, CURVE_METRICS)
        self.scoring_seconds += time.perf_counter() - start
        point = {"step": state.global_step, "examples": state.global_step * self.examples_per_step,
                 "train_seconds": round(time.perf_counter() - self.train_start - self.scoring_seconds, 1),
                 "scoring_seconds": round(self.scoring_seconds, 1), **values,
                 "stderr": {m: round(se, 6) for m, se in standard_errors(ranks, CURVE_METRICS).items()},
                 "distinct_top1": personalisation([r["items"] for r in records])["distinct_top1"]}
        self.curve["points"].append(point)
        write_json_atomic(self.curve, self.path, indent=2, what="the learning curve")
        print(f"learning curve: step {state.global_step}: HR@10 {values['hit@10']:.4f}, NDCG@10 "
              f"{values['ndcg@10']:.4f}, {point['distinct_top1']} distinct top-1 items over {len(records)} users "
              f"(popularity: HR@10 {self.curve['popularity']['hit@10']:.4f})", flush=True)
