import json
import subprocess
import sys
from pathlib import Path

import pytest

from item_prior import popularity_ranking
from results_table import results_table
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_baseline_script_matches_hand_computation(tiny_data, tmp_path):
    data_path, name = tiny_data
    out = tmp_path / "pop.json"
    subprocess.run([sys.executable, "baseline.py", "--dataset", name, "--data_path", str(data_path),
                    "--results_file", str(out), "--test_prompt_ids", "0,3", "--metrics", "hit@1,hit@5,ndcg@5"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())
    inters = json.loads((data_path / name / f"{name}.inter.json").read_text())
    top = popularity_ranking({u: s for u, s in inters.items()})[:5]
    hits5 = sum(str(s[-1]) in top for s in inters.values()) / len(inters)
    hits1 = sum(str(s[-1]) == top[0] for s in inters.values()) / len(inters)
    assert res["num_examples"] == len(inters)
    assert res["per_prompt"]["0"]["hit@5"] == pytest.approx(hits5)
    assert res["per_prompt"]["3"] == res["per_prompt"]["0"]
    assert res["mean"]["hit@1"] == pytest.approx(hits1)
    assert res["personalisation"]["0"] == {"distinct_top1": 1, "top10_differs_share": 0.0}  # the same list for all
    se = (hits5 * (1 - hits5) / (len(inters) - 1)) ** 0.5
    assert res["stderr"]["0"]["hit@5"] == pytest.approx(se)
    assert res["per_user"]["users"] == list(inters)  # every test user, in the test set's order
    assert res["per_user"]["hit@5"] == [float(str(s[-1]) in top) for s in inters.values()]
    table = results_table([str(out), str(out)], ["A", "B"])
    assert "| A |" in table and "HR@5" in table and f"{hits5:.4f}" in table
    paired = results_table([str(out), str(out)], ["A", "B"], reference="B")
    assert f"paired over the same {len(inters)} test users" in paired and "| A | +0.0000 ± 0 |" in paired


def test_results_table_pairs_users_against_the_reference(tmp_path):
    from metrics import per_user_values

    def write(name, ranks, users=("u1", "u2", "u3", "u4")):
        per_user = per_user_values(list(users), [ranks], ["hit@1"])
        mean = sum(per_user["hit@1"]) / len(ranks)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"metrics": ["hit@1"], "mean": {"hit@1": mean}, "num_examples": len(ranks),
                                    "per_user": per_user}))
        return str(path)

    model, pop = write("model", [1, 1, 2, 0]), write("pop", [2, 1, 2, 0])
    table = results_table([model, pop], ["Model", "Pop"], reference="Pop")
    # differences 1, 0, 0, 0: mean 0.25, standard error sqrt(0.25 / 4) = 0.25
    assert "| Model | +0.2500 ± 0.2500 (+1.0) |" in table
    with pytest.raises(DataError, match="--reference: 'SASRec' is not one of the --names"):
        results_table([model, pop], ["Model", "Pop"], reference="SASRec")
    other = write("other", [1, 1, 2, 0], users=("u1", "u2", "u3", "u9"))
    with pytest.raises(DataError, match="different test users"):
        results_table([other, pop], ["Other", "Pop"], reference="Pop")
    old = tmp_path / "old.json"  # a file from before per-user values: the table still prints, with a note
    old.write_text(json.dumps({"metrics": ["hit@1"], "mean": {"hit@1": 0.5}}))
    table = results_table([model, str(old)], ["Model", "Old"], reference="Old")
    assert "| Model | 4 | 0.5000 |" in table and "has no per-user values" in table


def test_results_table_rejects_mismatched_names(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"metrics": ["hit@1"], "mean": {"hit@1": 0.5}}))
    with pytest.raises(DataError, match="--names"):
        results_table([str(f)], ["a", "b"])


def test_baseline_refuses_an_unwritable_results_folder_up_front(tiny_data, tmp_path):
    data_path, name = tiny_data
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = subprocess.run([sys.executable, "baseline.py", "--dataset", name, "--data_path", str(data_path),
                           "--results_file", str(blocker / "pop.json"), "--test_task", "SEQREC"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--results_file" in proc.stderr and "cannot be created or written" in proc.stderr
    assert "hit@" not in proc.stdout  # it stopped before the work


def test_cooccurrence_ranker_matches_hand_computation(tiny_data, tmp_path):
    """baseline.py --ranker cooccurrence: per user, the items that followed the last --fusion_context
    history items within --fusion_window steps in the training parts (rows normalised with one
    pseudo-count), the k-th newest context item weighed --fusion_decay ** k, each candidate divided by
    its popularity ** --fusion_damping, then 0.9 of that and 0.1 of popularity (training count + 1);
    every item ranked, history included."""
    import math
    from collections import Counter, defaultdict

    data_path, name = tiny_data
    out = tmp_path / "cooc.json"
    context, window, decay, damping = 2, 3, 0.5, 0.5
    subprocess.run([sys.executable, "baseline.py", "--ranker", "cooccurrence", "--fusion_context", str(context),
                    "--fusion_window", str(window), "--fusion_decay", str(decay), "--fusion_damping", str(damping),
                    "--dataset", name, "--data_path", str(data_path), "--results_file", str(out),
                    "--metrics", "hit@1,hit@5,ndcg@5"], cwd=ROOT, check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())
    inters = json.loads((data_path / name / f"{name}.inter.json").read_text())
    items = [str(i) for i in json.loads((data_path / name / f"{name}.index.json").read_text())]
    follow, popularity = defaultdict(Counter), Counter({i: 1 for i in items})
    for seq in inters.values():
        train = [str(i) for i in seq[:-2]]
        popularity.update(train)
        for a in range(len(train)):
            for b in range(a + 1, min(a + window + 1, len(train))):
                follow[train[a]][train[b]] += 1
    hits5 = []
    for user, seq in inters.items():
        scores, pop = Counter(), sum(popularity.values())
        for age, item in enumerate(reversed([str(i) for i in seq[:-1][-context:]])):
            for other, n in follow[item].items():
                scores[other] += decay ** age * n / (sum(follow[item].values()) + 1)
        scores = Counter({i: v * (popularity[i] / pop) ** -damping for i, v in scores.items()})
        total = sum(scores.values())
        q = {i: (0.9 * scores[i] / total if total else 0) + (0.1 if total else 1) * popularity[i] / pop
             for i in items}
        rank = sorted(items, key=lambda i: -q[i])
        target = str(seq[-1])
        # ties at the fifth place could go either way: only users whose answer is clear are compared
        if abs(q[target] - q[rank[4]]) > 1e-6 and abs(q[target] - q[rank[5]]) > 1e-6:
            hits5.append((user, float(target in rank[:5])))
    assert res["model"] == "cooccurrence" and res["num_examples"] == len(inters)
    assert res["cooccurrence"] == {"context": context, "window": window, "decay": decay, "damping": damping} and res["num_examples"] == len(inters)
    per_user = dict(zip(res["per_user"]["users"], res["per_user"]["hit@5"]))
    assert len(hits5) > len(inters) // 2 and all(per_user[u] == h for u, h in hits5)
    assert not math.isclose(res["mean"]["hit@5"], 0.0)
    assert res["personalisation"]["0"]["distinct_top1"] > 1  # a list of its own for each user
