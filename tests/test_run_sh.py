"""The whole pipeline through run.sh, on ml-100k with a tiny random model and a tiny budget."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LCREC_CACHE", "~/.cache/lcrec")).expanduser()


@pytest.mark.slow
@pytest.mark.parametrize("profile,precision", [("quick", "fp32"), ("cpu", "bf16")])
def test_run_sh_end_to_end(tmp_path, tiny_base_model, profile, precision):
    from data_process.base_model import fetch_wheel

    try:
        fetch_wheel("recbole==1.2.1", "recbole-1.2.1-*.whl", CACHE / "wheels")
    except Exception as e:  # no package index reachable
        pytest.skip(f"the recbole wheel (ml-100k) cannot be fetched: {e}")
    run_dir = tmp_path / "run"
    env = dict(os.environ, BASE_MODEL=str(tiny_base_model), RUN_DIR=str(run_dir), CACHE_DIR=str(CACHE),
               PLM_NAME="tiny", NPROC="1", RQ_EPOCHS="30", RQ_EVAL_STEP="10", PROFILE_USERS="3",
               MAX_STEPS="2", SAVE_STEPS="1", VALID_USERS="4", BATCH="2",
               TRAIN_DATA_SAMPLE_NUM="8,8,8,8,0,0" if profile == "quick" else "8,8,8,8", TEST_SAMPLE_NUM="5",
               TEST_BATCH="5", TEST_PROMPT_IDS="0,1", OMP_NUM_THREADS="1", PROFILE=profile, CURVE_USERS="4",
               CURVE_BEAMS="5", BASELINES="" if profile == "quick" else "sasrec",
               BASELINE_FLAGS="--epochs 1 --hidden_size 16", PRECISION=precision,
               DECODING="trie,position" if profile == "quick" else "trie",
               # the reinforcement stage in one of the two runs (two steps of 4 items for 2 prompts)
               REINFORCE="1" if profile == "cpu" else "0", RL_STEPS="2", RL_BATCH="2", RL_GENERATIONS="4")
    out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    metrics = ["hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10"]
    for name in (("lcrec", "popularity", "cooccurrence") + (("lcrec_position",) if profile == "quick" else ("lcrec-fusion",))):
        res = json.loads((run_dir / "results" / f"{name}.json").read_text())
        assert res["num_examples"] == 5 and res["prompt_ids"] == [0, 1]
        for agg in ("mean", "min", "max"):
            assert set(res[agg]) == set(metrics) and all(0.0 <= v <= 1.0 for v in res[agg].values())
        assert set(res["per_prompt"]) == {"0", "1"}
        users = res["per_user"]["users"]  # the same 5 users in both files: the paired table needs them
        assert len(users) == 5 and all(0.0 <= v <= 1.0 for v in res["per_user"]["ndcg@10"])
    lcrec = json.loads((run_dir / "results" / "lcrec.json").read_text())
    assert isinstance(lcrec["cpu_bf16_autocast"], bool)  # how the CPU decoded is on record
    table = (run_dir / "results" / "table.md").read_text()
    assert "| Popularity | 5 |" in table and "| Co-occurrence | 5 |" in table
    # the cpu profile evaluates the same checkpoint again, fused with the co-occurrence ranker
    assert lcrec["fusion_weight"] == 0
    if profile == "cpu":
        fused = json.loads((run_dir / "results" / "lcrec-fusion.json").read_text())
        assert fused["fusion_weight"] == 2.0 and fused["decoding"] == "trie"
    assert ("| LC-Rec + co-occurrence | 5 |" in table) == (profile == "cpu")
    lcrec_rows = (["LC-Rec, trie decoding", "LC-Rec, per-position decoding (original)"] if profile == "quick"
                  else ["LC-Rec"])  # two decodings: one labelled row each
    assert all(f"| {row} | 5 |" in table for row in lcrec_rows)
    assert ("| SASRec | 5 |" in table) == (profile == "cpu")
    paired = table.split("Difference from Popularity, paired over the same 5 test users")[1]
    assert all(paired.count(f"| {row} | ") == 1 for row in lcrec_rows)
    assert paired.count("| SASRec | ") == (profile == "cpu")
    assert "Step times:" in out.stdout and "fine-tuning" in out.stdout
    # a summary beside each results file, which --publish turns into rows of the README's table
    from results_table import TABLE_BEGIN, TABLE_END, publish, readme_table

    if profile == "cpu":  # the reinforced model beside the fine-tuned one, and paired against it
        assert "| LC-Rec + GRPO | 5 |" in table
        assert "| LC-Rec + GRPO | " in (run_dir / "results" / "table-rl.md").read_text().split("paired")[1]
        assert (run_dir / "ckpt-rl" / "config.json").is_file() and (run_dir / "reinforce_curve.png").is_file()
    models = (["lcrec", "popularity", "cooccurrence"] + (["sasrec", "lcrec-rl", "lcrec-fusion"] if profile == "cpu" else [])
              + (["lcrec_position"] if profile == "quick" else []))  # one summary per decoding
    assert sorted(p.name for p in (run_dir / "results").glob("*.summary.json")) == sorted(f"{m}.summary.json" for m in models)
    summary = json.loads((run_dir / "results" / "lcrec.summary.json").read_text())
    assert summary["num_users"] == 5 and summary["train_time_s"] > 0 and summary["commit"]
    assert summary["command"].startswith(f"PROFILE={profile} PRECISION={precision} ")
    readme = tmp_path / "README.md"
    readme.write_text(f"{TABLE_BEGIN}\n{TABLE_END}\n")
    publish(run_dir / "results", profile, tmp_path / "published", readme)
    rows = readme_table(readme.read_text()).splitlines()[2:]
    names = lcrec_rows + ["Popularity", "Co-occurrence"] + (
        ["SASRec", "LC-Rec + GRPO", "LC-Rec + co-occurrence"] if profile == "cpu" else [])
    assert sorted(r.split(" | ")[0] for r in rows) == sorted(f"| {n}" for n in names)
    for png in ("code_usage.png", "loss.png", "learning_curve.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "ckpt" / "config.json").read_text())["index_prior"] == "popularity"
    index = json.loads((run_dir / "data" / "ml-100k" / "ml-100k.index.json").read_text())
    assert len(index) == 1682 and len({tuple(v) for v in index.values()}) == 1682  # zero collisions

    # a second run finds every output and redoes nothing
    again = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    # both: the collaborative index's vectors and the co-occurrence baseline; cpu: no user profiles, one
    # learned baseline, the fused evaluation, the reinforcement and its evaluation
    assert again.stdout.count(": skipped (") == (13 if profile == "cpu" else 10)


def run_sh_settings(unset: tuple[str, ...] = (), **env) -> tuple[dict, str]:
    drop = ("TRAIN_DATA_SAMPLE_NUM", "DATASET", "PROFILE", "FINETUNE_FLAGS", "NPROC", "TRAIN_THREADS", *unset)
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**clean, "DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line), out.stderr


@pytest.mark.parametrize("dataset,fusion", [("Instruments", 20000), ("Arts", 30000), ("Games", 100000)])
def test_paper_profile_picks_fusionseqrec_samples_by_dataset(dataset, fusion):
    settings, err = run_sh_settings(PROFILE="paper", DATASET=dataset)
    assert settings["TRAIN_DATA_SAMPLE_NUM"] == f"0,0,0,{fusion},0,0" and "note:" not in err
    assert settings["EPOCHS"] == "4" and settings["LR"] == "5e-5" and settings["TEST_PROMPT_IDS"] == "all"
    # the published indices were trained with BatchNorm on and a linear decay
    assert "--bn true" in settings["RQ_FLAGS"] and "--lr_scheduler_type linear" in settings["RQ_FLAGS"]


def test_paper_profile_scores_the_trie_and_the_original_per_position_rule():
    assert run_sh_settings(PROFILE="paper", DATASET="Instruments")[0]["DECODING"] == "trie,position"
    assert run_sh_settings(PROFILE="quick")[0]["DECODING"] == "trie"
    assert run_sh_settings(PROFILE="paper", DATASET="Instruments", DECODING="trie")[0]["DECODING"] == "trie"
    for bad, message in (("trie,beam", "DECODING: unknown decoding 'beam'"), ("trie,trie", "'trie' is named twice")):
        out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", "DECODING": bad},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr


def test_paper_profile_on_an_unknown_dataset_keeps_100000_and_says_so():
    settings, err = run_sh_settings(PROFILE="paper", DATASET="MyShop")
    assert settings["TRAIN_DATA_SAMPLE_NUM"] == "0,0,0,100000,0,0"
    assert "no paper sample size for dataset 'MyShop'" in err
    settings, err = run_sh_settings(PROFILE="paper", DATASET="MyShop", TRAIN_DATA_SAMPLE_NUM="0,0,0,5,0,0")
    assert settings["TRAIN_DATA_SAMPLE_NUM"] == "0,0,0,5,0,0" and "note:" not in err


def test_paper_profile_writes_profiles_with_an_instruction_model_only():
    settings, _ = run_sh_settings(PROFILE="paper", DATASET="Instruments")
    # the original's sampling: temperature 0.4, top_p 1, no repetition penalty, answers of several sentences
    assert settings["PROFILE_FLAGS"] == ("--require_instruct --max_new_tokens 512 --temperature 0.4 --top_p 1 "
                                         "--repetition_penalty 1 --answer_style paragraph")
    for profile in ("quick", "cpu"):  # the one-sentence answers and the hf defaults
        assert run_sh_settings(PROFILE=profile)[0]["PROFILE_FLAGS"] == ""


def _run_paper(tmp_path, model, **env):
    """run.sh, PROFILE=paper on Instruments with ``model`` as BASE_MODEL, stopped at its first
    real work by a PLM_CHECKPOINT that does not exist."""
    drop = ("PROFILE_MODEL", "PROFILE_BACKEND", "PROFILE_FLAGS", "FORCE", "TASKS", "DATA_PATH", "PLM_NAME", "DRY_RUN",
            "TRAIN_DATA_SAMPLE_NUM", "NPROC", "MODEL_NAME", "OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY")
    clean = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(["bash", "run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**clean, "PROFILE": "paper", "DATASET": "Instruments", "BASE_MODEL": str(model),
                               "RUN_DIR": str(tmp_path / "run"), "PLM_CHECKPOINT": str(tmp_path / "no-plm"), **env})


def test_paper_profile_refuses_a_profile_writer_that_cannot_work_before_any_step(tmp_path, tiny_base_model):
    from fixtures import make_dataset

    out = _run_paper(tmp_path, tiny_base_model)  # a base model without a chat template, no PROFILE_MODEL
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: --model_path")
    assert "no chat template" in errors[0] and "PROFILE_MODEL" in errors[0]
    assert "== " not in out.stdout and not (tmp_path / "run").exists()  # no step ran, nothing was written

    # a ready user.json: said, and the run goes on to its steps
    make_dataset(tmp_path / "run" / "data", name="Instruments")
    user = tmp_path / "run" / "data" / "Instruments" / "Instruments.user.json"
    out = _run_paper(tmp_path, tiny_base_model)
    assert f"user profiles: {user} exists and will be used" in out.stdout
    assert "== dataset: skipped" in out.stdout and "== text embeddings" in out.stdout  # stopped by the missing PLM
    # FORCE=1 would write it again, with the refused model: refused before any step
    out = _run_paper(tmp_path, tiny_base_model, FORCE="1")
    assert out.returncode == 2 and "no chat template" in out.stderr and "== " not in out.stdout


def test_precision_is_bf16_only_where_the_cpu_has_it():
    import torch

    from utils import cpu_supports_bf16

    settings, _ = run_sh_settings(PROFILE="quick")
    expected = "bf16" if torch.cuda.is_available() or cpu_supports_bf16() else "fp32"
    assert settings["PRECISION"] == expected
    assert run_sh_settings(PROFILE="quick", PRECISION="fp32")[0]["PRECISION"] == "fp32"
    bad = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", "PRECISION": "fp8"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "PRECISION must be auto, bf16 or fp32" in bad.stderr


@pytest.mark.parametrize("profile", ["quick", "cpu"])
def test_cpu_profiles_run_one_process_on_every_core_in_bf16_and_two_single_thread_ones_in_fp32(profile):
    """In bf16 one process with every thread trains as fast as two DDP processes, with no all-reduce."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine NPROC follows the GPUs")
    cores = len(os.sched_getaffinity(0))
    bf16, _ = run_sh_settings(unset=("OMP_NUM_THREADS",), PROFILE=profile, PRECISION="bf16")
    assert (bf16["NPROC"], bf16["TRAIN_THREADS"], bf16["DEEPSPEED"]) == ("1", str(cores), "")
    assert bf16["ATTN"] == "eager"  # measured faster than sdpa in bf16 on a 2-core CPU (docs/benchmarks.md)
    fp32, _ = run_sh_settings(unset=("OMP_NUM_THREADS",), PROFILE=profile, PRECISION="fp32")
    assert (fp32["NPROC"], fp32["TRAIN_THREADS"], fp32["DEEPSPEED"]) == ("2", "1", "")
    assert fp32["ATTN"] == ""  # not measured there: transformers' choice
    if profile == "cpu":  # its measured recipe is 8 examples a step, however many processes
        assert int(bf16["BATCH"]) * 1 == int(fp32["BATCH"]) * 2 == 8
    # what the user sets wins
    given, _ = run_sh_settings(PROFILE=profile, PRECISION="bf16", NPROC="2", OMP_NUM_THREADS="1")
    assert (given["NPROC"], given["TRAIN_THREADS"]) == ("2", "1")
    given, _ = run_sh_settings(PROFILE=profile, PRECISION="bf16", OMP_NUM_THREADS="1", ATTN="sdpa")
    assert (given["NPROC"], given["TRAIN_THREADS"], given["ATTN"]) == ("1", "1", "sdpa")


