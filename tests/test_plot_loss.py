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


def curve_of(points, users=20):
    return {"users": users, "popularity": {"hit@10": 0.05, "ndcg@10": 0.02}, "points": points}


def test_learning_curve_draws_a_standard_error_band_per_metric(tmp_path):
    from matplotlib.collections import PolyCollection

    from plot_learning_curve import draw_learning_curve, plot_learning_curve

    points = [{"examples": 400, "hit@10": 0.05, "ndcg@10": 0.02, "stderr": {"hit@10": 0.05, "ndcg@10": 0.02}},
              {"examples": 800, "hit@10": 0.0, "ndcg@10": 0.0, "stderr": {"hit@10": 0.0, "ndcg@10": 0.0}}]
    fig, ax, note = draw_learning_curve(curve_of(points))
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # HR@10 and NDCG@10, each ± one standard error
    top = bands[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(0.10)  # 0.05 + its standard error 0.05
    # 0.05 then 0 on 20 users: within two standard errors, so the plot says the points cannot be told apart
    assert "cannot tell them apart" in note and "HR@10" in note
    assert any("cannot tell them apart" in t.get_text() for t in ax.texts)
    path = tmp_path / "curve.json"
    path.write_text(json.dumps(curve_of(points)))
    png, printed = plot_learning_curve(path, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and printed == note


def test_learning_curve_with_points_apart_has_no_note_and_older_curves_get_the_hit_rate_band():
    from plot_learning_curve import draw_learning_curve

    # no "stderr" (a curve written before points carried it): HR@10's follows from its value, NDCG@10 has none
    points = [{"examples": 100, "hit@10": 0.02, "ndcg@10": 0.01}, {"examples": 200, "hit@10": 0.30, "ndcg@10": 0.15}]
    fig, ax, note = draw_learning_curve(curve_of(points, users=400))
    assert len(ax.collections) == 1 and note == ""  # 0.02 -> 0.30 on 400 users is far more than 2 SE
