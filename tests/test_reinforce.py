"""reinforce.py: the rewards on hand-made beams, the advantages and the KL term, the log-probabilities
it trains against the beam scores, and short runs on a tiny model (learning a cycle, resuming after a kill)."""
import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reinforce
from fixtures import make_indexed_tiny_model, make_indices
from generation import Decoder, trie_beam_search, trie_sample
from utils import DataError

HIT, MISS = True, False


# --------------------------------------------------------------------------- rewards
def test_rule_reward_is_one_for_the_held_out_item_only():
    hit = torch.tensor([[MISS, HIT, MISS], [MISS, MISS, MISS]])
    assert reinforce.rule_reward(hit).tolist() == [[0, 1, 0], [0, 0, 0]]


def test_rank_reward_penalises_the_other_items_by_their_rank():
    G = 4
    hit = torch.tensor([[MISS, MISS, HIT, MISS], [MISS, MISS, MISS, MISS], [HIT, MISS, MISS, MISS]])
    r = reinforce.rank_reward(hit)
    norm = sum(1 / math.log2(k + 2) for k in range(G))
    expected = [-(1 / math.log2(k + 2)) / norm for k in range(G)]
    assert r[0].tolist() == pytest.approx([expected[0], expected[1], 0.0, expected[3]])
    assert r[1].tolist() == [0.0] * G  # no held-out item in the group: no penalty
    assert r[2, 0] == 0 and r[2, 1:].tolist() == pytest.approx(expected[1:])
    assert sum(expected) == pytest.approx(-1.0)  # a whole group's penalties add up to -1
    assert r[0, 0] < r[0, 1] < r[0, 3] < 0  # a wrong item ranked higher costs more


def test_ndcg_reward_grades_the_hit_by_its_rank():
    hit = torch.tensor([[HIT, MISS], [MISS, HIT], [MISS, MISS]])
    assert reinforce.ndcg_reward(hit).flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 1 / math.log2(3), 0.0, 0.0])


def test_rewards_are_weighted_and_checked():
    hit = torch.tensor([[MISS, HIT, MISS, MISS]])
    rewards = reinforce.parse_rewards("rule,rank", "1,0.5")
    total = reinforce.total_reward(hit, rewards)
    assert torch.allclose(total, reinforce.rule_reward(hit) + 0.5 * reinforce.rank_reward(hit))
    assert total[0, 1] == 1 and (total[0, [0, 2, 3]] < 0).all()
    assert len(reinforce.parse_rewards("rule", "")) == 1  # weights default to 1
    with pytest.raises(DataError, match="--rewards"):
        reinforce.parse_rewards("rule,bleu", "")
    with pytest.raises(DataError, match="--reward_weights: 1 weights for 2 rewards"):
        reinforce.parse_rewards("rule,rank", "1")


def test_cooccurrence_reward_is_the_counts_log_probability_of_each_item():
    hit = torch.tensor([[MISS, HIT, MISS]])
    logq = torch.tensor([[-1.0, -2.5, -4.0]])
    rewards = reinforce.parse_rewards("rule,cooccurrence", "1,0.5")
    assert reinforce.needs_count(rewards) and not reinforce.needs_count(reinforce.parse_rewards("rule,rank", ""))
    assert reinforce.total_reward(hit, rewards, logq).flatten().tolist() == pytest.approx([-0.5, -0.25, -2.0])


def test_count_logq_reads_the_count_after_each_prompts_history(cycle_checkpoint):
    """The rolled-out items' log q under the co-occurrence count after each prompt's own history;
    0 where a beam reached no item."""
    from item_teacher import CooccurrenceRanker
    from modeling import load_tokenizer

    data_path, ckpt = cycle_checkpoint
    indices = json.loads((data_path / "Cycle" / "Cycle.index.json").read_text())
    inters = json.loads((data_path / "Cycle" / "Cycle.inter.json").read_text())
    tok = load_tokenizer(ckpt)
    decoder = Decoder.build(tok, indices)
    trainer = _trainer(decoder, 3)
    trainer.count = CooccurrenceRanker.build(inters, list(decoder.position_of))
    items = [["1", "2", "5"], ["0", "7", "3"]]
    tokens = torch.tensor([[tok.convert_tokens_to_ids(indices[i]) for i in row] for row in items])  # [2, 3, L]
    valid = torch.tensor([[True, True, True], [True, True, False]])
    histories = [["7", "0"], ["6"]]
    logq = trainer.count_logq({"history": histories}, tokens, valid)
    q = trainer.count.next_item([[decoder.position_of[i] for i in h] for h in histories])
    for b, row in enumerate(items):
        for g, item in enumerate(row):
            expected = math.log(float(q[b, decoder.position_of[item]])) if valid[b, g] else 0.0
            assert float(logq[b, g]) == pytest.approx(expected, abs=1e-5)
    assert logq[0, 0] > logq[0, 2]  # after 0 comes 1 in every cycle, 5 never right after it


