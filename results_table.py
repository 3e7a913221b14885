"""Print the mean metrics of several results files side by side (Markdown), and with
``--reference`` each model's difference from one of them, paired over the same test users.

    python results_table.py results/lcrec.json results/popularity.json --names LC-Rec Popularity \
        --reference Popularity

The README's results table is drawn from small committed summaries of measured runs
(``docs/results/*.json``: the metrics, their standard errors, per-user values for pairing, the
command, the commit, the machine and the times). ``run.sh`` writes one beside each results file
(``--summary``); ``--publish`` commits a run's summaries and redraws the README table;
``--markdown`` prints that table:

    python results_table.py runs/<run>/results/lcrec.json --names LC-Rec --summary runs/<run>/results/lcrec.summary.json
    python results_table.py --publish runs/<run>/results --label cpu-bf16
    python results_table.py --markdown
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from dataset_files import load_json
from metrics import metric_label, paired_difference
from utils import DataError, atomic_path, cpu_name, cpu_supports_bf16, exit_on_data_error

ROOT = Path(__file__).resolve().parent
SUMMARY_DIR = ROOT / "docs" / "results"
README = ROOT / "README.md"
# the README's generated block lies between these two lines
TABLE_BEGIN = "<!-- results table: drawn by `python results_table.py --markdown` from docs/results/*.json; do not edit -->"
TABLE_END = "<!-- end of the results table -->"
REFERENCE_MODEL = "Popularity"  # the paired differences are taken from it
TABLE_METRICS = ["hit@10", "ndcg@10"]


def results_table(files: list[str], names: list[str] | None = None, reference: str | None = None) -> str:
    names = names or [Path(f).stem for f in files]
    if len(names) != len(files):
        raise DataError(f"--names: {len(names)} names for {len(files)} results files")
    results = [load_json(f, "results") for f in files]
    metrics = results[0].get("metrics")
    for f, res in zip(files, results):
        if "mean" not in res or res.get("metrics") != metrics:
            raise DataError(f"{f}: expected a results file with 'mean' over the metrics {metrics}")
    head = ("| model | examples | " + " | ".join(metric_label(m) for m in metrics)
            + " | distinct top-1 | top-10 differs |")
    rows = [head, "|" + "---|" * (len(metrics) + 4)]
    for name, res in zip(names, results):
        se, personal = mean_over_prompts(res.get("stderr")), mean_over_prompts(res.get("personalisation"))
        cells = [f"{res['mean'][m]:.4f}" + (f" ± {se[m]:.4f}" if m in se else "") for m in metrics]
        cells += [f"{personal['distinct_top1']:.0f}" if "distinct_top1" in personal else "–",
                  f"{personal['top10_differs_share']:.0%}" if "top10_differs_share" in personal else "–"]
        rows.append(f"| {name} | {res.get('num_examples', '?')} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("± is the standard error over test users (averaged over prompt templates); distinct top-1: items "
                "ranked first for some user; top-10 differs: users whose top 10 is not the most common one.")
    if reference is not None:
        rows += ["", *paired_table(files, names, results, metrics, reference)]
    return "\n".join(rows)


def paired_table(files: list[str], names: list[str], results: list[dict], metrics: list[str],
                 reference: str) -> list[str]:
    """Rows of each model's mean difference from ``reference`` over the same users, ± the standard
    error of that difference, and the difference in standard errors (z)."""
    if reference not in names:
        raise DataError(f"--reference: {reference!r} is not one of the --names {names}")
    ref = names.index(reference)
    if "per_user" not in results[ref]:  # a file from an older version: say so, keep the table above
        return [f"No differences from {reference}: {files[ref]} has no per-user values ('per_user'); "
                "rescore it with this version to pair the users."]
    n = len(results[ref]["per_user"]["users"])
    rows = [f"Difference from {reference}, paired over the same {n} test users: mean difference ± its standard "
            "error (difference / standard error):", "",
            "| model | " + " | ".join(metric_label(m) for m in metrics) + " |",
            "|" + "---|" * (len(metrics) + 1)]
    for i, (name, res) in enumerate(zip(names, results)):
        if i == ref:
            continue
        if "per_user" not in res:
            rows.append(f"| {name} | " + " | ".join("–" for _ in metrics) + " |")
            continue
        diff = paired_difference(res["per_user"], results[ref]["per_user"], metrics, (files[i], files[ref]))
        cells = [f"{d:+.4f} ± {se:.4f} ({d / se:+.1f})" if se > 0 else f"{d:+.4f} ± 0" for d, se in
                 (diff[m] for m in metrics)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def mean_over_prompts(per_prompt: dict | None) -> dict[str, float]:
    """{prompt id: {name: value}} -> {name: mean over prompts}; {} when absent (older files)."""
    if not per_prompt:
        return {}
    first = next(iter(per_prompt.values()))
    names = [n for n in first if all(n in v for v in per_prompt.values())]  # in the file's order
    return {n: sum(v[n] for v in per_prompt.values()) / len(per_prompt) for n in names}


# ---- summaries of measured runs, and the README table drawn from them ----

def machine() -> dict:
    """The machine a run is measured on: CPU model, cores, native bf16, and the GPUs (None without)."""
    cpu = cpu_name()
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()] if out.returncode == 0 else []
        gpu = f"{len(names)} x {names[0]}" if len(names) > 1 else (names[0] if names else None)
    return {"cpu": cpu, "cores": os.cpu_count(), "native_bf16": cpu_supports_bf16(), "gpu": gpu}


def machine_label(m: dict) -> str:
    return m["gpu"] if m.get("gpu") else f"{m.get('cores', '?')}-core {m.get('cpu', '?')}"


def git_commit() -> dict:
    """The commit of this code and whether the working tree had changes to tracked files."""
    def git(*cmd: str) -> str | None:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    return {"commit": git("rev-parse", "HEAD"), "local_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def training_seconds(results: dict, trainer_state: str | None) -> float | None:
    """Training time: the HF Trainer's train_runtime for LC-Rec, the learned baselines' own (summed
    over seeds); None for a model that is not trained (popularity counts)."""
    if trainer_state and Path(trainer_state).is_file():
        history = load_json(trainer_state, "trainer state").get("log_history") or []
        runtimes = [h["train_runtime"] for h in history if isinstance(h, dict) and "train_runtime" in h]
        if runtimes:
            return round(runtimes[-1], 1)
    if isinstance(results.get("train_time_s"), list):
        return round(sum(results["train_time_s"]), 1)
    return None


def summarize(results_file: str, model: str, *, profile: str | None = None, trainer_state: str | None = None,
              command: str | None = None, wall_time_s: float | None = None) -> dict:
    """The small summary of one results file that the README table is drawn from."""
    res = load_json(results_file, "results")
    if "mean" not in res or "metrics" not in res:
        raise DataError(f"{results_file}: expected a results file of test.py, baseline.py or baselines ('mean', 'metrics')")
    if "per_user" not in res:
        raise DataError(f"{results_file}: no per-user values ('per_user'); rescore it with this version to summarize it")
    personal = mean_over_prompts(res.get("personalisation"))
    return {"model": model, "profile": profile, "dataset": res.get("dataset"), "test_task": res.get("test_task"),
            "prompt_ids": res.get("prompt_ids"), "num_beams": res.get("num_beams"),
            "num_users": len(set(res["per_user"]["users"])), "num_examples": res.get("num_examples"),
            "mean": res["mean"], "stderr": mean_over_prompts(res.get("stderr")),
            "distinct_top1": personal.get("distinct_top1"), "top10_differs_share": personal.get("top10_differs_share"),
            "train_time_s": training_seconds(res, trainer_state), "wall_time_s": wall_time_s,
            "machine": machine(), "command": command, **git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "per_user": res["per_user"]}


def write_summary(summary: dict, path: str | Path) -> Path:
    """JSON with one line per per-user list, so that a summary stays small and readable in a diff."""
    body = json.dumps({k: v for k, v in summary.items() if k != "per_user"}, indent=2, ensure_ascii=False)
    lists = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in summary["per_user"].items())
    with atomic_path(path) as tmp:
        tmp.write_text(body[:-2] + ',\n  "per_user": {\n' + lists + "\n  }\n}\n")
    return Path(path)


def load_summaries(folder: str | Path) -> list[dict]:
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        s = load_json(path, "results summary")
        missing = [k for k in ("model", "num_users", "mean", "stderr", "per_user") if k not in s]
        if missing:
            raise DataError(f"{path}: not a results summary (missing {', '.join(missing)}); "
                            "write one with results_table.py --summary")
        out.append({**s, "file": path})
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def publish(run_results: str | Path, label: str, summary_dir: str | Path = SUMMARY_DIR,
            readme: str | Path | None = README) -> list[Path]:
    """Copy a run's summaries (``*.summary.json``, written by run.sh) into ``summary_dir`` as
    ``<model>-<label>.json`` (replacing one of the same name), then redraw the README table."""
    found = sorted(Path(run_results).glob("*.summary.json"))
    if not found:
        raise DataError(f"--publish {run_results}: no *.summary.json there (run.sh writes them beside each results file)")
    if not slug(label):
        raise DataError(f"--label: {label!r} has no letters or digits; expected e.g. cpu-bf16")
    Path(summary_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for path in found:
        summary = {"label": label, **{k: v for k, v in load_json(path, "results summary").items() if k != "label"}}
        written.append(write_summary(summary, Path(summary_dir) / f"{slug(summary['model'])}-{slug(label)}.json"))
    if readme is not None:
        update_readme(readme, summary_table(summary_dir, Path(readme).parent))
    return written


def best_runs(summaries: list[dict]) -> list[dict]:
    """Each model's best run (by NDCG@10) per dataset and number of test users, best models first."""
    best: dict[tuple, dict] = {}
    for s in summaries:
        key = (s.get("dataset"), s["model"], s["num_users"])
        if key not in best or s["mean"].get("ndcg@10", 0) > best[key]["mean"].get("ndcg@10", 0):
            best[key] = s
    return sorted(best.values(), key=lambda s: (str(s.get("dataset")), -s["num_users"], -s["mean"].get("ndcg@10", 0)))


