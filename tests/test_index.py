"""RQ-VAE indexer: Sinkhorn mapping, training checkpoints and collision-free index generation."""
import json
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dataset_files import load_indices
from index import generate_indices as gen
from index import main as train_main
from index.codes import code_stats
from index.embedding_data import load_embeddings
from index.models.layers import sinkhorn, sinkhorn_assign
from index.models.rqvae import RQVAE
from index.trainer import (BEST_COLLISION_CKPT, BEST_LOSS_CKPT, Trainer, build_model, encode_all, load_checkpoint,
                           save_checkpoint)
from utils import DataError

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
                              "--eval_step", "2", "--warmup_epochs", "1", "--device", "cpu", *TINY_MODEL])
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
    with pytest.raises(DataError, match="bad.pth: the checkpoint file is truncated or corrupt, or not a PyTorch"):
        load_checkpoint(tmp_path / "bad.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(DataError, match=r"other.pth: not an RQ-VAE checkpoint written by index/main.py \(KeyError"):
        load_checkpoint(tmp_path / "other.pth")
    with pytest.raises(SystemExit):  # one epsilon per level
        train_main.main(["--data_path", str(tmp_path / "wrong_dim.npy"), "--num_emb_list", "4", "4", "--sk_epsilons", "0"])


# ----------------------------------------------------------------------------- optimisation
def record_steps(monkeypatch):
    """Spy on every optimiser step: the learning rate it uses, the gradient norm it sees, and
    the norm clip_grad_norm_ measured before clipping."""
    seen = {"lr": [], "norm": [], "clip_max": [], "unclipped": []}

    def pre_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen["norm"].append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        seen["lr"].append(optimizer.param_groups[0]["lr"])

    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_spy(params, max_norm, *args, **kwargs):
        seen["clip_max"].append(max_norm)
        total = real_clip(params, max_norm, *args, **kwargs)
        seen["unclipped"].append(float(total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_spy)
    handle = register_optimizer_step_pre_hook(pre_step)
    return seen, handle


def test_warmup_linear_decay_and_gradient_clipping(tmp_path, monkeypatch):
    emb_path = tmp_path / "big.npy"
    np.save(emb_path, clustered_embeddings() * 30)  # large inputs make gradient norms far above 1
    seen, handle = record_steps(monkeypatch)
    try:  # 300 items in batches of 128: 3 steps per epoch, 30 steps, 9 of warm-up
        train_main.main(["--data_path", str(emb_path), "--ckpt_dir", str(tmp_path / "ckpt"), "--epochs", "10",
                         "--eval_step", "2", "--warmup_epochs", "3", "--lr_scheduler_type", "linear", "--lr", "2e-3",
                         "--save_limit", "2", "--device", "cpu", *TINY_MODEL])
    finally:
        handle.remove()
    lr = np.array(seen["lr"])
    assert len(lr) == 30 and seen["clip_max"] == [1.0] * 30  # clipped to 1.0 at every step
    assert lr[0] == 0 and np.all(np.diff(lr[:10]) > 0)  # linear warm-up over 3 epochs = 9 steps
    assert lr[9] == pytest.approx(2e-3) and lr.max() == pytest.approx(2e-3)  # --lr at the end of warm-up
    assert np.all(np.diff(lr[9:]) < 0) and lr[-1] < 0.1 * 2e-3  # then linear decay, ~0 at the last step
    assert max(seen["unclipped"]) > 10  # the gradients needed clipping ...
    assert max(seen["norm"]) <= 1.0 + 1e-4  # ... and the optimiser only saw clipped ones
    # --save_limit 2: the two latest evaluation epochs are kept beside the best checkpoints
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("epoch_*")) == ["epoch_10_model.pth", "epoch_8_model.pth"]


def test_constant_schedule_after_warmup_and_learners(tmp_path, monkeypatch):
    emb = torch.from_numpy(clustered_embeddings())
    parser = train_main.build_parser()
    seen, handle = record_steps(monkeypatch)
    try:
        args = parser.parse_args(["--data_path", "x.npy", "--ckpt_dir", str(tmp_path), "--epochs", "4",
                                  "--eval_step", "4", "--warmup_epochs", "1", *TINY_MODEL])  # default: constant
        Trainer(build_model(24, vars(args)), args, torch.device("cpu")).fit(emb)
    finally:
        handle.remove()
    assert seen["lr"][:3] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3]) and seen["lr"][3:] == pytest.approx([1e-3] * 9)
    expected = {"AdamW": torch.optim.AdamW, "adam": torch.optim.Adam, "SGD": torch.optim.SGD,
                "adagrad": torch.optim.Adagrad, "RMSPROP": torch.optim.RMSprop}
    for name, cls in expected.items():
        args = parser.parse_args(["--data_path", "x.npy", "--learner", name, "--lr", "0.01", "--weight_decay", "0.5",
                                  *TINY_MODEL])
        optimizer = Trainer(build_model(24, vars(args)), args, torch.device("cpu")).optimizer
        assert type(optimizer) is cls and optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0.5
    for bad in (["--learner", "lbfgs"], ["--lr_scheduler_type", "plateau"], ["--loss_type", "huber"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--data_path", "x.npy", *bad])


ORIGINAL_COMMAND = ("--lr 1e-3 --epochs 10000 --batch_size 1024 --weight_decay 1e-4 --lr_scheduler_type linear "
                    "--dropout_prob 0.0 --bn False --e_dim 32 --quant_loss_weight 1.0 --beta 0.25 "
                    "--num_emb_list 256 256 256 256 --sk_epsilons 0.0 0.0 0.0 0.003 --layers 2048 1024 512 256 128 64 "
                    "--device cuda:0 --data_path X --ckpt_dir Y").split()


def test_original_command_line_parses():
    args = train_main.build_parser().parse_args(ORIGINAL_COMMAND)
    assert args.lr_scheduler_type == "linear" and args.warmup_epochs == 50 and args.learner == "adamw"
    assert args.bn is False  # read as a value here: the original's bool-typed flag took "False" as true
    assert args.layers == [2048, 1024, 512, 256, 128, 64] and args.sk_epsilons == [0, 0, 0, 0.003]
    assert (args.data_path, args.ckpt_dir, args.device, args.epochs) == ("X", "Y", "cuda:0", 10000)
    more = train_main.build_parser().parse_args(
        [*ORIGINAL_COMMAND, "--num_workers", "4", "--learner", "AdamW", "--warmup_epochs", "50", "--loss_type", "l1",
         "--save_limit", "5", "--eval_step", "50", "--kmeans_init", "true", "--kmeans_iters", "100",
         "--sk_iters", "50"])
    assert (more.num_workers, more.learner, more.loss_type, more.save_limit) == (4, "adamw", "l1", 5)
    defaults = train_main.build_parser().parse_args(["--data_path", "X"])
    assert (defaults.lr_scheduler_type, defaults.loss_type, defaults.save_limit, defaults.bn) == \
        ("constant", "mse", 0, False)


@pytest.mark.parametrize("flags, expected", [([], False), (["--bn", "False"], False), (["--bn", "false"], False),
                                             (["--bn", "0"], False), (["--bn", "true"], True), (["--bn", "True"], True),
                                             (["--bn"], True), (["--bn", "--e_dim", "8"], True)])
def test_bn_flag_reads_its_value(flags, expected):
    args = train_main.build_parser().parse_args(["--data_path", "X", *flags, *TINY_MODEL[:3]])
    assert args.bn is expected
    model = build_model(24, vars(args))
    n_bn = sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert n_bn == (4 if expected else 0)  # 2 hidden layers in the encoder and 2 in the decoder


def test_bn_flag_rejects_other_words():
    with pytest.raises(SystemExit):
        train_main.build_parser().parse_args(["--data_path", "X", "--bn", "maybe"])


def test_index_run_sh_uses_the_paper_settings(tmp_path):
    """index/run.sh, with a stand-in python that records its command lines."""
    log = tmp_path / "argv.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> {log}\necho END >> {log}\n')
    stub.chmod(0o755)
    root = Path(train_main.__file__).resolve().parents[1]
    subprocess.run(["bash", str(root / "index" / "run.sh")], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHON": str(stub), "EMB_FILE": "e.npy"}, capture_output=True)
    train_argv = log.read_text().split("END\n")[0].split("\n")
    assert train_argv[0] == "index/main.py"
    args = train_main.build_parser().parse_args([a for a in train_argv[1:] if a])
    assert args.bn is True and args.lr_scheduler_type == "linear" and args.warmup_epochs == 50
    assert (args.learner, args.lr, args.weight_decay, args.batch_size) == ("adamw", 1e-3, 1e-4, 1024)
    assert args.layers == [2048, 1024, 512, 256, 128, 64] and args.sk_epsilons == [0, 0, 0, 0.003]
    assert args.seed == 2024  # the original's RQ-VAE seed


def test_l1_reconstruction_loss():
    torch.manual_seed(0)
    x, recon = torch.randn(8, 24), torch.randn(8, 24)
    for loss_type, fn in (("mse", F.mse_loss), ("l1", F.l1_loss)):
        model = RQVAE(in_dim=24, num_emb_list=[4], e_dim=8, layers=[16], loss_type=loss_type, quant_loss_weight=0.5)
        total, rec = model.compute_loss(recon, torch.tensor(2.0), x)
        assert rec == pytest.approx(float(fn(recon, x))) and total == pytest.approx(float(fn(recon, x)) + 1.0)
    assert F.l1_loss(recon, x) != pytest.approx(float(F.mse_loss(recon, x)), rel=0.05)  # the two really differ


# ----------------------------------------------------------------------------- generate_indices inputs
def test_generate_indices_takes_embeddings_from_checkpoint(trained, tmp_path, capsys):
    emb_path, ckpt_dir, _ = trained
    out = tmp_path / "from_ckpt.index.json"
    report = gen.main(["--ckpt_path", str(ckpt_dir / BEST_COLLISION_CKPT), "--output_file", str(out),
                       "--no_plot", "--device", "cpu"])
    assert report["after"]["collision_rate"] == 0 and len(load_indices(out, required_items=range(300))) == 300
    assert f"embeddings: {emb_path}" in capsys.readouterr().out

    model, ckpt = load_checkpoint(ckpt_dir / BEST_COLLISION_CKPT)
    save_checkpoint(tmp_path / "moved.pth", model, {**ckpt["args"], "data_path": str(tmp_path / "gone.npy")})
    with pytest.raises(DataError, match=r"no --data_path given and the embeddings the checkpoint .*moved.pth was "
                                        r"trained on, .*gone.npy, do not exist"):
        gen.main(["--ckpt_path", str(tmp_path / "moved.pth"), "--output_file", str(tmp_path / "x.index.json")])
    assert not (tmp_path / "x.index.json").exists()


def huge_embeddings(path, scale=1e25):
    emb = clustered_embeddings() * scale  # finite in float32, but absurd for an RQ-VAE
    assert np.isfinite(emb).all()
    np.save(path, emb)
    return path


def test_huge_embeddings_refused_by_training(tmp_path):
    emb_path = huge_embeddings(tmp_path / "Huge.emb-x-td.npy")
    with pytest.raises(DataError, match=r"Huge.emb-x-td.npy: values are too large: max \|x\| = [\d.]+e\+2[56]"):
        train_main.main(["--data_path", str(emb_path), "--ckpt_dir", str(tmp_path / "ckpt"), "--epochs", "4",
                         "--warmup_epochs", "1", "--device", "cpu", *TINY_MODEL])
    assert not (tmp_path / "ckpt").exists()
    np.save(tmp_path / "ok.npy", clustered_embeddings() * 1e3)  # large but sane scales still load
    assert load_embeddings(tmp_path / "ok.npy").shape == (300, 24)


def test_huge_embeddings_refused_by_generate_indices(trained, tmp_path):
    _, ckpt_dir, _ = trained
    emb_path = huge_embeddings(tmp_path / "Huge.emb-x-td.npy", scale=1e20)
    out = tmp_path / "huge.index.json"
    with pytest.raises(DataError, match=r"Huge.emb-x-td.npy: values are too large"):
        gen.main(["--ckpt_path", str(ckpt_dir / BEST_COLLISION_CKPT), "--data_path", str(emb_path),
                  "--output_file", str(out), "--device", "cpu"])
    assert not out.exists()


def test_final_assignment_survives_non_finite_distances():
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 0]])  # items 0-2 collide; item 3 holds code 0
    dist = np.array([[np.inf, 0, np.nan, 2, np.inf],
                     [np.inf, np.inf, 1, np.inf, np.nan],
                     [np.nan, np.nan, np.nan, np.nan, np.nan],
                     [0, 0, 0, 0, 0]])
    gen.finish_collisions(codes, dist)
    assert codes[:3, 1].tolist()[:2] == [1, 2]  # the finite choices are still taken first
    assert len(set(codes[:, 1].tolist())) == 4 and codes[2, 1] in (3, 4)  # all distinct, none on item 3's code