# --------------------------------------------------------------------------- the objective
def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0], [2.0, 4.0, 0.0, 0.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    adv = reinforce.group_advantages(rewards, valid)
    assert adv[0].sum().abs() < 1e-5 and adv[0].std().item() == pytest.approx(1.0, abs=1e-3)
    assert adv[0, 0] > 0 > adv[0, 1] and adv[0, 1] == adv[0, 2] == adv[0, 3]
    assert adv[1].tolist() == [0.0] * 4  # equal rewards: no signal
    assert adv[2, 2:].tolist() == [0.0, 0.0]  # invalid beams take no part
    assert adv[2, :2].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-3)


def test_kl_term_is_zero_with_zero_gradient_at_the_reference():
    ref = torch.randn(5, 4)
    logp = ref.clone().requires_grad_(True)
    kl = reinforce.kl_to_reference(logp, ref)
    assert torch.equal(kl, torch.zeros_like(kl))
    kl.sum().backward()
    assert logp.grad.abs().max() < 1e-6
    assert (reinforce.kl_to_reference(ref + 0.3, ref) > 0).all()  # and positive away from it
    # inside the loss: at the reference with zero advantages the loss and its gradient are zero
    logp.grad = None
    loss, stats = reinforce.grpo_loss(logp, logp.detach(), torch.zeros(5), ref, beta=0.5, epsilon=0.2)
    loss.backward()
    assert loss.item() == 0 and stats["kl"] == 0 and logp.grad.abs().max() < 1e-6


def test_clipped_objective_stops_pushing_past_the_clip_range():
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    for shift, moves in ((0.0, True), (0.5, False)):  # ratio 1: gradient; ratio e^0.5 > 1.2 with A > 0: none
        logp = (old + shift).requires_grad_(True)
        loss, _ = reinforce.grpo_loss(logp, old, adv[:1].expand(2), None, beta=0.0, epsilon=0.2)
        loss.backward()
        assert (logp.grad.abs().sum() > 0) == moves
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = reinforce.grpo_loss(logp, old, adv, None, beta=0.0, epsilon=0.2)
    loss.backward()  # at ratio 1 the gradient raises the positive row's log-probabilities and lowers the other's
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()


# --------------------------------------------------------------------------- scores the loss trains
@pytest.fixture(scope="module")
def tiny_indexed():
    tok, model, indices = make_indexed_tiny_model()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    tok.padding_side = "left"
    enc = dict(tok(["red night river", "king", "a blue star city"], return_tensors="pt", padding=True))
    return tok, model, indices, enc


@pytest.mark.parametrize("softmax,prior", [("full", False), ("level", False), ("trie", False), ("trie", True)])
def test_trained_logprobs_add_up_to_the_beam_scores(tiny_indexed, softmax, prior):
    """What the loss trains is what the search ranks by: the mean of response_logprobs over an item's
    tokens and EOS is its beam score, for every scoring softmax."""
    tok, model, indices, enc = tiny_indexed
    weights = {item: 1.0 + i for i, item in enumerate(indices)} if prior else None
    decoder = Decoder.build(tok, indices, softmax=softmax, prior=weights)
    tokens, scores = trie_beam_search(model, decoder.trie, enc["input_ids"], enc["attention_mask"], 6,
                                      decoder.eos_token_id, softmax)
    trainer = _trainer(decoder, 6)
    flat = tokens.flatten(0, 1)
    with torch.no_grad():
        logp = trainer.item_logprobs(model, enc, flat, torch.arange(18))  # each prompt once, its cache shared
        whole = trainer.whole_sequence_logprobs(model, enc["input_ids"].repeat_interleave(6, 0),
                                                enc["attention_mask"].repeat_interleave(6, 0), flat)
        some = trainer.item_logprobs(model, enc, flat, torch.tensor([2, 13, 14, 17]))  # kept rows of two prompts
    assert logp.shape == (18, decoder.trie.index_len + 1) and (logp <= 0).all()
    assert torch.allclose(logp.mean(-1).view(3, 6), scores, atol=1e-4)
    assert torch.allclose(whole, logp, atol=1e-4) and torch.allclose(some, logp[[2, 13, 14, 17]], atol=1e-4)


