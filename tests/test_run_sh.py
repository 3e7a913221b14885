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
               # the reinforcement stage in one of the two runs (two steps of 4 items for 2 prompts)
               REINFORCE="1" if profile == "cpu" else "0", RL_STEPS="2", RL_BATCH="2", RL_GENERATIONS="4")
    out = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    metrics = ["hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10"]
    for name in ("lcrec", "popularity"):
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
    assert "| LC-Rec | 5 |" in table and "| Popularity | 5 |" in table
    assert ("| SASRec | 5 |" in table) == (profile == "cpu")
    paired = table.split("Difference from Popularity, paired over the same 5 test users")[1]
    assert paired.count("| LC-Rec | ") == 1 and paired.count("| SASRec | ") == (profile == "cpu")
    assert "Step times:" in out.stdout and "fine-tuning" in out.stdout
    # a summary beside each results file, which --publish turns into rows of the README's table
    from results_table import TABLE_BEGIN, TABLE_END, publish, readme_table

    if profile == "cpu":  # the reinforced model beside the fine-tuned one, and paired against it
        assert "| LC-Rec + GRPO | 5 |" in table
        assert "| LC-Rec + GRPO | " in (run_dir / "results" / "table-rl.md").read_text().split("paired")[1]
        assert (run_dir / "ckpt-rl" / "config.json").is_file() and (run_dir / "reinforce_curve.png").is_file()
    models = ["lcrec", "popularity"] + (["sasrec", "lcrec-rl"] if profile == "cpu" else [])
    assert sorted(p.name for p in (run_dir / "results").glob("*.summary.json")) == sorted(f"{m}.summary.json" for m in models)
    summary = json.loads((run_dir / "results" / "lcrec.summary.json").read_text())
    assert summary["num_users"] == 5 and summary["train_time_s"] > 0 and summary["commit"]
    assert summary["command"].startswith(f"PROFILE={profile} PRECISION={precision} ")
    readme = tmp_path / "README.md"
    readme.write_text(f"{TABLE_BEGIN}\n{TABLE_END}\n")
    publish(run_dir / "results", profile, tmp_path / "published", readme)
    rows = readme_table(readme.read_text()).splitlines()[2:]
    names = ["LC-Rec", "Popularity"] + (["SASRec", "LC-Rec + GRPO"] if profile == "cpu" else [])
    assert sorted(r.split(" | ")[0] for r in rows) == sorted(f"| {n}" for n in names)
    for png in ("code_usage.png", "loss.png", "learning_curve.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "ckpt" / "config.json").read_text())["index_prior"] == "popularity"
    index = json.loads((run_dir / "data" / "ml-100k" / "ml-100k.index.json").read_text())
    assert len(index) == 1682 and len({tuple(v) for v in index.values()}) == 1682  # zero collisions

    # a second run finds every output and redoes nothing
    again = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    # cpu: no user profiles, one learned baseline, the reinforcement and its evaluation
    assert again.stdout.count(": skipped (") == (10 if profile == "cpu" else 8)


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


def test_paper_profile_on_an_unknown_dataset_keeps_100000_and_says_so():
    settings, err = run_sh_settings(PROFILE="paper", DATASET="MyShop")
    assert settings["TRAIN_DATA_SAMPLE_NUM"] == "0,0,0,100000,0,0"
    assert "no paper sample size for dataset 'MyShop'" in err
    settings, err = run_sh_settings(PROFILE="paper", DATASET="MyShop", TRAIN_DATA_SAMPLE_NUM="0,0,0,5,0,0")
    assert settings["TRAIN_DATA_SAMPLE_NUM"] == "0,0,0,5,0,0" and "note:" not in err


def test_paper_profile_writes_profiles_with_an_instruction_model_only():
    settings, _ = run_sh_settings(PROFILE="paper", DATASET="Instruments")
    assert settings["PROFILE_FLAGS"] == "--require_instruct --max_new_tokens 512 --temperature 0.4"
    quick, _ = run_sh_settings(PROFILE="quick")
    assert "--require_instruct" not in quick["PROFILE_FLAGS"]


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
    fp32, _ = run_sh_settings(unset=("OMP_NUM_THREADS",), PROFILE=profile, PRECISION="fp32")
    assert (fp32["NPROC"], fp32["TRAIN_THREADS"], fp32["DEEPSPEED"]) == ("2", "1", "")
    if profile == "cpu":  # its measured recipe is 8 examples a step, however many processes
        assert int(bf16["BATCH"]) * 1 == int(fp32["BATCH"]) * 2 == 8
    # what the user sets wins
    given, _ = run_sh_settings(PROFILE=profile, PRECISION="bf16", NPROC="2", OMP_NUM_THREADS="1")
    assert (given["NPROC"], given["TRAIN_THREADS"]) == ("2", "1")
    given, _ = run_sh_settings(PROFILE=profile, PRECISION="bf16", OMP_NUM_THREADS="1")
    assert (given["NPROC"], given["TRAIN_THREADS"]) == ("1", "1")


def test_baselines_variable():
    assert run_sh_settings(PROFILE="quick")[0]["BASELINES"] == ""
    assert run_sh_settings(PROFILE="cpu")[0]["BASELINES"] == "sasrec,gru4rec"  # TIGER: on request (2-hour budget)
    assert run_sh_settings(PROFILE="gpu")[0]["BASELINES"] == "sasrec,gru4rec,tiger"
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
        steps = {("cpu", "fp32"): ("450", "150"), ("cpu", "bf16"): ("1350", "150"),
                 ("quick", "bf16"): ("128", "64")}[profile, precision]
        assert flags[6:] == ["collab", "--index_lr", rates[1]] and float(settings["LR"]) == float(rates[0])
        assert settings["MAX_HIS_LEN"] == "20" and settings["TASKS"] == "seqrec,item2index,index2item,fusionseqrec"
        assert (settings["MAX_STEPS"], settings["CURVE_STEPS"]) == steps
    else:  # quick in fp32: 48 steps at history 5, one rate (the two rates scored below it there)
        assert flags[6:] == ["title"] and float(settings["LR"]) == 5e-4
        assert (settings["MAX_STEPS"], settings["MAX_HIS_LEN"], settings["CURVE_STEPS"]) == ("48", "5", "24")
        assert len(settings["TASKS"].split(",")) == len(settings["TRAIN_DATA_SAMPLE_NUM"].split(",")) == 6
    assert settings["TEST_SAMPLE_NUM"] == ("300" if profile == "quick" else "-1")
    assert run_sh_settings(PROFILE=profile, FINETUNE_FLAGS="")[0]["FINETUNE_FLAGS"] == ""
    assert "--index_prior" not in run_sh_settings(PROFILE="paper")[0]["FINETUNE_FLAGS"]


def test_gpu_profile_trains_with_what_lifted_the_cpu_profile():
    """The cpu profile's loss, prior and row start, with one learning rate: the split rates make up for 450 steps."""
    flags = run_sh_settings(PROFILE="gpu")[0]["FINETUNE_FLAGS"].split()
    assert flags == ["--history_loss", "--index_softmax", "trie", "--index_prior", "popularity",
                     "--index_token_init", "collab"]
    assert run_sh_settings(PROFILE="gpu", FINETUNE_FLAGS="")[0]["FINETUNE_FLAGS"] == ""


@pytest.mark.parametrize("profile", ["quick", "cpu", "gpu", "paper"])
def test_reinforcement_is_off_by_default_and_on_by_flag_in_every_profile(profile):
    """Not yet measured better than fine-tuning alone: off unless REINFORCE=1 (docs/reinforcement.md)."""
    off, _ = run_sh_settings(PROFILE=profile, DATASET="Instruments")
    assert off["REINFORCE"] == "0"
    on, _ = run_sh_settings(PROFILE=profile, DATASET="Instruments", REINFORCE="1")
    assert on["REINFORCE"] == "1" and on["RL_GENERATIONS"] == "16" and float(on["RL_LR"]) == 1e-5
    assert float(on["RL_BETA"]) == 1e-3 and int(on["RL_BATCH"]) >= 1 and on["RL_STEPS"] != "0"


def test_reinforcement_settings_are_taken_and_checked():
    given, _ = run_sh_settings(PROFILE="cpu", REINFORCE="1", RL_STEPS="7", RL_FLAGS="--rollout sample")
    assert (given["RL_STEPS"], given["RL_FLAGS"]) == ("7", "--rollout sample")
    bad = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**os.environ, "DRY_RUN": "1", "REINFORCE": "yes"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "REINFORCE must be 0 or 1" in bad.stderr
