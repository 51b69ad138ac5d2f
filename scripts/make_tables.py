"""Turn finished runs into the paper's tables, our numbers beside the paper's.

    python scripts/make_tables.py --runs runs/e30            # writes results/e30/table*.md|csv
    python scripts/make_tables.py --runs results/runs/e30 --out results/e30

Reads the sweep_<table>.json files that scripts/sweep.py leaves in the runs directory to know
which runs each cell needs; missing runs show as missing, never as zeros."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn.results import PAPER, REPO, load_grid, provenance, read_json, render, table_rows  # noqa: E402

TABLES = ["table1", "table2", "table3", "table3_top5", "table4", "table5", "table6"]
NOTES = {"table2": "CIFAR-100 is downloaded by torchvision where the internet is reachable; runs made "
                   "without it are missing here."}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="directory holding the run directories and sweep_*.json")
    ap.add_argument("--out", default=None, help="output directory (default: results/<basename of --runs>)")
    ap.add_argument("--tables", nargs="*", default=TABLES)
    args = ap.parse_args(argv)
    out = args.out or os.path.join(REPO, "results", os.path.basename(os.path.normpath(args.runs)))
    os.makedirs(out, exist_ok=True)
    paper = read_json(PAPER)
    written = []
    for table in args.tables:
        loaded = load_grid(args.runs, table)
        if loaded is None:
            continue
        sweep, grid, cells, runs = loaded
        rows = table_rows(grid, cells, paper.get(table, {}))
        md, csv_text = render(grid, rows, provenance(runs, sweep), NOTES.get(table, ""))
        for ext, text in (("md", md), ("csv", csv_text)):
            path = os.path.join(out, f"{table}.{ext}")
            with open(path, "w") as f:
                f.write(text)
            written.append(path)
        print(f"[tables] {table}: {len(runs)} runs -> {os.path.join(out, table)}.md/.csv")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
