"""Print the mean metrics of several results files side by side (Markdown), and with
``--reference`` each model's difference from one of them, paired over the same test users.

    python results_table.py results/lcrec.json results/popularity.json --names LC-Rec Popularity \
        --reference Popularity
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dataset_files import load_json
from metrics import metric_label, paired_difference
from utils import DataError, atomic_path, exit_on_data_error


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
    names = set.intersection(*(set(v) for v in per_prompt.values()))
    return {n: sum(v[n] for v in per_prompt.values()) / len(per_prompt) for n in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="results JSON files written by test.py / baseline.py")
    parser.add_argument("--names", nargs="+", help="one display name per file")
    parser.add_argument("--reference", help="also give each model's difference from this one (a --names entry, "
                        "or a file's stem without --names), paired over the same test users")
    parser.add_argument("--output", help="also write the table to this Markdown file")
    args = parser.parse_args()
    table = results_table(args.files, args.names, args.reference)
    print(table)
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(table + "\n")


if __name__ == "__main__":
    with exit_on_data_error():
        main()
