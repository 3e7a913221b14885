"""Look at what a trained model recommends: for a user, a typed history, or a request in words.

    python recommend.py --ckpt_path ckpt/ml-100k --dataset ml-100k --data_path data --user 1
    python recommend.py ... --history "Star Wars (1977); Fargo (1996)" --k 5
    python recommend.py ... --history_ids 50,100 --json
    python recommend.py ... --query "a funny animated film for children"
    python recommend.py ... --serve --port 8000      # the web page at http://127.0.0.1:8000/

Every returned item is a real item (trie-constrained beam search, as in test.py); items already
in the history are marked. The logic lives in recommender.py, the server in recommend_server.py.
"""
import json
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # steadier on small CPU machines

from arguments import parse_args  # noqa: E402
from recommender import Recommender  # noqa: E402
from utils import DataError, exit_on_data_error  # noqa: E402


def format_table(out: dict) -> str:
    lines = []
    if out["history"]:
        shown = ", ".join(f'"{h["title"]}"' if h["title"] else h["item"] for h in out["history"][-5:])
        more = f"{len(out['history']) - 5} earlier items, then " if len(out["history"]) > 5 else ""
        lines.append(f"history ({len(out['history'])} items): {more}{shown}")
    if out["query"]:
        lines.append(f'request: "{out["query"]}"')
    lines += [f"note: {n}" for n in out["notes"]]
    width = max([len(r["title"]) for r in out["items"]] + [5])
    iw = max([len(r["index"]) for r in out["items"]] + [5])
    lines.append(f"{'rank':>4}  {'item':>6}  {'title':<{width}}  {'index':<{iw}}  {'score':>8}")
    for r in out["items"]:
        mark = "  (in history)" if r["in_history"] else ""
        if out.get("held_out") and r["item"] == out["held_out"]["item"]:
            mark = "  (held-out next item)"
        lines.append(f"{r['rank']:>4}  {r['item']:>6}  {r['title']:<{width}}  {r['index']:<{iw}}  {r['score']:>8.4f}{mark}")
    if out.get("held_out"):
        h = out["held_out"]
        where = f"rank {h['rank']}" if h["rank"] else "not in the top K"
        lines.append(f'held-out next item: {h["item"]} "{h["title"]}" ({where})')
    lines.append(f"{len(out['items'])} items in {out['latency_ms']} ms ({out['num_beams']} beams)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args("recommend", argv, description=__doc__.split("\n")[0])
    if not args.serve and not any(v is not None for v in (args.user, args.history, args.history_ids, args.query)):
        raise DataError("give --user, --history, --history_ids or --query (or --serve for the web page)")
    recommender = Recommender(args)
    if args.serve:
        from recommend_server import serve

        serve(recommender, args.host, args.port)
        return
    out = recommender.answer(args.user, args.history, args.history_ids, args.query, args.k)
    print(json.dumps(out, indent=1, ensure_ascii=False) if args.json else format_table(out))


if __name__ == "__main__":
    with exit_on_data_error():
        main()
