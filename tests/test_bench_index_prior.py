"""bench/bench_index_prior.py: the history-blind bias models it compares with popularity."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_index_prior", ROOT / "bench" / "bench_index_prior.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def tiny_codes():
    # three levels; the branches have 1, 2 and 3 items, so the trie softmax is not the level one
    return torch.tensor([[0, 3, 6], [1, 4, 7], [1, 4, 8], [2, 5, 6], [2, 5, 7], [2, 3, 8]])


def test_trie_probabilities_sum_to_one_and_the_fit_beats_level_biases():
    codes = tiny_codes()
    siblings = bench.sibling_codes(bench.IndexTrie(codes.tolist(), eos_token_id=9), codes)
    assert siblings[0, 0].tolist() == [0, 1, 2] and siblings[1, 2].tolist() == [7, 8, -1]
    torch.manual_seed(0)
    bias = torch.randn(9)
    assert bench.trie_log_prob(bias, codes, siblings).exp().sum().item() == pytest.approx(1.0, rel=1e-5)
    weight = torch.tensor([50.0, 1.0, 1.0, 1.0, 1.0, 30.0])
    share = weight / weight.sum()
    freq = torch.zeros(9).index_add_(0, codes.flatten(), weight.repeat_interleave(3))
    fitted = bench.fit_trie_bias(codes, weight, siblings, 9)
    nats = {name: -(share * bench.trie_log_prob(b, codes, siblings)).sum().item()
            for name, b in (("level", (freq + 1).log()), ("fitted", fitted))}
    entropy = -(share * share.log()).sum().item()
    assert entropy - 1e-4 <= nats["fitted"] < nats["level"]
    # item 0 (weight 50) is alone under code 0: the fitted biases rank it first
    assert bench.trie_log_prob(fitted, codes, siblings).argmax().item() == 0


def test_level_log_prob_is_a_sum_of_level_softmaxes():
    codes = tiny_codes()
    level_tokens = bench.IndexTrie(codes.tolist(), eos_token_id=9).level_tokens
    assert [t.tolist() for t in level_tokens] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    bias = torch.arange(9, dtype=torch.float)
    want = sum(torch.log_softmax(bias[3 * lv: 3 * lv + 3], 0)[codes[1, lv] - 3 * lv] for lv in range(3))
    assert bench.level_log_prob(bias, codes, level_tokens)[1].item() == pytest.approx(want.item(), rel=1e-6)


def test_runs_on_a_dataset(tiny_data):
    data_path, _ = tiny_data
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_index_prior.py"), "--data_path", str(data_path),
                          "--dataset", "Tiny"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[1].startswith("popularity") and "trie biases (ML, fitted)" in lines[-1]
    missing = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_index_prior.py"), "--data_path",
                              str(data_path), "--dataset", "Nope"], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "Nope" in missing.stderr
