"""Turn finished runs into tables: our numbers, each cell's paired difference to its reference
cell (BN-1 in the paper's tables) with a 95 % interval, and — for runs on the paper's schedule
(200 epochs) on real data — the paper's numbers and a verdict on its claim, Holm-corrected.

    python scripts/make_tables.py --runs runs/e30            # writes results/e30/<table>.md|csv
    python scripts/make_tables.py --runs results/runs/e30 --out results/e30

Reads the sweep_<table>.json files that scripts/sweep.py (or collect_runs.py) leaves in the runs
directory to know which runs each cell needs; missing runs show as missing, never as zeros,
diverged ones as `diverged k/n`, damaged ones are named and skipped. Tables of synthetic-data runs
are titled so and carry no paper columns. A table committed to git is only replaced by one made
from the same runs, unless --force. results/README.md explains every column and rule."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn import UserError  # noqa: E402
from mbn.cli import ArgumentParser, existing_dir, run  # noqa: E402
from mbn.results import (DEFAULT_MARGIN, PAPER, REPO, DamagedFile, check_replace, is_synthetic, load_grid,  # noqa: E402
                         provenance, read_json, render, table_rows, warn, write_atomic)

TABLES = ["table1", "table2", "table3", "table3_top5", "table4", "table5", "table6", "figure1", "mbn_ablation",
          "small_batch_steps", "small_batch_epochs"]
NOTES = {"table2": "CIFAR-100 is downloaded by torchvision where the internet is reachable; runs made "
                   "without it are missing here.",
         "figure1": "The final test errors behind Figure 1 (ResNet-56); the paper gives them in its text.",
         "mbn_ablation": "One option changed at a time from MBN-2's defaults. The inference rows re-read the "
                         "MBN-2 and BN-1 runs (`test_err_running`, `test_err_precise` in their metrics.json); "
                         "no extra training. Precision rows: `auto` (the default rows) is bf16 on a GPU and "
                         "fp32 on a CPU. The λ = 0 row runs MBN's own code and must equal BN-1 up to rounding; "
                         "the train error column shows underfitting where the test error alone cannot.",
         "small_batch_steps": "Batch sizes below 8 lie outside the paper's rule (its Table 4: 8 to 128). "
                              "`bn (PreciseBN)`: BN's runs inferred with statistics recomputed with the final "
                              "weights, beside their running averages (`bn`).",
         "small_batch_epochs": "`bn (PreciseBN)`: BN's runs inferred with statistics recomputed with the final "
                               "weights, beside their running averages (`bn`)."}


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--runs", required=True, help="directory holding the run directories and sweep_*.json")
    ap.add_argument("--out", default=None, help="output directory (default: results/<basename of --runs>)")
    ap.add_argument("--tables", nargs="+", default=TABLES, choices=TABLES, metavar="TABLE",
                    help=f"tables to make (default: all): {' '.join(TABLES)}")
    ap.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                    help="Table 6's equivalence margin in percentage points (default %(default)s)")
    ap.add_argument("--force", action="store_true", help="replace committed tables made from other runs")
    args = ap.parse_args(argv)
    existing_dir(args.runs)
    if not 0 < args.margin < math.inf:  # nan and inf too: an infinite margin makes every cell "equivalent"
        raise UserError(f"--margin {args.margin}: the equivalence margin must be a positive number of "
                        "percentage points, e.g. --margin 0.3")
    out = args.out or os.path.join(REPO, "results", os.path.basename(os.path.normpath(args.runs)))
    paper = read_json(PAPER)
    made, absent = [], []
    for table in args.tables:
        try:
            loaded = load_grid(args.runs, table)
        except DamagedFile as e:
            warn(f"{e}; {table} skipped")
            continue
        if loaded is None:
            absent.append(table)
            continue
        sweep, grid, cells, runs = loaded
        synthetic = is_synthetic(sweep, runs)
        rows = table_rows(grid, cells, paper.get(table, {}), synthetic=synthetic, margin=args.margin)
        md, csv_text = render(grid, rows, provenance(runs, sweep), NOTES.get(table, ""), synthetic=synthetic,
                              runs=runs, paper=paper.get(table, {}), margin=args.margin)
        paths = {ext: os.path.join(out, f"{table}.{ext}") for ext in ("md", "csv")}
        for path in paths.values():
            check_replace(path, runs, args.force, made_from=paths["md"])
        made.append((table, runs, paths, md, csv_text))
    if absent:
        print(f"[tables] no sweep file in {args.runs} for {', '.join(absent)}; skipped")
    if not made:
        raise UserError(f"no table made from {args.runs}: it holds no readable sweep_<table>.json for "
                        f"{', '.join(args.tables)} (scripts/sweep.py writes them; for runs launched by hand, "
                        "scripts/collect_runs.py)")
    os.makedirs(out, exist_ok=True)
    for table, runs, paths, md, csv_text in made:  # written only once every table may be
        for ext, text in (("md", md), ("csv", csv_text)):
            write_atomic(paths[ext], text)
        print(f"[tables] {table}: {len(runs)} runs -> {os.path.join(out, table)}.md/.csv")
    return 0


if __name__ == "__main__":
    run(main)
