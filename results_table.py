"""Print the mean metrics of several results files side by side (Markdown).

    python results_table.py results/lcrec.json results/popularity.json --names LC-Rec Popularity
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dataset_files import load_json
from utils import DataError, atomic_path, exit_on_data_error


def results_table(files: list[str], names: list[str] | None = None) -> str:
    names = names or [Path(f).stem for f in files]
    if len(names) != len(files):
        raise DataError(f"--names: {len(names)} names for {len(files)} results files")
    results = [load_json(f, "results") for f in files]
    metrics = results[0].get("metrics")
    for f, res in zip(files, results):
        if "mean" not in res or res.get("metrics") != metrics:
            raise DataError(f"{f}: expected a results file with 'mean' over the metrics {metrics}")
    head = ("| model | examples | " + " | ".join(m.replace("hit", "HR").replace("ndcg", "NDCG") for m in metrics)
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
    return "\n".join(rows)


def mean_over_prompts(per_prompt: dict | None) -> dict[str, float]:
    """{prompt id: {name: value}} -> {name: mean over prompts}; {} when absent (older files)."""
    if not per_prompt:
        return {}
    names = set.intersection(*(set(v) for v in per_prompt.values()))
    return {n: sum(v[n] for v in per_prompt.values()) / len(per_prompt) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="results JSON files written by test.py / baseline.py")
    parser.add_argument("--names", nargs="+", help="one display name per file")
    parser.add_argument("--output", help="also write the table to this Markdown file")
    args = parser.parse_args()
    table = results_table(args.files, args.names)
    print(table)
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(table + "\n")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