def test_truncated_checkpoint_is_named(trained, tmp_path):
    emb_path, ckpt_dir, _ = trained
    data = (ckpt_dir / BEST_LOSS_CKPT).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"cut.pth: the checkpoint file is truncated or corrupt"):
        load_checkpoint(cut)
    out = tmp_path / "cut.index.json"
    with pytest.raises(DataError, match=r"cut.pth: the checkpoint file is truncated or corrupt.*\d+ bytes"):
        gen.main(["--ckpt_path", str(cut), "--data_path", str(emb_path), "--output_file", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("flags, noted", [(["--bn", "False"], True), (["--bn=false"], True), (["--bn", "true"], False),
                                          ([], False)])
def test_bn_false_says_the_original_ran_batchnorm(tmp_path, capsys, flags, noted):
    """The original's own command said --bn False and trained with BatchNorm; here it means off, and says so."""
    emb_path = tmp_path / "emb.npy"
    np.save(emb_path, clustered_embeddings(n=64))
    train_main.main(["--data_path", str(emb_path), "--ckpt_dir", str(tmp_path / "ck"), *TINY_MODEL, "--epochs", "1",
                     "--eval_step", "1", "--warmup_epochs", "0", "--device", "cpu", *flags])
    notes = [line for line in capsys.readouterr().err.splitlines() if "--bn" in line]
    assert notes == (["note: --bn false trains without BatchNorm; the original code ran BatchNorm whatever --bn said "
                      "(it parsed --bn with type=bool), so pass --bn true to reproduce its runs"] if noted else [])
