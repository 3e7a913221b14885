import json

import pytest

from plot_loss import loss_curves, plot_loss
from utils import DataError


def test_loss_curves_and_png(tmp_path):
    state = {"log_history": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
                             {"step": 2, "eval_loss": 2.7, "epoch": 1.0}, {"step": 2, "train_runtime": 9.0}]}
    train, valid = loss_curves(state)
    assert train == [(1, 3.0), (2, 2.5)] and valid == [(2, 2.7)]
    src = tmp_path / "trainer_state.json"
    src.write_text(json.dumps(state))
    out = plot_loss(src, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_history_is_an_error(tmp_path):
    src = tmp_path / "trainer_state.json"
    src.write_text(json.dumps({"log_history": [{"step": 3, "train_runtime": 1.0}]}))
    with pytest.raises(DataError, match="no logged loss"):
        plot_loss(src, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
