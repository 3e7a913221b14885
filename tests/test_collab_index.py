"""The collaborative index: LETTER's alignment and diversity losses, and an RQ-VAE trained with them."""
import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_files import load_indices
from index import generate_indices as gen
from index import main as train_main
from index.models.collab import CollabRegularisers, alignment_loss, diversity_loss
from index.trainer import BEST_COLLISION_CKPT
from item_vectors import main as save_collab_vectors
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("probe_signals", ROOT / "bench" / "probe_signals.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
TINY_MODEL = ["--layers", "32", "16", "--e_dim", "8", "--num_emb_list", "16", "16", "32",
              "--sk_epsilons", "0", "0", "0.003", "--kmeans_iters", "20", "--batch_size", "128", "--device", "cpu"]


def test_alignment_loss_is_infonce_over_the_batch():
    z_q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    collab = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # logits z_q @ collab.T = [[1, 0], [2, 2]]; row 0's positive is 1, row 1's is 2
    expected = (-math.log(math.exp(1) / (math.exp(1) + 1)) - math.log(0.5)) / 2
    assert alignment_loss(z_q, collab).item() == pytest.approx(expected, rel=1e-6)
    assert alignment_loss(z_q, collab, temperature=0.5).item() == pytest.approx(
        (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(0.5)) / 2, rel=1e-6)


def test_diversity_loss_targets_another_code_of_the_cluster():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    clusters = torch.tensor([0, 0, 1])  # codes 0 and 1 share a cluster; code 2 is alone
    # item with code 0: positive code 1 (the only other in its cluster); logits over codes 1, 2 = [0, 1]
    expected = -math.log(math.exp(0) / (math.exp(0) + math.exp(1)))
    assert diversity_loss(codebook, torch.tensor([0]), clusters).item() == pytest.approx(expected, rel=1e-6)
    # an item whose code is alone in its cluster has no positive and sits out
    both = diversity_loss(codebook, torch.tensor([0, 2]), clusters)
    assert both.item() == pytest.approx(expected, rel=1e-6)
    lonely = diversity_loss(codebook.requires_grad_(), torch.tensor([2]), clusters)
    assert lonely.item() == 0 and lonely.requires_grad


def test_regularisers_skip_items_without_collaborative_embedding_and_project_other_widths():
    collab = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # item 2: no signal
    reg = CollabRegularisers(collab, e_dim=2, align_weight=0.5, diversity_weight=0.0)
    assert isinstance(reg.project, torch.nn.Linear)  # 3-d embeddings, 2-d codes
    z_q = torch.randn(3, 2)
    loss, parts = reg(z_q, torch.tensor([0, 1, 2]), torch.zeros(3, 1, dtype=torch.long), rq=None)
    expected = alignment_loss(z_q[:2], reg.project(collab[:2]))
    assert parts["align"] == pytest.approx(expected.item()) and loss.item() == pytest.approx(0.5 * expected.item())
    same = CollabRegularisers(collab[:, :2], e_dim=2, align_weight=1.0, diversity_weight=0.0)
    assert isinstance(same.project, torch.nn.Identity)  # LETTER's case: equal widths, no map


def co_watched_dataset(root: Path, n_groups: int = 4, per_group: int = 8, n_users: int = 120, seed: int = 0) -> Path:
    """Each user watches 6 items of one of n_groups groups; the items' text embeddings are random,
    unrelated to the groups."""
    rng = random.Random(seed)
    n = n_groups * per_group
    inters = {str(u): rng.sample(range((u % n_groups) * per_group, (u % n_groups + 1) * per_group), 6)
              for u in range(n_users)}
    folder = root / "CoWatch"
    folder.mkdir(parents=True)
    (folder / "CoWatch.inter.json").write_text(json.dumps(inters))
    (folder / "CoWatch.item.json").write_text(json.dumps({str(i): {"title": f"Item {i}"} for i in range(n)}))
    np.save(folder / "text.npy", np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32))
    return folder


def level0_scorer_hit(index_file: Path, inters: dict) -> float:
    """HR@10 of the probe's level-0 code co-occurrence scorer for an index file."""
    train = [seq[:-2] for seq in inters.values()]
    n = 1 + max(i for seq in inters.values() for i in seq)
    counts = np.bincount(np.concatenate(train), minlength=n).astype(float)
    codes = probe.item_codes(json.loads(index_file.read_text()), n)
    _, score, remove = probe.cooccurrence_rows(codes, train, counts, np.log(counts + 1))[0]
    result = probe.evaluate(score, [seq[:-1][-5:] for seq in inters.values()], [seq[-1] for seq in inters.values()],
                            remove)
    return result["hit@10"][0]