def test_baselines_variable():
    assert run_sh_settings(PROFILE="quick")[0]["BASELINES"] == ""
    assert run_sh_settings(PROFILE="cpu")[0]["BASELINES"] == "sasrec,gru4rec"  # TIGER: on request (2-hour budget)
    assert run_sh_settings(PROFILE="gpu")[0]["BASELINES"] == "sasrec,gru4rec,tiger"
    assert run_sh_settings(PROFILE="cpu", BASELINES="")[0]["BASELINES"] == ""  # empty: none, not the default
    bad = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", "BASELINES": "sasrec,bert"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "BASELINES: unknown baseline 'bert'" in bad.stderr


@pytest.mark.parametrize("profile,precision", [("quick", "fp32"), ("quick", "bf16"), ("cpu", "fp32"), ("cpu", "bf16")])
def test_cpu_sized_profiles_train_with_the_prior_and_a_start_for_the_index_rows(profile, precision):
    """The measured choices of both CPU profiles (README, Results); FINETUNE_FLAGS= gives the paper's loss."""
    settings = run_sh_settings(PROFILE=profile, PRECISION=precision)[0]
    flags = settings["FINETUNE_FLAGS"].split()
    assert flags[:6] == ["--history_loss", "--index_softmax", "trie", "--index_prior", "popularity",
                         "--index_token_init"]
    if profile == "cpu" or precision == "bf16":
        # rows from co-occurrence, the body at 1e-4 and the new rows at their own 2e-3 (both 1.5x in the
        # quick profile's 128 steps, what fits 15 minutes in bf16), history 20, four tasks
        # the cpu profile trains 3x the steps where native bf16 makes them 3x cheaper
        rates = {"cpu": ("1e-4", "2e-3"), "quick": ("1.5e-4", "3e-3")}[profile]
        steps = {("cpu", "fp32"): ("450", "150"), ("cpu", "bf16"): ("1350", "270"),
                 ("quick", "bf16"): ("128", "64")}[profile, precision]
        assert flags[6:9] == ["collab", "--index_lr", rates[1]] and float(settings["LR"]) == float(rates[0])
        assert settings["MAX_HIS_LEN"] == "20" and settings["TASKS"] == "seqrec,item2index,index2item,fusionseqrec"
        assert (settings["MAX_STEPS"], settings["CURVE_STEPS"]) == steps
    else:  # quick in fp32: 48 steps at history 5, one rate (the two rates scored below it there)
        assert flags[6:7] == ["title"] and float(settings["LR"]) == 5e-4
        assert (settings["MAX_STEPS"], settings["MAX_HIS_LEN"], settings["CURVE_STEPS"]) == ("48", "5", "24")
        assert len(settings["TASKS"].split(",")) == len(settings["TRAIN_DATA_SAMPLE_NUM"].split(",")) == 6
    # measured with transformers 5's loss normalisation, which they keep
    assert flags[-2:] == ["--loss_normalization", "global_tokens"] and len(flags) == (9 if flags[6] == "title" else 11)
    assert settings["TEST_SAMPLE_NUM"] == ("300" if profile == "quick" else "-1")
    assert run_sh_settings(PROFILE=profile, FINETUNE_FLAGS="")[0]["FINETUNE_FLAGS"] == ""
    assert "--index_prior" not in run_sh_settings(PROFILE="paper")[0]["FINETUNE_FLAGS"]


