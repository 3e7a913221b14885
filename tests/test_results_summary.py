"""The README's results table is drawn from the committed summaries (docs/results/*.json); the
publish command writes summaries that render; the README stays a front page with valid links."""
import json
import re
from pathlib import Path

import pytest

import results_table as rt
from metrics import per_user_values
from utils import DataError

ROOT = Path(__file__).resolve().parents[1]
USERS = [f"u{i}" for i in range(8)]


def write_results(path: Path, ranks: list[int], **extra) -> str:
    """A results file as test.py / baseline.py write it (one prompt), from each user's target rank."""
    metrics = ["hit@10", "ndcg@10"]
    per_user = per_user_values(USERS, [ranks], metrics)
    mean = {m: sum(per_user[m]) / len(USERS) for m in metrics}
    path.write_text(json.dumps({"dataset": "Tiny", "test_task": "seqrec", "metrics": metrics, "prompt_ids": [0],
                                "num_examples": len(USERS), "per_prompt": {"0": mean}, "mean": mean,
                                "stderr": {"0": {m: 0.1 for m in metrics}},
                                "personalisation": {"0": {"distinct_top1": 3, "top10_differs_share": 1.0}},
                                "per_user": per_user, **extra}))
    return str(path)


def test_readme_table_is_what_the_summaries_render():
    text = (ROOT / "README.md").read_text()
    drawn = rt.summary_table()
    assert rt.readme_table(text) == drawn, "README's table differs: run python results_table.py --markdown"
    # a figure edited by hand in the README no longer matches what the summaries render
    figure = re.search(r"\d\.\d{4}", drawn).group(0)
    edited = text.replace(figure, f"{float(figure) + 0.01:.4f}", 1)
    assert rt.readme_table(edited) != drawn


def test_every_committed_summary_is_complete():
    summaries = rt.load_summaries(rt.SUMMARY_DIR)
    assert summaries, "docs/results holds no summary"
    for s in summaries:
        assert s["num_users"] == len(set(s["per_user"]["users"]))
        for m in rt.TABLE_METRICS:  # the mean and standard error are those of the per-user values
            values = s["per_user"][m]
            assert s["mean"][m] == pytest.approx(sum(values) / len(values), abs=1e-5)
        assert s["command"] and s["machine"]["cpu"] and s["date"]


def test_publish_writes_summaries_that_render(tmp_path, monkeypatch):
    run = tmp_path / "run" / "results"
    run.mkdir(parents=True)
    # popularity hits users 0-1 (ranks 3 and 8); the model hits users 0-3, two of them at rank 1
    pop = write_results(run / "popularity.json", [3, 8, 0, 0, 0, 0, 0, 0])
    lcrec = write_results(run / "lcrec.json", [1, 1, 2, 5, 0, 0, 0, 0])
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}, {"train_runtime": 754.2, "step": 2}]}))
    rt.write_summary(rt.summarize(pop, "Popularity", command="bash run.sh", wall_time_s=5), run / "popularity.summary.json")
    rt.write_summary(rt.summarize(lcrec, "LC-Rec", trainer_state=str(state), profile="quick", command="bash run.sh"),
                     run / "lcrec.summary.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{rt.TABLE_BEGIN}\n{rt.TABLE_END}\n\nafter\n")  # an empty block is filled
    docs = tmp_path / "docs" / "results"

    written = rt.publish(run, "quick-cpu", docs, readme)
    assert sorted(p.name for p in written) == ["lc-rec-quick-cpu.json", "popularity-quick-cpu.json"]
    saved = json.loads((docs / "lc-rec-quick-cpu.json").read_text())
    assert saved["label"] == "quick-cpu" and saved["train_time_s"] == 754.2 and saved["profile"] == "quick"
    assert saved["per_user"]["users"] == USERS and saved["commit"]
    table = rt.readme_table(readme.read_text())
    assert table == rt.summary_table(docs, tmp_path) and readme.read_text().endswith("\n\nafter\n")
    rows = [r for r in table.splitlines() if r.startswith("| LC-Rec") or r.startswith("| Popularity")]
    assert len(rows) == 2 and rows[0].startswith("| LC-Rec")  # the better model first
    # per-user differences 1, 1-1/log2(4), 1/log2(3), 1/log2(6)... for NDCG: only HR@10 is checked by hand:
    # hits 1,1,1,1 against 1,1,0,0 -> differences 0,0,1,1: mean 0.25, standard error sqrt(0.25*4/7/8)
    se = (0.25 * 0.75 * 8 / 7 / 8) ** 0.5
    assert f"+0.2500 ± {se:.4f}" in rows[0] and "[quick-cpu](docs/results/lc-rec-quick-cpu.json)" in rows[0]
    assert "| 13 min |" in rows[0] and "| – |" in rows[1]  # training time; popularity is not trained

    # a later, worse run of the same model is kept as a file but the table shows the best one
    worse = write_results(run / "lcrec.json", [0, 0, 0, 9, 0, 0, 0, 0])
    rt.write_summary(rt.summarize(worse, "LC-Rec", command="bash run.sh"), run / "lcrec.summary.json")
    (run / "popularity.summary.json").unlink()
    rt.publish(run, "second", docs, readme)
    assert (docs / "lc-rec-second.json").is_file()
    assert "[quick-cpu]" in rt.readme_table(readme.read_text()) and "[second]" not in rt.readme_table(readme.read_text())


def test_publish_and_summary_refuse_bad_input(tmp_path):
    with pytest.raises(DataError, match="no \\*.summary.json"):
        rt.publish(tmp_path, "x", tmp_path / "docs", None)
    old = tmp_path / "old.json"  # a results file from before per-user values cannot be paired: refused
    old.write_text(json.dumps({"metrics": ["hit@10"], "mean": {"hit@10": 0.5}}))
    with pytest.raises(DataError, match="no per-user values"):
        rt.summarize(str(old), "Old")
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(DataError, match="marker lines are missing"):
        rt.update_readme(readme, "| table |")


def test_an_empty_summary_folder_renders_a_placeholder_row(tmp_path):
    assert "no measured run published yet" in rt.summary_table(tmp_path, tmp_path)


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the front page keeps to 250"
    # the results table comes right after the two commands
    run_line = next(i for i, line in enumerate(lines) if "bash run.sh" in line)
    assert 0 < next(i for i, line in enumerate(lines) if line == rt.TABLE_BEGIN) - run_line < 40


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_in_the_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
