"""Print the mean metrics of several results files side by side (Markdown).

    python results_table.py results/lcrec.json results/popularity.json --names LC-Rec Popularity
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils import DataError, atomic_path, load_json


def results_table(files: list[str], names: list[str] | None = None) -> str:
    names = names or [Path(f).stem for f in files]
    if len(names) != len(files):
        raise DataError(f"--names: {len(names)} names for {len(files)} results files")
    results = [load_json(f, "results") for f in files]
    metrics = results[0].get("metrics")
    for f, res in zip(files, results):
        if "mean" not in res or res.get("metrics") != metrics:
            raise DataError(f"{f}: expected a results file with 'mean' over the metrics {metrics}")
    head = "| model | examples | " + " | ".join(m.replace("hit", "HR").replace("ndcg", "NDCG") for m in metrics) + " |"
    rows = [head, "|" + "---|" * (len(metrics) + 2)]
    for name, res in zip(names, results):
        rows.append(f"| {name} | {res.get('num_examples', '?')} | "
                    + " | ".join(f"{res['mean'][m]:.4f}" for m in metrics) + " |")
    return "\n".join(rows)


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
    main()