def test_collaborative_index_groups_co_watched_items_at_level_0(tmp_path):
    folder = co_watched_dataset(tmp_path)
    save_collab_vectors(["--data_path", str(tmp_path), "--dataset", "CoWatch", "--output", str(folder / "collab.npy"),
                         "--dim", "8"])
    model = ["--layers", "16", "--e_dim", "8", "--num_emb_list", "4", "8", "16", "--sk_epsilons", "0", "0", "0.003",
             "--kmeans_iters", "10", "--batch_size", "8", "--epochs", "40", "--eval_step", "40", "--warmup_epochs", "1",
             "--lr", "5e-3", "--device", "cpu"]
    collab = ["--collab_emb", str(folder / "collab.npy"), "--align_weight", "1", "--align_similarity", "cosine",
              "--align_temperature", "0.1"]
    hits = {}
    for name, extra in (("text", []), ("collab", collab)):
        train_main.main(["--data_path", str(folder / "text.npy"), "--ckpt_dir", str(tmp_path / name), *model, *extra])
        out = folder / f"{name}.index.json"
        gen.main(["--ckpt_path", str(tmp_path / name / BEST_COLLISION_CKPT), "--output_file", str(out), "--no_plot",
                  "--device", "cpu"])
        assert len(load_indices(out, range(32))) == 32  # distinct full codes
        hits[name] = level0_scorer_hit(out, json.loads((folder / "CoWatch.inter.json").read_text()))
    # 4 level-0 codes: the text index's split the groups at random, the collaborative index's follow them
    assert hits["collab"] > hits["text"] + 0.2, hits


def test_collaborative_index_has_no_collisions_on_duplicated_items(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((200, 24)).astype(np.float32)
    emb[180:] = emb[:20]  # 20 items identical to others in text ...
    collab = rng.standard_normal((200, 8)).astype(np.float32)
    collab[180:] = collab[:20]  # ... and in the collaborative embedding
    np.save(tmp_path / "emb.npy", emb)
    np.save(tmp_path / "collab.npy", collab)
    train_main.main(["--data_path", str(tmp_path / "emb.npy"), "--ckpt_dir", str(tmp_path / "ckpt"), "--epochs", "4",
                     "--eval_step", "2", "--warmup_epochs", "1", "--collab_emb", str(tmp_path / "collab.npy"),
                     *TINY_MODEL])
    report = gen.main(["--ckpt_path", str(tmp_path / "ckpt" / BEST_COLLISION_CKPT), "--output_file",
                       str(tmp_path / "idx.json"), "--no_plot", "--device", "cpu"])
    assert report["before"]["collision_rate"] > 0 and report["after"]["collision_rate"] == 0
    assert len(load_indices(tmp_path / "idx.json", range(200))) == 200


def test_training_prints_the_alignment_loss_and_refuses_a_mismatched_file(tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "emb.npy", rng.standard_normal((150, 24)).astype(np.float32))
    np.save(tmp_path / "collab.npy", rng.standard_normal((150, 8)).astype(np.float32))
    result = train_main.main(["--data_path", str(tmp_path / "emb.npy"), "--ckpt_dir", str(tmp_path / "ckpt"),
                              "--epochs", "2", "--eval_step", "2", "--collab_emb", str(tmp_path / "collab.npy"),
                              *TINY_MODEL])
    printed = capsys.readouterr()
    assert "align " in printed.err + printed.out and "diversity " in printed.err + printed.out
    assert result["history"][-1]["align_loss"] > 0 and result["history"][-1]["diversity_loss"] > 0
    np.save(tmp_path / "short.npy", rng.standard_normal((149, 8)).astype(np.float32))
    with pytest.raises(DataError, match="--collab_emb .*149 rows.*150"):
        train_main.main(["--data_path", str(tmp_path / "emb.npy"), "--ckpt_dir", str(tmp_path / "ckpt2"),
                         "--collab_emb", str(tmp_path / "short.npy"), *TINY_MODEL])


def test_item_vectors_cli_saves_one_row_per_item(tmp_path):
    folder = co_watched_dataset(tmp_path, n_groups=2, per_group=6, n_users=20)
    out = tmp_path / "v.npy"
    save_collab_vectors(["--data_path", str(tmp_path), "--dataset", "CoWatch", "--output", str(out), "--dim", "4"])
    vectors = np.load(out)
    assert vectors.shape == (12, 4) and vectors.dtype == np.float32
    cos = vectors @ vectors.T / np.outer(np.linalg.norm(vectors, axis=1), np.linalg.norm(vectors, axis=1))
    assert cos[0, 1:6].min() > cos[0, 6:].max()  # items 0-5 were watched together, 6-11 apart from them
    assert not list(folder.glob(".*tmp*"))