def test_sampling_within_the_trie_draws_real_items_with_their_scores(tiny_indexed):
    tok, model, indices, enc = tiny_indexed
    decoder = Decoder.build(tok, indices, softmax="trie")
    torch.manual_seed(0)
    tokens, scores = trie_sample(model, decoder.trie, enc["input_ids"], enc["attention_mask"], 40,
                                 decoder.eos_token_id, "trie", temperature=1.0)
    items = [decoder.item_of.get(tuple(t)) for t in tokens.flatten(0, 1).tolist()]
    assert None not in items and len(set(items)) > 5  # real items, and not one item drawn over and over
    best, _ = trie_beam_search(model, decoder.trie, enc["input_ids"], enc["attention_mask"], 1, decoder.eos_token_id,
                               "trie")
    with torch.no_grad():  # each draw's score is its item's mean log-probability, as the loss computes it
        logp = _trainer(decoder, 40).item_logprobs(model, enc, tokens.flatten(0, 1), torch.arange(120))
    assert torch.allclose(logp.mean(-1).view(3, 40), scores, atol=1e-4)
    cold, cold_scores = trie_sample(model, decoder.trie, enc["input_ids"], enc["attention_mask"], 8,
                                    decoder.eos_token_id, "trie", temperature=1e-3)
    assert (cold == best).all(-1).float().mean() > 0.9  # near zero temperature: the best item


def _trainer(decoder, num_generations):
    """A GRPOTrainer with just what its sequence helpers read."""
    trainer = reinforce.GRPOTrainer.__new__(reinforce.GRPOTrainer)
    trainer.decoder, trainer.rl = decoder, argparse.Namespace(num_generations=num_generations)
    return trainer


# --------------------------------------------------------------------------- short runs on a tiny model
N_ITEMS = 8


def make_cycle_data(root: Path, n_users: int = 16) -> Path:
    """Users who watch items 0, 1, ..., 7, 0, 1, ... from different starts: the next item is always
    the last one plus 1."""
    folder = root / "Cycle"
    folder.mkdir(parents=True)
    inters = {str(u): [(u + k) % N_ITEMS for k in range(6)] for u in range(n_users)}
    items = {str(i): {"title": f"Film {i}", "description": "A film."} for i in range(N_ITEMS)}
    (folder / "Cycle.inter.json").write_text(json.dumps(inters))
    (folder / "Cycle.item.json").write_text(json.dumps(items))
    (folder / "Cycle.index.json").write_text(json.dumps(make_indices(N_ITEMS, levels=2, codes=4, seed=2)))
    return root


@pytest.fixture
def cycle_checkpoint(tmp_path, tiny_base_model):
    """(data_path, a 'fine-tuned' checkpoint: the tiny base model with the cycle's index tokens)."""
    from modeling import load_for_training

    data_path = make_cycle_data(tmp_path / "data")
    indices = json.loads((data_path / "Cycle" / "Cycle.index.json").read_text())
    torch.manual_seed(0)
    model, tok = load_for_training(str(tiny_base_model), indices, mean_resizing=False)  # distinct index rows
    ckpt = tmp_path / "sft"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    return data_path, ckpt


