"""RQ-VAE indexer: Sinkhorn mapping, training checkpoints and collision-free index generation."""
import json
import warnings

import numpy as np
import pytest
import torch

from index import generate_indices as gen
from index import main as train_main
from index.codes import code_stats
from index.datasets import load_embeddings
from index.models.layers import sinkhorn, sinkhorn_assign
from index.models.rqvae import RQVAE
from index.trainer import BEST_COLLISION_CKPT, BEST_LOSS_CKPT, encode_all, load_checkpoint, save_checkpoint
from utils import DataError, load_indices

TINY_MODEL = ["--layers", "32", "16", "--e_dim", "8", "--num_emb_list", "16", "16", "32",
              "--sk_epsilons", "0", "0", "0.003", "--kmeans_iters", "20", "--batch_size", "128"]


def clustered_embeddings(n=300, dim=24, n_dup=15, seed=0):
    """Items around 12 centres; the last n_dup rows (5%) are exact copies of earlier rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)) * 3
    emb = centres[rng.integers(0, 12, n)] + rng.standard_normal((n, dim))
    emb[n - n_dup:] = emb[rng.integers(0, 5, n_dup)]  # groups of identical items
    return emb.astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(embedding path, checkpoint folder, training result) of a tiny RQ-VAE trained a few epochs."""
    root = tmp_path_factory.mktemp("rqvae")
    emb_path = root / "Tiny.emb-test-td.npy"
    np.save(emb_path, clustered_embeddings())
    ckpt_dir = root / "ckpt"
    result = train_main.main(["--data_path", str(emb_path), "--ckpt_dir", str(ckpt_dir), "--epochs", "6",
                              "--eval_step", "2", "--device", "cpu", *TINY_MODEL])
    return emb_path, ckpt_dir, result


def test_sinkhorn_spreads_skewed_input_uniformly():
    torch.manual_seed(0)
    B, K = 512, 16
    distances = torch.rand(B, K) + torch.linspace(0, 1, K)[None, :]  # most items nearest to code 0
    nearest = np.bincount(distances.argmin(1).numpy(), minlength=K)
    assert nearest[0] > 4 * B / K and (nearest == 0).sum() >= 4  # skewed: some codes unused
    plan = sinkhorn(distances, epsilon=0.05, iters=50)
    assert torch.allclose(plan.sum(0), torch.full((K,), 1 / K, dtype=plan.dtype), rtol=1e-6)  # code mass
    assert torch.allclose(plan.sum(1), torch.full((B,), 1 / B, dtype=plan.dtype), rtol=1e-3)  # item mass
    counts = np.bincount(sinkhorn_assign(distances, 0.05, 50).numpy(), minlength=K)
    assert counts.min() >= 0.5 * B / K and counts.max() <= 1.5 * B / K


def test_sinkhorn_nan_falls_back_with_warning():
    torch.manual_seed(0)
    distances = torch.rand(64, 16) + torch.linspace(0, 1, 16)[None, :]  # the last codes are nobody's nearest
    with pytest.warns(RuntimeWarning, match="NaN/inf with sk_epsilon=1e-06"):
        codes = sinkhorn_assign(distances, epsilon=1e-6, iters=20)
    assert codes.shape == (64,) and codes.min() >= 0 and codes.max() < 16
    assert len(set(codes.tolist())) > 8  # a real Sinkhorn assignment, not everyone on one code
    bad = distances.clone()
    bad[3, 5] = float("nan")
    with pytest.warns(RuntimeWarning, match="fell back to the nearest code"):
        codes = sinkhorn_assign(bad, epsilon=0.003, iters=20)
    assert codes.tolist() == torch.nan_to_num(bad, nan=float("inf")).argmin(1).tolist()


def test_uniform_mapping_lowers_collisions():
    plain, mapped = [], []
    for seed in range(3):  # same model and data with and without Sinkhorn on the last level
        torch.manual_seed(seed)
        emb = torch.from_numpy(clustered_embeddings(n=256, n_dup=0, seed=1 + seed))
        model = RQVAE(in_dim=24, num_emb_list=[4, 128], e_dim=8, layers=[32, 16], kmeans_iters=10,
                      sk_epsilons=[0, 0.003])
        model.train()
        model(emb)  # k-means initialisation of both codebooks on this batch
        plain.append(code_stats(encode_all(model, emb, use_sk=False), [4, 128])["collision_rate"])
        mapped.append(code_stats(encode_all(model, emb, use_sk=True), [4, 128])["collision_rate"])
    assert all(m < p for m, p in zip(mapped, plain)), (plain, mapped)
    assert sum(mapped) < 0.93 * sum(plain)


