"""Plot the training and validation loss curves that HF Trainer logged in trainer_state.json.

    python plot_loss.py --trainer_state <ckpt>/trainer_state.json --output <ckpt>/loss.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines
import matplotlib.pyplot as plt  # noqa: E402

from dataset_files import load_json  # noqa: E402
from utils import DataError, atomic_path, exit_on_data_error  # noqa: E402


def loss_curves(trainer_state: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(step, train loss) and (step, eval loss) pairs from a trainer state's log history."""
    history = trainer_state.get("log_history")
    if not isinstance(history, list):
        raise DataError("trainer state: expected a list field 'log_history'")
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    valid = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    return train, valid


def plot_loss(trainer_state_file: str | Path, output: str | Path) -> Path:
    state = load_json(trainer_state_file, "trainer state")
    train, valid = loss_curves(state)
    if not train and not valid:
        raise DataError(f"{trainer_state_file}: no logged loss in 'log_history' (was logging_steps too large?)")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss (seqrec)", linewidth=1.5)
    return save_plot(fig, ax, "optimizer step", "loss", "LC-Rec fine-tuning", output)


def save_plot(fig, ax, xlabel: str, ylabel: str, title: str, output: str | Path, legend_size: int | None = None) -> Path:
    """Labels, grid and legend, then the PNG written atomically; the figure is closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer_state", required=True, help="trainer_state.json of a checkpoint or output_dir")
    parser.add_argument("--output", required=True, help="PNG to write")
    args = parser.parse_args()
    print(plot_loss(args.trainer_state, args.output))


if __name__ == "__main__":
    with exit_on_data_error():
        main()