@pytest.fixture
def cycle_finetuned(tmp_path, tiny_base_model, monkeypatch):
    """(data_path, a checkpoint fine-tuned part of the way: HR@1 well below 1). One short seqrec template,
    so that the tiny model learns in seconds what to read from the prompt."""
    import finetune
    import prompt

    monkeypatch.setitem(prompt.TEMPLATES, "seqrec", [{"instruction": "The user watched {history}. What next?",
                                                     "response": "{item}"}])
    data_path = make_cycle_data(tmp_path / "data")
    ckpt = tmp_path / "sft"
    finetune.main(["--base_model", str(tiny_base_model), "--data_path", str(data_path), "--dataset", "Cycle",
                   "--output_dir", str(ckpt), "--tasks", "seqrec", "--train_prompt_sample_num", "1",
                   "--train_data_sample_num", "0", "--max_his_len", "1", "--max_steps", "80",
                   "--per_device_batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
                   "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--save_and_eval_strategy", "no",
                   "--only_train_response", "--index_token_init", "normal", "--logging_step", "20"])
    return data_path, ckpt


def rl_cli(data_path, ckpt, out, *extra):
    return ["--ckpt_path", str(ckpt), "--data_path", str(data_path), "--dataset", "Cycle", "--output_dir", str(out),
            "--max_his_len", "1", "--num_generations", str(N_ITEMS), "--per_device_batch_size", "8",
            "--learning_rate", "1e-2", "--warmup_ratio", "0", "--lr_scheduler_type", "constant",
            "--save_and_eval_strategy", "no", "--logging_step", "1", "--report_to", "none", *extra]


def first_items(folder, data_path) -> tuple[list[str], list[str], list[dict], argparse.Namespace]:
    """The model's first item for each validation prompt (template 0: the next item after each user's
    training part), the held-out items, the validation examples and the parsed flags."""
    import data
    from arguments import parse_args
    from collator import TestCollator
    from modeling import load_for_inference

    args = parse_args("test", ["--data_path", str(data_path), "--dataset", "Cycle", "--max_his_len", "1"])
    indices = data.load_item_indices(args)
    model, tok = load_for_inference(str(folder), indices)
    valid = data.SeqRecDataset(args, "valid", prompt_id=0)
    batch = [{"prompt": valid[i]["prompt"], "target": valid[i]["response"]} for i in range(len(valid))]
    enc, targets = TestCollator(tok)(batch)
    decoder = Decoder.build(tok, indices)
    first = [r[0][0] for r in decoder.rank(model, enc, 4)]
    return first, [decoder.item_of_string(t) for t in targets], valid.examples, args


def hr_at_1(folder, data_path) -> float:
    """HR@1 on the validation prompts."""
    first, targets, _, _ = first_items(folder, data_path)
    return sum(f == t for f, t in zip(first, targets)) / len(first)


def test_a_few_steps_learn_the_cycle(cycle_finetuned, tmp_path):
    data_path, ckpt = cycle_finetuned
    before = hr_at_1(ckpt, data_path)
    out = tmp_path / "rl"
    reinforce.main(rl_cli(data_path, ckpt, out, "--max_steps", "20"))
    after = hr_at_1(out, data_path)
    assert before <= 0.6 and after >= before + 0.25, (before, after)
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "reward" in h]
    assert len(logged) == 20 and all(0 <= h["kl"] for h in logged) and "clip_fraction" in logged[0]
    first, last = logged[:5], logged[-5:]
    assert sum(h["target_rank1"] for h in last) > sum(h["target_rank1"] for h in first)


def count_log_q_of_first_items(folder, data_path) -> float:
    """The mean log-probability, under the co-occurrence count after each validation history, of the
    item the model ranks first."""
    import data
    from item_teacher import CooccurrenceRanker

    first, _, examples, args = first_items(folder, data_path)
    items = list(data.load_item_indices(args))
    position = {item: k for k, item in enumerate(items)}
    q = CooccurrenceRanker.build(data.load_files(args).inters, items).next_item(
        [[position[str(i)] for i in ex["history"]] for ex in examples])
    return sum(math.log(float(q[k, position[item]])) for k, item in enumerate(first)) / len(first)


