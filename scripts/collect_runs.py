"""Copy the small, text part of finished runs into the repository so tables regenerate from it.

    python scripts/collect_runs.py --runs runs/e30        # -> results/runs/e30/<run id>/...

Copied: metrics.json, metrics.jsonl, run_record*.json, .hydra/{config,overrides}.yaml and the
sweep_*.json files. Never checkpoints or W&B folders."""
import argparse
import glob
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = ["metrics.json", "metrics.jsonl", "run_record*.json", ".hydra/config.yaml", ".hydra/overrides.yaml"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", default=None, help="default: results/runs/<basename of --runs>")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(REPO, "results", "runs", os.path.basename(os.path.normpath(args.runs)))
    os.makedirs(out, exist_ok=True)
    for f in glob.glob(os.path.join(args.runs, "sweep_*.json")):
        shutil.copy2(f, out)
    copied = 0
    for run in sorted(glob.glob(os.path.join(args.runs, "*", "metrics.json"))):
        src = os.path.dirname(run)
        dst = os.path.join(out, os.path.basename(src))
        for pattern in KEEP:
            for f in glob.glob(os.path.join(src, pattern)):
                target = os.path.join(dst, os.path.relpath(f, src))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(f, target)
        copied += 1
    print(f"[collect] {copied} finished runs -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