def test_gpu_profile_trains_with_what_lifted_the_cpu_profile():
    """The cpu profile's loss, prior and row start, with one learning rate: the split rates make up for 450 steps."""
    flags = run_sh_settings(PROFILE="gpu")[0]["FINETUNE_FLAGS"].split()
    assert flags == ["--history_loss", "--index_softmax", "trie", "--index_prior", "popularity",
                     "--index_token_init", "collab", "--loss_normalization", "global_tokens"]
    assert run_sh_settings(PROFILE="gpu", FINETUNE_FLAGS="")[0]["FINETUNE_FLAGS"] == ""


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_paper_profile_spells_out_the_original_training_settings(precision):
    """Each setting where finetune.py could differ from the original is on the paper profile's command line,
    and each is accepted by finetune.py's parser."""
    from arguments import parse_args

    flags = run_sh_settings(PROFILE="paper", DATASET="Instruments", PRECISION=precision)[0]["FINETUNE_FLAGS"].split()
    given = dict(zip(flags[::2], flags[1::2]))
    assert given == {"--loss_normalization": "micro_batch", "--torch_dtype": "float32", "--index_token_init": "normal",
                     "--optim": "adamw_torch"}
    args = parse_args("train", ["--base_model", "m", *flags])
    assert (args.loss_normalization, args.torch_dtype, args.index_token_init, args.optim) == tuple(given.values())