def paired_cells(s: dict, summaries: list[dict]) -> list[str]:
    """The run's difference from popularity over the same users (the popularity run of those users)."""
    users = set(s["per_user"]["users"])
    refs = [r for r in summaries if r["model"] == REFERENCE_MODEL and set(r["per_user"]["users"]) == users
            and r.get("dataset") == s.get("dataset")]
    if s["model"] == REFERENCE_MODEL or not refs:
        return ["–" for _ in TABLE_METRICS]
    diff = paired_difference(s["per_user"], refs[0]["per_user"], TABLE_METRICS, (str(s["file"]), str(refs[0]["file"])))
    return [f"{d:+.4f} ± {se:.4f} ({d / se:+.1f})" if se > 0 else f"{d:+.4f} ± 0" for d, se in (diff[m] for m in TABLE_METRICS)]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def summary_table(summary_dir: str | Path = SUMMARY_DIR, link_from: str | Path = ROOT) -> str:
    """The README's results table: each model's best measured run, with the standard errors and
    the paired difference from popularity; a model without a summary has no row."""
    summaries = load_summaries(summary_dir)
    head = ("| model | run | test users | " + " | ".join(metric_label(m) for m in TABLE_METRICS) + " | "
            + " | ".join(f"{metric_label(m)} − popularity" for m in TABLE_METRICS)
            + " | distinct top-1 | training | machine |")
    rows = [head, "|" + "---|" * (len(TABLE_METRICS) * 2 + 6)]
    for s in best_runs(summaries):
        link = os.path.relpath(s["file"], link_from).replace(os.sep, "/")
        cells = [f"{s['mean'][m]:.4f} ± {s['stderr'][m]:.4f}" for m in TABLE_METRICS] + paired_cells(s, summaries)
        top1 = "–" if s.get("distinct_top1") is None else f"{s['distinct_top1']:.0f}"
        rows.append(f"| {s['model']} | [{s.get('label', Path(s['file']).stem)}]({link}) | {s.get('dataset')}, "
                    f"{s['num_users']} | " + " | ".join(cells)
                    + f" | {top1} | {duration(s.get('train_time_s'))} | {machine_label(s.get('machine') or {})} |")
    if len(rows) == 2:
        rows.append("| (no measured run published yet) |" + " |" * (len(TABLE_METRICS) * 2 + 5))
    return "\n".join(rows)


