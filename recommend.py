"""Look at what a trained model recommends: for a user, a typed history, or a request in words.

    python recommend.py --ckpt_path ckpt/ml-100k --dataset ml-100k --data_path data --user 1
    python recommend.py ... --history "Star Wars (1977); Fargo (1996)" --k 5
    python recommend.py ... --history_ids 50,100 --json
    python recommend.py ... --query "a funny animated film for children"
    python recommend.py ... --serve --port 8000      # the web page at http://127.0.0.1:8000/

Every returned item is a real item (trie-constrained beam search, as in test.py). Items already
in the history are left out by the search, which returns K other items (--keep_history keeps
them, marked). The model uses every core unless --threads says otherwise. The logic lives in
recommender.py, the server in recommend_server.py.
"""
import json

from arguments import parse_args
from recommender import Recommender, shorten
from utils import DataError, exit_on_data_error


def format_table(out: dict, title_width: int = 60) -> str:
    """The answer as text; titles (and the request) longer than ``title_width`` are cut."""
    def cut(title: str) -> str:
        return title if len(title) <= title_width else title[:max(title_width - 1, 0)] + "…"

    lines = []
    if out["history"]:
        shown = ", ".join(f'"{cut(h["title"])}"' if h["title"] else h["item"] for h in out["history"][-5:])
        more = f"{len(out['history']) - 5} earlier items, then " if len(out["history"]) > 5 else ""
        lines.append(f"history ({len(out['history'])} items): {more}{shown}")
    if out["query"]:
        lines.append(f'request: "{shorten(out["query"], max(title_width, 200))}"')
    lines += [f"note: {n}" for n in out["notes"]]
    if not out.get("keep_history", True) and out["history"]:
        lines.append("items of the history are left out (--keep_history keeps them)")
    titles = [cut(r["title"]) for r in out["items"]]
    width = max([len(t) for t in titles] + [5])
    iw = max([len(r["index"]) for r in out["items"]] + [5])
    lines.append(f"{'rank':>4}  {'item':>6}  {'title':<{width}}  {'index':<{iw}}  {'score':>8}")
    for r, title in zip(out["items"], titles):
        mark = "  (in history)" if r["in_history"] else ""
        if out.get("held_out") and r["item"] == out["held_out"]["item"]:
            mark = "  (held-out next item)"
        lines.append(f"{r['rank']:>4}  {r['item']:>6}  {title:<{width}}  {r['index']:<{iw}}  {r['score']:>8.4f}{mark}")
    if out.get("held_out"):
        h = out["held_out"]
        where = f"rank {h['rank']}" if h["rank"] else "not in the top K"
        lines.append(f'held-out next item: {h["item"]} "{cut(h["title"])}" ({where})')
    lines.append(f"{len(out['items'])} items in {out['latency_ms']} ms ({out['num_beams']} beams)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args("recommend", argv, description=__doc__.split("\n")[0])
    if not args.serve and not any(v is not None for v in (args.user, args.history, args.history_ids, args.query)):
        raise DataError("give --user, --history, --history_ids or --query (or --serve for the web page)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.serve:
        from recommend_server import listen, serve

        sock = listen(args.host, args.port)  # before the model loads: a port in use fails at once
        serve(Recommender(args), sock, args.host, args.max_body_kb * 1024)
        return
    out = Recommender(args).answer(args.user, args.history, args.history_ids, args.query, args.k, args.keep_history)
    print(json.dumps(out, indent=1, ensure_ascii=False) if args.json else format_table(out, args.title_width))


if __name__ == "__main__":
    with exit_on_data_error():
        main()
