"""The learned baselines (baselines/): the split they train on, that they learn, TIGER's decoding,
their results files and their errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from arguments import parse_args
from baselines import family
from baselines.runner import build_parser, resolve_args, run, usable_cores
from baselines.split import load_split, held_out_positions, train_examples, train_windows
from fixtures import make_dataset, make_indices
from results_table import results_table
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"sasrec": ["--hidden_size", "32", "--inner_size", "64"],
         "gru4rec": ["--hidden_size", "32", "--inner_size", "32"],
         "tiger": ["--hidden_size", "32", "--inner_size", "64", "--num_layers", "1", "--num_heads", "2"]}


def args_for(model, data_path, name, out, *extra):
    return build_parser().parse_args(["--dataset", name, "--data_path", str(data_path), "--results_file", str(out),
                                      "--threads", "1", *SMALL[model], *extra])


def write_cycle_dataset(root: Path, n_items: int = 6, n_users: int = 12) -> Path:
    """Every user walks the same cycle 0, 1, ..., n_items - 1, 0, ... from a different start."""
    folder = root / "Cycle"
    folder.mkdir(parents=True)
    inters = {str(u): [(u + k) % n_items for k in range(10 + u % 5)] for u in range(n_users)}
    (folder / "Cycle.inter.json").write_text(json.dumps(inters))
    (folder / "Cycle.index.json").write_text(json.dumps(make_indices(n_items, levels=2, codes=4, seed=1)))
    return root


# --------------------------------------------------------------------------- the split
@pytest.mark.parametrize("stride", [1, 3, 4])
def test_training_rows_hold_only_the_training_part_and_each_target_once(tmp_path, stride):
    root = make_dataset(tmp_path / "data", unique_items=True, n_users=20, n_items=30)  # items tell positions apart
    inters = json.loads((root / "Tiny" / "Tiny.inter.json").read_text())
    for seq in inters.values():
        rows = train_windows({"u": seq}, 4, stride)
        seen = {i for inputs, targets in rows for i in inputs + [t for t in targets if t >= 0]}
        assert seq[-1] not in seen and seq[-2] not in seen
        labelled = sorted(t for _, targets in rows for t in targets if t >= 0)
        assert labelled == sorted(seq[1:-2])  # every training example exactly once per epoch
        assert all(len(inputs) <= 4 for inputs, _ in rows)
    with pytest.raises(DataError, match="--train_stride"):
        train_windows(inters, 4, 5)


@pytest.mark.parametrize("stride", [1, 2, 5])
def test_a_short_stride_gives_every_target_nearly_its_whole_history(stride):
    seq = list(range(40))  # training part: items 0..37, so item i has history 0..i-1
    L = 6
    for inputs, targets in train_windows({"u": seq}, L, stride):
        for j, t in enumerate(targets):
            if t >= 0:  # the history the model reads for t: the window's inputs up to j
                assert inputs[:j + 1] == seq[max(0, t - len(inputs[:j + 1])):t]
                assert j + 1 >= min(t, L - stride + 1)  # at least L - stride + 1 items, or all it has


def test_gru4rec_defaults_to_overlapping_windows_that_fit_any_history_length():
    def stride(model, *argv):
        return resolve_args(build_parser().parse_args(["--dataset", "x", *argv]), family(model)).train_stride

    assert stride("gru4rec") == 5 and stride("gru4rec", "--max_his_len", "3") == 3
    assert stride("gru4rec", "--train_stride", "0") == stride("sasrec") == 20  # non-overlapping windows


def test_stride_one_rows_are_exactly_lcrecs_training_examples(tmp_path):
    root = make_dataset(tmp_path / "data", unique_items=True)
    inters = json.loads((root / "Tiny" / "Tiny.inter.json").read_text())
    rows = train_windows(inters, 3, 1)
    for inputs, targets in rows:  # one labelled position per row: the last one, after the whole history
        assert [j for j, t in enumerate(targets) if t >= 0] == [len(inputs) - 1]
    pairs = sorted((tuple(inputs), targets[-1]) for inputs, targets in rows)
    assert pairs == sorted((tuple(h), t) for h, t in train_examples(inters, 3))
    split = load_split(root, "Tiny", 3)
    for his, tgt, seq in zip(split.valid_his, split.valid_tgt, inters.values()):
        assert tgt.item() == seq[-2] and (his[his > 0] - 1).tolist() == seq[:-2][-3:]


@pytest.mark.parametrize("sample_num", [-1, 5])
def test_test_users_are_the_users_lcrec_is_scored_on(tiny_data, sample_num):
    data_path, name = tiny_data
    args = parse_args("test", ["--dataset", name, "--data_path", str(data_path), "--sample_num", str(sample_num),
                               "--seed", "7"])
    lcrec_users = [ex["user"] for ex in data.load_test_dataset(args, "seqrec", 0)]
    split = load_split(data_path, name, 20, sample_num, seed=7)
    assert split.test_users == lcrec_users
    inters = json.loads((data_path / name / f"{name}.inter.json").read_text())
    assert split.test_tgt.tolist() == [inters[u][-1] for u in lcrec_users]
    assert len(held_out_positions(15, 5, 7)) == 5


# --------------------------------------------------------------------------- learning
@pytest.mark.parametrize("model,epochs,lr", [("sasrec", 60, "1e-2"), ("gru4rec", 60, "1e-2"), ("tiger", 40, "3e-3")])
def test_each_baseline_learns_a_repeating_cycle(tmp_path, model, epochs, lr):
    root = write_cycle_dataset(tmp_path / "data")
    # History 4: test histories are then no longer than training ones (the longest user's full test
    # history, 13 items, was a length TIGER never trained on, and one user in 12 missed on some CPUs)
    args = args_for(model, root, "Cycle", tmp_path / "r.json", "--epochs", str(epochs), "--patience", str(epochs),
                    "--lr", lr, "--dropout", "0", "--batch_size", "32", "--train_stride", "1", "--max_his_len", "4")
    res = run(args, family(model))
    assert res["mean"]["hit@1"] == 1.0  # the next item of a cycle is always determined
    assert res["best_valid_ndcg@10"][0] > 0.9


def test_early_stopping_tests_the_weights_of_the_best_validation_epoch(tmp_path, monkeypatch):
    import baselines.runner as runner
    root = write_cycle_dataset(tmp_path / "data")
    sasrec, built, seen = family("sasrec"), [], []  # seen: the weights each validation scored
    scripted = iter([0.1, 0.5, 0.2, 0.3, 0.4, 0.9])  # best at epoch 2, so patience 3 stops after epoch 5
    real_build = sasrec.build
    monkeypatch.setattr(sasrec, "build", lambda args, split: built.append(real_build(args, split)) or built[-1])

    def scripted_ndcg10(ranks):
        seen.append({k: v.clone() for k, v in built[-1].state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(runner, "ndcg10", scripted_ndcg10)
    res = run(args_for("sasrec", root, "Cycle", tmp_path / "r.json", "--epochs", "10", "--patience", "3"), sasrec)
    (only,) = res["runs"]
    assert (only["epochs"], only["best_epoch"], only["stopped"], len(seen)) == (5, 2, "patience", 5)
    assert only["best_valid_ndcg@10"] == 0.5
    final = built[-1].state_dict()
    assert all(torch.equal(final[k], seen[1][k]) for k in final)  # epoch 2's weights were tested, not the last
    assert not all(torch.equal(final[k], seen[-1][k]) for k in final)


def test_the_time_cap_stops_inside_an_epoch(tmp_path):
    root = write_cycle_dataset(tmp_path / "data")
    args = args_for("sasrec", root, "Cycle", tmp_path / "r.json", "--epochs", "5", "--batch_size", "1",
                    "--max_train_minutes", "1e-9", "--threads", "0")  # over after the first of 90 one-row steps
    res = run(args, family("sasrec"))
    assert torch.get_num_threads() == usable_cores()  # --threads 0: every core, not OMP_NUM_THREADS's one
    (only,) = res["runs"]
    assert only["stopped"] == "time" and only["epochs"] == 1 and only["train_steps"] < 10
    assert 0 <= only["best_valid_ndcg@10"] <= 1  # the partial epoch is still validated and its weights tested


def test_every_family_writes_a_results_file_that_the_table_reads(tiny_data, tmp_path):
    data_path, name = tiny_data
    cmd = [sys.executable, "-m", "baselines", "--model", "sasrec,gru4rec,tiger", "--dataset", name, "--data_path",
           str(data_path), "--results_file", str(tmp_path / "{model}.json"), "--epochs", "2", "--seeds", "2",
           "--hidden_size", "32", "--inner_size", "64", "--num_layers", "1", "--num_heads", "2", "--sample_num", "6"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for model in ("sasrec", "gru4rec", "tiger"):
        res = json.loads((tmp_path / f"{model}.json").read_text())
        assert res["model"] == model and res["test_task"] == "seqrec" and res["prompt_ids"] == [0]
        assert res["num_examples"] == 6 and res["seeds"] == [42, 43] and len(res["epochs"]) == 2
        assert set(res["per_prompt"]["0"]) == set(res["metrics"]) == set(res["stderr"]["0"]) == set(res["std_over_seeds"])
        assert 1 <= res["personalisation"]["0"]["distinct_top1"] <= 6
        assert all(0 <= v <= 1 for v in res["mean"].values()) and res["mean"] == res["per_prompt"]["0"]
        assert res["mean"]["hit@10"] >= res["mean"]["hit@5"] >= res["mean"]["hit@1"]
        assert f"{model} seed 43:" in proc.stdout and "training time" in proc.stdout
        per_user = res["per_user"]  # each user's mean over the two seeds
        assert len(per_user["users"]) == 6 and all(v in (0.0, 0.5, 1.0) for v in per_user["hit@10"])
        assert sum(per_user["hit@10"]) / 6 == pytest.approx(res["mean"]["hit@10"], abs=1e-6)
    table = results_table([str(tmp_path / f"{m}.json") for m in ("sasrec", "tiger")], ["SASRec", "TIGER"])
    assert "| SASRec | 6 |" in table and "| TIGER | 6 |" in table and "±" in table


# --------------------------------------------------------------------------- TIGER's decoding
def test_tiger_decodes_only_real_items_in_score_order(tiny_data, tmp_path):
    data_path, name = tiny_data
    tiger = family("tiger")
    args = args_for("tiger", data_path, name, tmp_path / "r.json")
    args = resolve_args(args, tiger)
    split = load_split(data_path, name, 20)
    model = tiger.build(args, split).eval()
    items, scores = model.beam_search(split.test_his)
    real = {int(k) for k in json.loads((data_path / name / f"{name}.index.json").read_text())}
    for row, sc in zip(items.tolist(), scores):
        assert set(row) <= real and len(set(row)) == len(row) == 20
        assert torch.all(sc[:-1] >= sc[1:])
    # with a beam per item nothing is pruned: the search equals scoring every item by teacher forcing
    model.num_beams = len(real)
    items, scores = model.beam_search(split.test_his[:2])
    with torch.no_grad():
        for b in range(2):
            his = split.test_his[b:b + 1].expand(len(real), -1)
            tgt = torch.tensor(sorted(real))
            ids, mask = model.encode_inputs(his)
            labels = torch.cat([model.table[tgt + 1], torch.ones_like(tgt[:, None])], 1)
            logp = torch.log_softmax(model.t5(inputs_embeds=ids, attention_mask=mask, labels=labels).logits, -1)
            total = logp.gather(2, labels[..., None]).squeeze(-1).sum(1)
            assert items[b].tolist() == tgt[total.argsort(descending=True)].tolist()
            assert torch.allclose(scores[b], total.sort(descending=True).values, atol=1e-4)


# --------------------------------------------------------------------------- bad input
def run_cli(*argv, module="baselines.sasrec"):
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bad_inputs_stop_with_one_clear_line_and_no_results_file(tiny_data, tmp_path):
    data_path, name = tiny_data
    out = tmp_path / "r.json"
    base = ["--dataset", name, "--data_path", str(data_path), "--results_file", str(out), "--epochs", "1"]
    cases = [
        (run_cli(*base, "--max_his_len", "0"), "--max_his_len"),
        (run_cli("--dataset", "Nope", "--data_path", str(data_path), "--results_file", str(out)), "Nope.inter.json"),
        (run_cli(*base, "--model", "sasrec,bert4rec", module="baselines"), "unknown model 'bert4rec'"),
        (run_cli(*base, "--train_stride", "2", module="baselines.tiger"), "--train_stride"),
    ]
    for proc, needle in cases:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
        assert proc.stderr.strip().startswith("error:") and needle in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not out.exists()


def test_tiger_refuses_an_index_that_does_not_cover_the_items(tmp_path):
    root = make_dataset(tmp_path / "data")
    index_path = root / "Tiny" / "Tiny.index.json"
    index = json.loads(index_path.read_text())
    used = sorted({i for seq in json.loads((root / "Tiny" / "Tiny.inter.json").read_text()).values() for i in seq})
    del index[str(used[0])]
    index_path.write_text(json.dumps(index))
    out = tmp_path / "r.json"
    with pytest.raises(DataError, match="Tiny.index.json.*no index"):
        run(args_for("tiger", root, "Tiny", out, "--epochs", "1"), family("tiger"))
    assert not out.exists()


# --------------------------------------------------------------------------- item embeddings export
def test_saved_item_embeddings_are_the_trained_rows_in_item_order(tmp_path, monkeypatch):
    root = write_cycle_dataset(tmp_path / "data")
    sasrec, built = family("sasrec"), []
    build = sasrec.build
    monkeypatch.setattr(sasrec, "build", lambda args, split: built.append(build(args, split)) or built[-1])
    out = tmp_path / "emb" / "{model}.npy"
    run(args_for("sasrec", root, "Cycle", tmp_path / "r.json", "--epochs", "2", "--save_item_emb", str(out)), sasrec)
    saved = np.load(tmp_path / "emb" / "sasrec.npy")
    table = built[0].item.weight.detach().numpy()  # row 0 = padding, row i + 1 = item i
    assert saved.shape == (6, 32) and saved.dtype == np.float32
    assert np.array_equal(saved, table[1:])  # row for row, the padding row left out
    with pytest.raises(DataError, match="--save_item_emb"):
        run(args_for("tiger", root, "Cycle", tmp_path / "t.json", "--epochs", "1", "--save_item_emb", str(out)),
            family("tiger"))


@pytest.mark.parametrize("choice,expect", [("on", torch.bfloat16), ("off", torch.float32)])
def test_cpu_bf16_trains_and_decodes_under_autocast(tmp_path, monkeypatch, choice, expect):
    root = write_cycle_dataset(tmp_path / "data")
    tiger, dtypes = family("tiger"), set()
    real_build = tiger.build

    def build(args, split):
        model = real_build(args, split)
        model.t5.lm_head.register_forward_hook(lambda m, i, out: dtypes.add((m.training, out.dtype)))
        return model

    monkeypatch.setattr(tiger, "build", build)
    res = run(args_for("tiger", root, "Cycle", tmp_path / "r.json", "--epochs", "1", "--cpu_bf16", choice), tiger)
    assert dtypes == {(True, expect), (False, expect)}  # training and decoding alike
    assert 0 <= res["mean"]["ndcg@10"] <= 1


def test_only_tiger_defaults_to_bf16_where_the_cpu_has_it():
    defaults = {name: resolve_args(build_parser().parse_args(["--dataset", "x"]), family(name)).cpu_bf16
                for name in ("sasrec", "gru4rec", "tiger")}
    assert defaults == {"sasrec": "off", "gru4rec": "off", "tiger": "auto"}


def test_exclude_history_leaves_each_users_earlier_items_out_of_the_test_ranking(tiny_data, tmp_path, monkeypatch):
    """--exclude_history (RecBole's full ranking): the same trained model (same seed, early stopping
    unchanged) ranks no earlier item of the user in its top 10, and the target can only move up."""
    import baselines.runner as runner

    data_path, name = tiny_data
    tops = []
    real = runner.personalisation
    monkeypatch.setattr(runner, "personalisation", lambda t: tops.append(t) or real(t))
    runs = {flag: run(args_for("sasrec", data_path, name, tmp_path / f"{flag}.json", "--epochs", "3",
                               *(["--exclude_history"] if flag else [])), family("sasrec")) for flag in (False, True)}
    assert runs[False]["exclude_history"] is False and runs[True]["exclude_history"] is True
    assert runs[False]["best_valid_ndcg@10"] == runs[True]["best_valid_ndcg@10"]  # the same model
    inters = json.loads((data_path / name / f"{name}.inter.json").read_text())
    users = runs[True]["per_user"]["users"]
    history = {u: set(inters[u][:-1]) for u in users}
    assert sum(bool(set(top) & history[u]) for u, top in zip(users, tops[0])) > 0  # the plain ranking holds some
    assert not any(set(top) & history[u] for u, top in zip(users, tops[1]))
    for u, before, after in zip(users, runs[False]["per_user"]["ndcg@10"], runs[True]["per_user"]["ndcg@10"]):
        if inters[u][-1] in history[u]:  # a repeated target is left out too, as RecBole leaves it
            assert after == 0
        else:
            assert after >= before - 1e-9
    with pytest.raises(DataError, match="--exclude_history: tiger decodes by beam search"):
        run(args_for("tiger", data_path, name, tmp_path / "t.json", "--epochs", "1", "--exclude_history"),
            family("tiger"))