def test_checkpoints_written_and_reload(trained):
    emb_path, ckpt_dir, result = trained
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted([BEST_LOSS_CKPT, BEST_COLLISION_CKPT])  # no temp files
    emb = torch.from_numpy(load_embeddings(emb_path))
    for name in (BEST_LOSS_CKPT, BEST_COLLISION_CKPT):
        model, ckpt = load_checkpoint(ckpt_dir / name)
        assert ckpt["args"]["num_emb_list"] == [16, 16, 32] and ckpt["epoch"] in (2, 4, 6)
        # the stored figure is that of the stored weights
        assert code_stats(encode_all(model, emb), [16, 16, 32])["collision_rate"] == pytest.approx(ckpt["collision_rate"])
    best_loss = torch.load(ckpt_dir / BEST_LOSS_CKPT, weights_only=True)
    best_coll = torch.load(ckpt_dir / BEST_COLLISION_CKPT, weights_only=True)
    assert best_loss["loss"] == pytest.approx(result["best_loss"])
    assert best_coll["collision_rate"] == pytest.approx(result["best_collision_rate"])
    assert best_coll["collision_rate"] <= best_loss["collision_rate"]


def test_generate_indices_zero_collisions_with_duplicates(trained, tmp_path, capsys):
    emb_path, ckpt_dir, _ = trained
    out = tmp_path / "Tiny" / "Tiny.index.json"
    report = gen.main(["--ckpt_path", str(ckpt_dir / BEST_COLLISION_CKPT), "--data_path", str(emb_path),
                       "--output_file", str(out), "--max_rounds", "5", "--device", "cpu"])
    assert report["before"]["collision_rate"] > 0 and report["finished_items"] > 0  # duplicates need the final step
    assert report["after"]["collision_rate"] == 0
    indices = load_indices(out, required_items=range(300))  # validates: distinct, equal lengths
    assert len(indices) == 300
    assert all(t[0].startswith("<a_") and t[1].startswith("<b_") and t[2].startswith("<c_") for t in indices.values())
    assert (tmp_path / "Tiny" / "Tiny.index.codes.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "before:" in printed and "collision rate 0.0000" in printed


def test_final_assignment_prefers_nearest_free_code():
    codes = np.array([[0, 1], [0, 1], [0, 2], [1, 1]])  # items 0 and 1 collide; item 2 holds code 2
    dist = np.array([[5, 0, 1, 2], [5, 0, 1, 3], [5, 5, 0, 5], [0, 0, 0, 0]], dtype=float)
    moved = gen.finish_collisions(codes, dist)
    # code 2 is taken by item 2; the cheapest distinct choice is item 0 -> 3, item 1 -> 1
    assert codes.tolist() == [[0, 3], [0, 1], [0, 2], [1, 1]] and moved == 1


def test_prefix_with_more_items_than_codes_is_refused(tmp_path):
    torch.manual_seed(0)
    emb = np.repeat(np.random.default_rng(0).standard_normal((1, 24)), 5, axis=0).astype(np.float32)
    emb_path = tmp_path / "same.npy"
    np.save(emb_path, emb)
    args = vars(train_main.build_parser().parse_args(["--data_path", str(emb_path), *TINY_MODEL[:5],
                                                      "--num_emb_list", "2", "4", "--sk_epsilons", "0", "0"]))
    save_checkpoint(tmp_path / "m.pth", train_main.build_model(24, args), args)
    out = tmp_path / "out.index.json"
    with pytest.raises(DataError, match=r"5 items share the prefix <a_\d+> but the last level has only 4 codes"):
        gen.main(["--ckpt_path", str(tmp_path / "m.pth"), "--data_path", str(emb_path), "--output_file", str(out)])
    assert not out.exists() and not list(tmp_path.glob("*.png"))


def test_bad_inputs(tmp_path, trained):
    with pytest.raises(DataError, match="embedding file not found"):
        load_embeddings(tmp_path / "missing.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_embeddings(tmp_path / "text.npy")
    np.save(tmp_path / "flat.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(DataError, match="2-D array"):
        load_embeddings(tmp_path / "flat.npy")
    np.save(tmp_path / "obj.npy", np.array([["a", "b"]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable .npy"):
        load_embeddings(tmp_path / "obj.npy")
    nan = np.ones((4, 3), dtype=np.float32)
    nan[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match=r"1 rows contain NaN/inf \(first rows: \[2\]\)"):
        load_embeddings(tmp_path / "nan.npy")
    np.save(tmp_path / "wrong_dim.npy", np.ones((5, 7), dtype=np.float32))
    _, ckpt_dir, _ = trained
    with pytest.raises(DataError, match="dimension 7 but the checkpoint"):
        gen.main(["--ckpt_path", str(ckpt_dir / BEST_LOSS_CKPT), "--data_path", str(tmp_path / "wrong_dim.npy"),
                  "--output_file", str(tmp_path / "x.index.json")])
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not an RQ-VAE checkpoint"):
        load_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(SystemExit):  # one epsilon per level
        train_main.main(["--data_path", str(tmp_path / "wrong_dim.npy"), "--num_emb_list", "4", "4", "--sk_epsilons", "0"])
