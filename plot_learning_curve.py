"""Plot the learning curve that fine-tuning logged with --curve_steps (learning_curve.json):
validation HR@10 and NDCG@10 against the examples seen, popularity on the same users as
horizontal lines.

    python plot_learning_curve.py --curve <ckpt>/learning_curve.json --output <run>/learning_curve.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines
import matplotlib.pyplot as plt  # noqa: E402

from dataset_files import load_json  # noqa: E402
from metrics import metric_label  # noqa: E402
from plot_loss import save_plot  # noqa: E402
from utils import DataError, exit_on_data_error  # noqa: E402


def plot_learning_curve(curve_file: str | Path, output: str | Path) -> Path:
    curve = load_json(curve_file, "learning curve")
    points = curve.get("points") if isinstance(curve, dict) else None
    if not points:
        raise DataError(f"{curve_file}: no points in 'points' (was --curve_steps larger than the run?)")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    examples = [p["examples"] for p in points]
    for metric, color in (("hit@10", "tab:blue"), ("ndcg@10", "tab:orange")):
        name = metric_label(metric)
        ax.plot(examples, [p[metric] for p in points], "o-", color=color, label=f"LC-Rec {name}", linewidth=1.5)
        if metric in curve.get("popularity", {}):
            ax.axhline(curve["popularity"][metric], color=color, linestyle="--", linewidth=1,
                       label=f"popularity {name}")
    return save_plot(fig, ax, "training examples seen", f"validation metric ({curve.get('users', '?')} users)",
                     "LC-Rec learning curve", output, legend_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve", required=True, help="learning_curve.json written by finetune.py --curve_steps")
    parser.add_argument("--output", required=True, help="PNG to write")
    args = parser.parse_args()
    with exit_on_data_error():
        print(plot_learning_curve(args.curve, args.output))


if __name__ == "__main__":
    main()
