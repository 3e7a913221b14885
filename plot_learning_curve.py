"""Plot the learning curve that fine-tuning logged with --curve_steps (learning_curve.json):
validation HR@10 and NDCG@10 against the examples seen, each point with a band of ± one standard
error over the validation users, and popularity on the same users as horizontal lines. Where no
two points of a metric are two standard errors apart, the plot says that the curve cannot tell
them apart (and the script prints it).

    python plot_learning_curve.py --curve <ckpt>/learning_curve.json --output <run>/learning_curve.png
"""
from __future__ import annotations

import argparse
import math
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines
import matplotlib.pyplot as plt  # noqa: E402

from dataset_files import load_json  # noqa: E402
from metrics import metric_label  # noqa: E402
from plot_loss import save_plot  # noqa: E402
from utils import DataError, exit_on_data_error  # noqa: E402

CURVE_COLORS = {"hit@10": "tab:blue", "ndcg@10": "tab:orange"}


def point_stderr(point: dict, metric: str, users: int) -> float | None:
    """A point's standard error: the recorded one, or for a hit rate (each user 0 or 1) the one its
    value implies, sqrt(p (1 - p) / (n - 1)), for curves written before points carried it."""
    if metric in point.get("stderr", {}):
        return point["stderr"][metric]
    if metric.startswith("hit@") and users > 1:
        p = point[metric]
        return math.sqrt(p * (1 - p) / (users - 1))
    return None


def indistinct_metrics(points: list[dict], metrics: list[str], users: int) -> list[str]:
    """The metrics whose points are all within two standard errors of each other's difference:
    the curve shows noise there, not a change (with one point there is nothing to tell apart)."""
    out = []
    for m in metrics:
        pairs = [(point_stderr(a, m, users), point_stderr(b, m, users), a[m] - b[m]) for a, b in combinations(points, 2)]
        if pairs and all(sa is not None and sb is not None and abs(d) <= 2 * math.hypot(sa, sb) for sa, sb, d in pairs):
            out.append(m)
    return out


def draw_learning_curve(curve: dict, source: str = "learning curve") -> tuple[plt.Figure, plt.Axes, str]:
    """The figure of a learning curve and its note ('' when every metric's points can be told apart)."""
    points = curve.get("points") if isinstance(curve, dict) else None
    if not points:
        raise DataError(f"{source}: no points in 'points' (was --curve_steps larger than the run?)")
    users = int(curve.get("users") or 0)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    examples = [p["examples"] for p in points]
    for metric, color in CURVE_COLORS.items():
        name = metric_label(metric)
        values = [p[metric] for p in points]
        ax.plot(examples, values, "o-", color=color, label=f"LC-Rec {name}", linewidth=1.5)
        errors = [point_stderr(p, metric, users) for p in points]
        if all(e is not None for e in errors):
            ax.fill_between(examples, [v - e for v, e in zip(values, errors)], [v + e for v, e in zip(values, errors)],
                            color=color, alpha=0.2, linewidth=0)
        if metric in curve.get("popularity", {}):
            ax.axhline(curve["popularity"][metric], color=color, linestyle="--", linewidth=1,
                       label=f"popularity {name}")
    flat = indistinct_metrics(points, list(CURVE_COLORS), users)
    note = ""
    if flat and len(points) > 1:
        note = (f"{' and '.join(metric_label(m) for m in flat)}: every point within 2 standard errors of the others "
                f"({users} users); the curve cannot tell them apart")
        ax.text(0.01, 0.99, note.replace("; ", ";\n"), transform=ax.transAxes, va="top", fontsize=7,
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    ax.set_ylim(bottom=0)
    return fig, ax, note


def plot_learning_curve(curve_file: str | Path, output: str | Path) -> tuple[Path, str]:
    """Write the PNG; return its path and the note on points that cannot be told apart ('' if none)."""
    curve = load_json(curve_file, "learning curve")
    fig, ax, note = draw_learning_curve(curve, str(curve_file))
    path = save_plot(fig, ax, "training examples seen", f"validation metric ± 1 SE ({curve.get('users', '?')} users)",
                     "LC-Rec learning curve", output, legend_size=8)
    return path, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve", required=True, help="learning_curve.json written by finetune.py --curve_steps")
    parser.add_argument("--output", required=True, help="PNG to write")
    args = parser.parse_args()
    with exit_on_data_error():
        path, note = plot_learning_curve(args.curve, args.output)
    print(path)
    if note:
        print(f"learning curve: {note}")


if __name__ == "__main__":
    main()
