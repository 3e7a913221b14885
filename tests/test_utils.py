import json
from pathlib import Path

import pytest

from arguments import parse_args
from dataset_files import load_indices, load_inters
from utils import DataError, atomic_path, write_json_atomic


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_json_atomic({"a": 1}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_index_validation(tmp_path):
    p = tmp_path / "x.index.json"
    p.write_text(json.dumps({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>", "<b_2>"]}))
    with pytest.raises(DataError, match="share the index"):
        load_indices(p)
    p.write_text(json.dumps({"0": ["<a_1>", "<b_2>"], "1": ["<a_1>"]}))
    with pytest.raises(DataError, match="length"):
        load_indices(p)
    p.write_text(json.dumps({"0": ["<a_1>", "<b_2>"], "1": ["<a_2>", "<b_2>"]}))
    with pytest.raises(DataError, match="no index"):
        load_indices(p, required_items=[0, 1, 7])
    assert load_indices(p, required_items=[0, 1])["1"] == ["<a_2>", "<b_2>"]


def test_inter_validation(tmp_path):
    p = tmp_path / "x.inter.json"
    p.write_text(json.dumps({"0": [1, 2, 3], "1": [4, 5]}))
    with pytest.raises(DataError, match="user '1' has 2 interactions"):
        load_inters(p)
    p.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_inters(p)
    with pytest.raises(DataError, match="not found"):
        load_inters(tmp_path / "missing.json")


def test_task_flags_must_match(capsys):
    with pytest.raises(SystemExit):
        parse_args("train", ["--tasks", "seqrec,item2index", "--train_prompt_sample_num", "1",
                             "--train_data_sample_num", "0,0"])
    assert "--train_prompt_sample_num" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args("train", ["--tasks", "seqrec,bogus", "--train_prompt_sample_num", "1,1",
                             "--train_data_sample_num", "0,0"])
    assert "unknown task" in capsys.readouterr().err
    args = parse_args("train", [])
    assert args.learning_rate == 5e-5 and args.epochs == 4 and args.per_device_batch_size == 8


def test_index_length_blames_the_odd_item_not_the_first(tmp_path):
    p = tmp_path / "x.index.json"
    rows = {"0": ["<a_1>"], **{str(i): [f"<a_{i}>", f"<b_{i}>"] for i in range(1, 6)}}
    p.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"1 items have an index whose length differs from the other items' 2: '0' \(length 1\)"):
        load_indices(p)


def test_pyproject_installs_every_top_level_module():
    """``pip install -e .`` must make every shared module importable from the script folders
    (bench/, index/, ...); a module left off the list fails only there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    modules = {p.stem for p in root.glob("*.py")} - {"test", "test_ddp"}  # scripts, not modules
    assert modules - listed == set() and listed <= modules