def test_paper_profile_embeds_and_indexes_as_the_original(tmp_path, capsys):
    """The original's RQ-VAE seed and its 2048 tokens a field for the text embeddings, each accepted by the
    script it goes to; the other profiles keep text_emb.py's defaults."""
    from data_process import text_emb
    from index.main import build_parser

    settings = run_sh_settings(PROFILE="paper", DATASET="Instruments")[0]
    rq_flags = settings["RQ_FLAGS"].split()
    assert build_parser().parse_args(["--data_path", "e.npy", *rq_flags]).seed == 2024
    assert settings["TEXT_EMB_FLAGS"] == "--max_length 2048"
    with pytest.raises(SystemExit) as stop:  # parsed, then stopped at the missing item file (not exit 2)
        text_emb.main(["--plm_checkpoint", "m", "--data_path", str(tmp_path), *settings["TEXT_EMB_FLAGS"].split()])
    assert stop.value.code == 1 and ".item.json" in capsys.readouterr().err
    for profile in ("quick", "cpu", "gpu"):
        assert run_sh_settings(PROFILE=profile)[0]["TEXT_EMB_FLAGS"] == ""


def test_cpu_sized_profiles_train_the_collaborative_index_and_the_others_the_text_one():
    for profile, index in (("quick", "collab"), ("cpu", "collab"), ("gpu", "text"), ("paper", "text")):
        settings, _ = run_sh_settings(unset=("INDEX", "COLLAB_VECTORS", "COLLAB_FLAGS"), PROFILE=profile)
        assert settings["INDEX"] == index and settings["COLLAB_VECTORS"] == "ppmi"
    settings, _ = run_sh_settings(unset=("INDEX",), PROFILE="quick", INDEX="text")
    assert settings["INDEX"] == "text"
    settings, _ = run_sh_settings(PROFILE="cpu", INDEX="collab", COLLAB_VECTORS="sasrec")
    assert (settings["INDEX"], settings["COLLAB_VECTORS"]) == ("collab", "sasrec")
    assert "--align_weight" in settings["COLLAB_FLAGS"]
    for bad, message in ((dict(INDEX="letter"), "INDEX must be text or collab"),
                         (dict(INDEX="collab", COLLAB_VECTORS="bpr"), "COLLAB_VECTORS must be ppmi or sasrec")):
        out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", **bad},
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr


