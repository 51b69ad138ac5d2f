"""Copy the small, text part of finished runs into the repository so tables regenerate from it.

    python scripts/collect_runs.py --runs runs/e30        # -> results/runs/e30/<run id>/...

Copied: metrics.json, metrics.jsonl, run_record*.json, .hydra/{config,overrides}.yaml and the
sweep_*.json files. Never checkpoints or W&B folders. The default destination is named by the
runs' schedule (e<epochs>, -synthetic for synthetic data), whatever the source folder is called.
Runs that came without a sweep file (launched by hand) get one written from their records, for
each of the paper's grids they fill (it says so inside), so make_tables.py can read them."""
import argparse
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn import UserError  # noqa: E402
from mbn.results import REPO, infer_sweeps, load_run, read_json, schedule_name  # noqa: E402

KEEP = ["metrics.json", "metrics.jsonl", "run_record*.json", ".hydra/config.yaml", ".hydra/overrides.yaml"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", default=None, help="default: results/runs/<the runs' schedule, e.g. e30>")
    args = ap.parse_args(argv)
    try:
        return collect(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def collect(args):
    found = (load_run(os.path.dirname(p)) for p in sorted(glob.glob(os.path.join(args.runs, "*", "metrics.json"))))
    finished = [r for r in found if r]  # diverged runs are left out
    if not finished:
        raise UserError(f"no finished runs (run directories with metrics.json) in {args.runs}")
    out = args.out or os.path.join(REPO, "results", "runs", schedule_name(finished))
    if not args.out and os.path.basename(os.path.normpath(args.runs)) != os.path.basename(out):
        print(f"[collect] the runs' schedule names the destination: {out}")
    os.makedirs(out, exist_ok=True)
    sweeps = glob.glob(os.path.join(args.runs, "sweep_*.json"))
    for f in sweeps:
        shutil.copy2(f, out)
    for run in finished:
        src = run["dir"]
        dst = os.path.join(out, os.path.basename(src))
        for pattern in KEEP:
            for f in glob.glob(os.path.join(src, pattern)):
                target = os.path.join(dst, os.path.relpath(f, src))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(f, target)
    print(f"[collect] {len(finished)} finished runs -> {out}")
    if not sweeps:
        for name, sweep in infer_sweeps(out).items():
            path = os.path.join(out, f"sweep_{name}.json")
            if os.path.isfile(path) and not read_json(path).get("inferred"):
                print(f"[collect] {path} exists (written by scripts/sweep.py); left as it is")
                continue
            if os.path.isfile(path):  # an earlier inferred one: keep its seeds and models too
                old = read_json(path)
                sweep["seeds"] = sorted(set(sweep["seeds"]) | set(old["seeds"]))
                if old.get("models") is not None and sweep.get("models") is not None:
                    sweep["models"] = sorted(set(sweep["models"]) | set(old["models"]))
            with open(path, "w") as f:
                json.dump(sweep, f, indent=2)
            print(f"[collect] no sweep file came with the runs: wrote {path} from their records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
