"""bench/probe_signals.py: the count-based scorers that say where a dataset's next-item signal lives."""
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from fixtures import make_indices

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("probe_signals", ROOT / "bench" / "probe_signals.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_follow_counts_count_within_the_window():
    follows = probe.follow_counts([[0, 1, 2], [2, 1]], np.arange(3), 3, window=1).toarray()
    assert follows.tolist() == [[0, 1, 0], [0, 0, 1], [0, 1, 0]]
    wide = probe.follow_counts([[0, 1, 2]], np.arange(3), 3, window=2).toarray()
    assert wide[0].tolist() == [0, 1, 1]
    by_code = probe.follow_counts([[0, 1, 2]], np.array([0, 0, 1]), 2, window=1).toarray()
    assert by_code.tolist() == [[1, 1], [0, 0]]  # items 0 and 1 share code 0


def test_random_windows_are_consecutive_slices():
    seqs = [list(range(10)), list(range(100, 103))]
    for window in probe.random_windows(seqs, 50, 4, seed=1):
        assert 3 <= len(window) <= 4 and all(b == a + 1 for a, b in zip(window, window[1:]))


def chain_dataset(root: Path, n_items: int = 40, n_users: int = 60) -> Path:
    """Every user walks the items in order (k -> k + 1), from a random start: the next item is
    fixed by the last one, and every item is about equally popular."""
    rng = random.Random(0)
    folder = root / "Chain"
    folder.mkdir(parents=True)
    inters = {str(u): [(start + k) % n_items for k in range(12)]
              for u, start in enumerate(rng.randrange(n_items) for _ in range(n_users))}
    items = {str(i): {"title": f"Film {i}", "year": str(1990 + i % 8)} for i in range(n_items)}
    (folder / "Chain.inter.json").write_text(json.dumps(inters))
    (folder / "Chain.item.json").write_text(json.dumps(items))
    (folder / "Chain.index.json").write_text(json.dumps(make_indices(n_items, levels=3, codes=4)))
    return root


def run_probe(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "probe_signals.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def hit10(stdout: str, row: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith(row))
    return float(line.split("hit@10")[1].split()[0])


def test_item_co_occurrence_finds_a_sequential_signal_popularity_cannot(tmp_path):
    data_path = chain_dataset(tmp_path)
    emb = np.random.default_rng(0).normal(size=(40, 8))
    np.save(tmp_path / "emb.npy", emb)
    out = run_probe("--data_path", data_path, "--dataset", "Chain", "--embedding", tmp_path / "emb.npy",
                    "--windows", 200)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("content", "era", "code co-occurrence, level 2"):
        assert row in out.stdout
    assert hit10(out.stdout, "item co-occurrence, all training") > 0.95
    assert hit10(out.stdout, "popularity ") < 0.6
    # the collab start's item vectors put an item next to its neighbours in the walk
    assert hit10(out.stdout, "collab start, items") > hit10(out.stdout, "popularity, history removed") + 0.3
    assert "collab start, code rows" in out.stdout and "title start" not in out.stdout


def test_the_title_start_row_reads_the_base_model(tmp_path, tiny_base_model):
    out = run_probe("--data_path", chain_dataset(tmp_path), "--dataset", "Chain", "--windows", 50,
                    "--base_model", tiny_base_model)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 0 <= hit10(out.stdout, "title start, code rows") <= 1


def test_a_bad_embedding_file_is_refused_by_name(tmp_path):
    data_path = chain_dataset(tmp_path)
    np.save(tmp_path / "emb.npy", np.zeros((7, 8)))
    out = run_probe("--data_path", data_path, "--dataset", "Chain", "--embedding", tmp_path / "emb.npy")
    assert out.returncode != 0 and "--embedding" in out.stderr and "40" in out.stderr
    out = run_probe("--data_path", data_path, "--dataset", "Chain", "--windows", 0)
    assert out.returncode != 0 and "--windows" in out.stderr


def test_index_files_are_compared_on_the_same_users(tmp_path):
    data_path = chain_dataset(tmp_path)
    a, b = tmp_path / "a.index.json", tmp_path / "b.index.json"
    a.write_text(json.dumps(make_indices(40, levels=2, codes=8, seed=1)))
    # b's level-0 code is the item's place in the walk, in 8 runs of 5: the next item's code follows the last one's
    b.write_text(json.dumps({str(i): [f"<a_{i // 5}>", f"<b_{i % 5}>"] for i in range(40)}))
    out = run_probe("--data_path", data_path, "--dataset", "Chain", "--windows", 50, "--index_files", a, b)
    assert out.returncode == 0, out.stderr[-2000:]
    level0 = {f: hit10(out.stdout, f"code co-occurrence, level 0 [{f}]") for f in (a, b)}
    assert level0[b] > level0[a] + 0.2
    paired = next(line for line in out.stdout.splitlines() if line.startswith(f"level 0: {b} minus {a}, paired"))
    assert float(paired.split("hit@10")[1].split()[0]) > 0.2
    c = tmp_path / "c.index.json"
    c.write_text(json.dumps(make_indices(39, levels=2, codes=8, seed=1)))
    bad = run_probe("--data_path", data_path, "--dataset", "Chain", "--index_files", c)
    assert bad.returncode != 0 and str(c) in bad.stderr
