"""Run several learned baselines one after the other, each on the same split and test users.

    python -m baselines --model sasrec,gru4rec,tiger --dataset ml-100k --data_path data \
        --results_file 'results/{model}.json'

Every other flag is the families' (see ``python -m baselines.sasrec -h``); flags left out take
each family's own default. Each family prints its own training time.
"""
from __future__ import annotations

import time

from arguments import parse_list
from baselines import family
from baselines.runner import build_parser, run
from utils import DataError, exit_on_data_error


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="comma-separated families: sasrec, gru4rec, tiger")
    args = parser.parse_args(argv)
    with exit_on_data_error():
        families = [family(name) for name in parse_list(args.model, str, "--model")]
        if not families:
            raise DataError("--model: no model given; expected e.g. sasrec,gru4rec,tiger")
        if len(families) > 1 and "{model}" not in args.results_file:
            raise DataError(f"--results_file {args.results_file}: with several models it must contain {{model}}")
        times = {}
        for fam in families:
            start = time.time()
            run(args, fam)
            times[fam.NAME] = time.time() - start
        print("wall time per model: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))


if __name__ == "__main__":
    main()
