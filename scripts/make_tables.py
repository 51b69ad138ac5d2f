"""Turn finished runs into tables: our numbers, each cell's paired difference to its reference
cell (BN-1 in the paper's tables) with a 95 % interval, and beside them the paper's numbers and
a verdict on its claim.

    python scripts/make_tables.py --runs runs/e30            # writes results/e30/<table>.md|csv
    python scripts/make_tables.py --runs results/runs/e30 --out results/e30

Reads the sweep_<table>.json files that scripts/sweep.py (or collect_runs.py) leaves in the runs
directory to know which runs each cell needs; missing runs show as missing, never as zeros.
Tables of synthetic-data runs are titled so and carry no paper columns. A table committed to git
is only replaced by one made from the same runs, unless --force."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn import UserError  # noqa: E402
from mbn.results import (PAPER, REPO, check_replace, is_synthetic, load_grid, provenance, read_json,  # noqa: E402
                         render, table_rows)

TABLES = ["table1", "table2", "table3", "table3_top5", "table4", "table5", "table6", "figure1", "mbn_ablation",
          "small_batch_steps", "small_batch_epochs"]
NOTES = {"table2": "CIFAR-100 is downloaded by torchvision where the internet is reachable; runs made "
                   "without it are missing here.",
         "figure1": "The final test errors behind Figure 1 (ResNet-56); the paper gives them in its text.",
         "mbn_ablation": "One option changed at a time from MBN-2's defaults. The inference rows re-read the "
                         "MBN-2 and BN-1 runs (`test_err_running`, `test_err_precise` in their metrics.json); "
                         "no extra training. Precision rows: `auto` (the default rows) is bf16 on a GPU and "
                         "fp32 on a CPU."}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="directory holding the run directories and sweep_*.json")
    ap.add_argument("--out", default=None, help="output directory (default: results/<basename of --runs>)")
    ap.add_argument("--tables", nargs="*", default=TABLES)
    ap.add_argument("--force", action="store_true", help="replace committed tables made from other runs")
    args = ap.parse_args(argv)
    try:
        return make(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def make(args):
    out = args.out or os.path.join(REPO, "results", os.path.basename(os.path.normpath(args.runs)))
    paper = read_json(PAPER)
    made, absent = [], []
    for table in args.tables:
        loaded = load_grid(args.runs, table)
        if loaded is None:
            absent.append(table)
            continue
        sweep, grid, cells, runs = loaded
        synthetic = is_synthetic(sweep, runs)
        rows = table_rows(grid, cells, paper.get(table, {}), synthetic=synthetic)
        md, csv_text = render(grid, rows, provenance(runs, sweep), NOTES.get(table, ""), synthetic=synthetic,
                              runs=runs)
        paths = {ext: os.path.join(out, f"{table}.{ext}") for ext in ("md", "csv")}
        for path in paths.values():
            check_replace(path, runs, args.force, made_from=paths["md"])
        made.append((table, runs, paths, md, csv_text))
    if absent:
        print(f"[tables] no sweep file in {args.runs} for {', '.join(absent)}; skipped")
    os.makedirs(out, exist_ok=True)
    for table, runs, paths, md, csv_text in made:  # written only once every table may be
        for ext, text in (("md", md), ("csv", csv_text)):
            with open(paths[ext], "w") as f:
                f.write(text)
        print(f"[tables] {table}: {len(runs)} runs -> {os.path.join(out, table)}.md/.csv")
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