def readme_table(text: str, source: str = "README.md") -> str:
    """The generated block of the README (between the two marker lines)."""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise DataError(f"{source}: the results table's marker lines are missing ({TABLE_BEGIN} ... {TABLE_END})")
    return text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip("\n")


def update_readme(readme: str | Path, table: str) -> None:
    text = Path(readme).read_text()
    readme_table(text, str(readme))  # both markers are there
    before, rest = text.split(TABLE_BEGIN, 1)
    after = rest.split(TABLE_END, 1)[1]
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{before}{TABLE_BEGIN}\n{table}\n{TABLE_END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="results JSON files written by test.py / baseline.py / baselines")
    parser.add_argument("--names", nargs="+", help="one display name per file")
    parser.add_argument("--reference", help="also give each model's difference from this one (a --names entry, "
                        "or a file's stem without --names), paired over the same test users")
    parser.add_argument("--output", help="also write the table to this Markdown file")
    g = parser.add_argument_group("summaries of measured runs and the README table")
    g.add_argument("--summary", help="write the summary of the one results file given (its model: --names) here")
    g.add_argument("--profile", help="--summary: the run.sh profile the run used")
    g.add_argument("--trainer_state", help="--summary: trainer_state.json of the fine-tuning (its training time)")
    g.add_argument("--command", help="--summary: the command that produced the run")
    g.add_argument("--wall_time_s", type=float, help="--summary: wall time of the run up to this model's results")
    g.add_argument("--publish", metavar="RUN_RESULTS", help="copy the *.summary.json of this folder into "
                   "docs/results/ (as <model>-<label>.json) and redraw the README table")
    g.add_argument("--label", help="--publish: a short name of the run, e.g. cpu-bf16")
    g.add_argument("--markdown", action="store_true", help="print the README table drawn from docs/results/")
    g.add_argument("--summary_dir", default=str(SUMMARY_DIR), help="the committed summaries (default docs/results)")
    g.add_argument("--readme", default=str(README), help="the README whose table --publish redraws")
    args = parser.parse_args()
    if args.markdown:
        print(summary_table(args.summary_dir, Path(args.readme).parent))
        return
    if args.publish:
        if not args.label:
            raise DataError("--publish needs --label, a short name of the run (e.g. cpu-bf16)")
        for path in publish(args.publish, args.label, args.summary_dir, args.readme):
            print(f"summary: {path}")
        print(f"table redrawn in {args.readme}")
        return
    if not args.files:
        parser.error("give results files, or --publish RUN_RESULTS --label L, or --markdown")
    if args.summary:
        if len(args.files) != 1 or not args.names or len(args.names) != 1:
            raise DataError("--summary: give one results file and its model's name (--names)")
        summary = summarize(args.files[0], args.names[0], profile=args.profile, trainer_state=args.trainer_state,
                            command=args.command, wall_time_s=args.wall_time_s)
        print(f"summary: {write_summary(summary, args.summary)}")
        return
    table = results_table(args.files, args.names, args.reference)
    print(table)
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(table + "\n")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