@pytest.mark.parametrize("vectors,maker", [("ppmi", "item_vectors.py"), ("sasrec", "-m baselines.sasrec")])
def test_a_collaborative_index_run_makes_its_vectors_before_the_rq_vae(tmp_path, vectors, maker):
    """run.sh with a stand-in for python that records each command: the order of the steps."""
    stub, log = tmp_path / "python", tmp_path / "commands.log"
    stub.write_text('#!/bin/bash\necho "$*" >> "$STUB_LOG"\nif [ "$1" = -c ]; then echo 0; fi\n')
    stub.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k not in ("NPROC", "DATA_PATH", "FORCE")},
           "PYTHON": str(stub), "STUB_LOG": str(log), "BASE_MODEL": str(tmp_path / "model"), "PROFILE": "quick",
           "RUN_DIR": str(tmp_path / "run"), "INDEX": "collab", "COLLAB_VECTORS": vectors, "BASELINES": "tiger"}
    out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    commands = [line for line in log.read_text().splitlines() if not line.startswith("-c")]
    collab_file = str(tmp_path / "run" / "data" / "ml-100k" / f"ml-100k.collab-{vectors}.npy")
    make = next(k for k, c in enumerate(commands) if c.startswith(maker))
    rqvae = next(k for k, c in enumerate(commands) if c.startswith("index/main.py"))
    assert make < rqvae and collab_file in commands[make]
    assert f"--collab_emb {collab_file} --align_weight" in commands[rqvae]
    # TIGER reads the run's index file, the collaborative one here
    tiger = next(c for c in commands if c.startswith("-m baselines.tiger"))
    assert f"--data_path {tmp_path / 'run' / 'data'}" in tiger and "--index_file .index.json" in tiger