def test_the_cooccurrence_reward_moves_the_first_items_towards_the_count(cycle_finetuned, tmp_path):
    """The co-occurrence reward alone (no hit reward) raises the count's log-probability of the
    items the model ranks first on the validation users: the model moves towards the count."""
    data_path, ckpt = cycle_finetuned
    before = count_log_q_of_first_items(ckpt, data_path)
    out = tmp_path / "rl"
    reinforce.main(rl_cli(data_path, ckpt, out, "--max_steps", "20", "--rewards", "cooccurrence",
                          "--learning_rate", "3e-3"))
    after = count_log_q_of_first_items(out, data_path)
    assert after >= before + 0.3, (before, after)


def test_index_lr_moves_the_index_rows_only(cycle_checkpoint, tmp_path):
    """With --index_lr (and the body's rate at 0) the stage trains the index-token rows alone, as
    fine-tuning's --index_lr does: the pretrained rows and every other weight stay as they were."""
    from safetensors.torch import load_file

    data_path, ckpt = cycle_checkpoint
    out = tmp_path / "rl"
    reinforce.main(rl_cli(data_path, ckpt, out, "--max_steps", "3", "--rewards", "cooccurrence",
                          "--learning_rate", "0", "--index_lr", "1e-2"))
    before, after = load_file(ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    indices = json.loads((data_path / "Cycle" / "Cycle.index.json").read_text())
    from modeling import load_tokenizer

    first_index_row = min(load_tokenizer(str(ckpt)).convert_tokens_to_ids(sorted({t for v in indices.values() for t in v})))
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    embedding = "model.embed_tokens.weight"
    assert moved <= {embedding, "lm_head.weight"} and embedding in moved, moved
    rows = (before[embedding] != after[embedding]).any(1).nonzero().flatten()
    assert rows.min() >= first_index_row and len(rows) >= 2


def test_sampled_rollouts_and_a_learning_curve_from_step_0(cycle_checkpoint, tmp_path):
    data_path, ckpt = cycle_checkpoint
    out = tmp_path / "rl"
    reinforce.main(rl_cli(data_path, ckpt, out, "--max_steps", "2", "--rollout", "sample", "--num_generations", "4",
                          "--num_iterations", "2", "--curve_steps", "2", "--curve_users", "8", "--curve_beams", "4",
                          "--rewards", "rule,rank,ndcg", "--beta", "0.1"))
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2] and "popularity" in curve
    assert hr_at_1(out, data_path) >= 0  # the saved model loads and decodes


KILLER = """
import os, signal, sys
import reinforce, transformers
at_step = int(sys.argv[1])
real = transformers.Trainer.training_step
def step(self, *args, **kwargs):
    if self.state.global_step == at_step:  # after checkpoint at_step was written: a kill mid-run
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
transformers.Trainer.training_step = step
reinforce.main(sys.argv[2:])
"""


def test_resume_after_a_kill_continues_at_the_saved_step(cycle_checkpoint, tmp_path, capsys):
    data_path, ckpt = cycle_checkpoint
    straight = tmp_path / "straight"
    saving = ("--max_steps", "4", "--save_and_eval_strategy", "steps", "--save_and_eval_steps", "2",
              "--per_device_batch_size", "2", "--num_generations", "4", "--rollout", "sample")  # sampling: RNG restored too
    reinforce.main(rl_cli(data_path, ckpt, straight, *saving))

    out = tmp_path / "killed"
    argv = rl_cli(data_path, ckpt, out, *saving)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", KILLER, "2", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and not (out / "config.json").exists()

    capsys.readouterr()
    reinforce.main(argv + ["--resume_from_checkpoint", "true"])
    assert f"from {out / 'checkpoint-2'}" in capsys.readouterr().out
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "reward" in h] == [1, 2, 3, 4]
    # optimizer, schedule and data order came back with the checkpoint: the same weights as the run without a kill
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], load_file(str(ckpt / "model.safetensors"))[k]) for k in a)  # it did train