@pytest.mark.parametrize("profile", ["quick", "cpu", "gpu", "paper"])
def test_reinforcement_is_off_by_default_and_on_by_flag_in_every_profile(profile):
    """Not yet measured better than fine-tuning alone: off unless REINFORCE=1 (docs/reinforcement.md)."""
    off, _ = run_sh_settings(PROFILE=profile, DATASET="Instruments")
    assert off["REINFORCE"] == "0"
    on, _ = run_sh_settings(PROFILE=profile, DATASET="Instruments", REINFORCE="1")
    assert on["REINFORCE"] == "1" and on["RL_GENERATIONS"] == "16" and float(on["RL_LR"]) == 1e-5
    assert float(on["RL_BETA"]) == 1e-3 and int(on["RL_BATCH"]) >= 1 and on["RL_STEPS"] != "0"
    # the hit reward alone where it measured better (the CPU profiles), MiniOneRec's two rewards elsewhere
    assert on["RL_REWARDS"] == ("rule" if profile in ("quick", "cpu") else "rule,rank")


def test_reinforcement_settings_are_taken_and_checked():
    given, _ = run_sh_settings(PROFILE="cpu", REINFORCE="1", RL_STEPS="7", RL_FLAGS="--rollout sample",
                               RL_REWARDS="rule,rank")
    assert (given["RL_STEPS"], given["RL_FLAGS"], given["RL_REWARDS"]) == ("7", "--rollout sample", "rule,rank")
    bad = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", "REINFORCE": "yes"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "REINFORCE must be 0 or 1" in bad.stderr


@pytest.mark.parametrize("profile", ["quick", "cpu", "gpu", "paper"])
def test_fusion_is_on_in_the_cpu_profile_only(profile):
    """FUSION_WEIGHT: the extra fused evaluation where it measured better on the validation users
    (docs/evaluation.md); off in the quick start (its 15 minutes) and the paper profile (the paper's
    scoring), and in the gpu profile until measured there."""
    settings, _ = run_sh_settings(PROFILE=profile, DATASET="Instruments")
    assert (float(settings["FUSION_WEIGHT"]) > 0) == (profile == "cpu")
    assert run_sh_settings(PROFILE=profile, DATASET="Instruments", FUSION_WEIGHT="0.25")[0]["FUSION_WEIGHT"] == "0.25"
    for bad in ("-1", "abc", "1e3"):
        out = subprocess.run(["bash", "run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "DRY_RUN": "1", "PROFILE": profile, "FUSION_WEIGHT": bad})
        assert out.returncode == 2 and f"FUSION_WEIGHT must be a number >= 0 (0: off), got '{bad}'" in out.stderr