def test_prompt_settings_come_from_the_checkpoint_and_its_index_is_checked(cycle_finetuned, tmp_path, capsys,
                                                                          monkeypatch):
    """As test.py: the history length the checkpoint was trained with (1) unless given by hand (with a
    note), and an index file that gives the items other indices is refused before any weights load."""
    data_path, ckpt = cycle_finetuned
    seen = {}

    def stop_before_training(args, **_):  # the stage's first use of the prompt settings
        seen.update(vars(args))
        raise DataError("stopped here")

    monkeypatch.setattr(reinforce, "rl_datasets", stop_before_training)
    argv = rl_cli(data_path, ckpt, tmp_path / "x")
    argv = argv[:argv.index("--max_his_len")] + argv[argv.index("--max_his_len") + 2:]
    for extra, his_len in (((), 1), (("--max_his_len", "3"), 3)):
        capsys.readouterr()
        with pytest.raises(DataError, match="stopped here"):
            reinforce.main(argv + list(extra))
        assert seen["max_his_len"] == his_len
        assert ("--max_his_len 3 given by hand" in capsys.readouterr().out) == bool(extra)

    indices = json.loads((data_path / "Cycle" / "Cycle.index.json").read_text())
    items = list(indices)
    (data_path / "Cycle" / "Cycle.moved.json").write_text(json.dumps(dict(zip(items, [indices[i] for i in items[1:] + items[:1]]))))
    with pytest.raises(DataError, match="is not the index .* --allow_index_mismatch"):
        reinforce.main(argv + ["--index_file", ".moved.json"])
    with pytest.raises(DataError, match="stopped here"):
        reinforce.main(argv + ["--index_file", ".moved.json", "--allow_index_mismatch"])


def test_bad_flags_fail_with_one_line(cycle_checkpoint, tmp_path, capsys):
    data_path, ckpt = cycle_checkpoint
    for flags, message in ((("--rl_tasks", "item2index"), "--rl_tasks"), (("--beta", "-1"), "--beta"),
                           (("--num_generations", "9"), "larger than the number of items (8)"),
                           (("--rewards", "rule,bleu"), "--rewards"),
                           (("--deepspeed", str(Path(__file__).resolve().parents[1] / "config/ds_z3_bf16.json")),
                            "ZeRO stage 3 is not supported"),
                           (("--index_lr", "0"), "--index_lr: 0.0 is not allowed"),
                           (("--index_lr", "1e-3", "--lora", "--base_model", "x"), "--index_lr is not supported with --lora")):
        with pytest.raises(DataError, match=re.escape(message)):
            reinforce.main(rl_cli(data_path, ckpt, tmp_path / "x", "--max_steps", "1", *flags))


def torchrun_reinforce(data_path, ckpt, out, cwd, *extra):
    """reinforce.py in two CPU processes under torchrun (gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port,
                           str(root / "reinforce.py"), *rl_cli(data_path, ckpt, out, "--max_steps", "2",
                                                               "--per_device_batch_size", "2", *extra)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and (out / "config.json").is_file()


def test_torchrun_ddp_gloo(cycle_checkpoint, tmp_path):
    """Two processes on the CPU: each rolls out its own prompts, DDP (gloo) averages the gradients."""
    data_path, ckpt = cycle_checkpoint
    torchrun_reinforce(data_path, ckpt, tmp_path / "ddp", tmp_path)


def test_torchrun_deepspeed_zero2_bf16(cycle_checkpoint, tmp_path):
    """Two processes under DeepSpeed ZeRO-2 (the optimizer state and gradients partitioned): the
    stage trains and saves a whole model, with weights other than the start's."""
    from safetensors.torch import load_file

    from dataset_files import dataset_file, load_indices
    from modeling import load_for_inference

    data_path, ckpt = cycle_checkpoint
    out = tmp_path / "z2"
    root = Path(__file__).resolve().parents[1]
    torchrun_reinforce(data_path, ckpt, out, tmp_path, "--deepspeed", str(root / "config/ds_z2_bf16.json"), "--bf16")
    assert not list(out.glob("global_step*"))  # a plain HF folder
    start, trained = load_file(str(Path(ckpt) / "model.safetensors")), load_file(str(out / "model.safetensors"))
    layers = [k for k in start if k.startswith("model.layers.")]
    assert layers and all(k in trained for k in layers)
    assert any(not torch.equal(start[k].float(), trained[k].float()) for k in layers)
    load_for_inference(str(out), load_indices(dataset_file(data_path, "Cycle", ".index.json")))  # loads as any checkpoint
