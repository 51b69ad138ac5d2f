"""Copy the small, text part of finished (and diverged) runs into the repository so tables
regenerate from it.

    python scripts/collect_runs.py --runs runs/e30        # -> results/runs/e30/<run id>/...

Copied: metrics.json, metrics.jsonl, run_record*.json, .hydra/{config,overrides}.yaml and the
sweep_*.json files. Never checkpoints or W&B folders; runs still going (or stopped early) are left
for later, damaged ones named and skipped. Each schedule's runs go to their own folder,
results/runs/e<epochs>[-synthetic], whatever the source folder is called; --out names the folder
for runs of one schedule. Runs that came without a sweep file (launched by hand) get one written
from their records, for each of the paper's grids they fill (it says so inside), so
make_tables.py can read them."""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn import UserError  # noqa: E402
from mbn.cli import ArgumentParser, existing_dir, run  # noqa: E402
from mbn.results import (IN_TABLES, REPO, DamagedFile, by_schedule, copy_atomic, infer_sweeps, is_synthetic,  # noqa: E402
                         load_run, profile_name, read_json, read_sweep, warn, write_atomic)

KEEP = ["metrics.json", "metrics.jsonl", "run_record*.json", ".hydra/config.yaml", ".hydra/overrides.yaml"]


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--runs", required=True, help="a folder of run directories (and sweep_*.json)")
    ap.add_argument("--out", default=None, help="destination for runs of one schedule "
                                                "(default: results/runs/<their schedule>, e.g. e30)")
    args = ap.parse_args(argv)
    existing_dir(args.runs)
    found = [load_run(d) for d in sorted(glob.glob(os.path.join(args.runs, "*", "")))]
    runs = [r for r in found if r and r["status"] in IN_TABLES]
    left = sum(1 for r in found if r and r["status"] not in IN_TABLES)
    if not runs:
        raise UserError(f"no finished runs (run directories with metrics.json) in {args.runs}")
    groups = by_schedule(runs)
    if args.out and len(groups) > 1:
        raise UserError(f"the runs in {args.runs} have {len(groups)} schedules ({', '.join(sorted(groups))}) and "
                        "--out takes one; leave --out out to collect each schedule into results/runs/<schedule>")
    sweeps = {}
    for path in sorted(glob.glob(os.path.join(args.runs, "sweep_*.json"))):
        try:
            sweep = read_sweep(path)
        except DamagedFile as e:
            warn(f"{e}; not copied")
            continue
        sweeps.setdefault(profile_name(sweep["epochs"], is_synthetic(sweep, [])), []).append(path)
    for name, group in sorted(groups.items()):
        out = args.out or os.path.join(REPO, "results", "runs", name)
        if not args.out and os.path.basename(os.path.normpath(args.runs)) != name:
            print(f"[collect] the runs' schedule names the destination: {out}")
        collect(group, sweeps.get(name, []), out)
    if left:
        print(f"[collect] {left} runs not finished yet (stopped, preempted or running) left in {args.runs}")
    return 0


def collect(runs, sweeps, out):
    """Copy one schedule's runs and sweep files to `out`; infer sweep files where none came."""
    os.makedirs(out, exist_ok=True)
    for f in sweeps:
        copy_atomic(f, os.path.join(out, os.path.basename(f)))
    for r in runs:
        for pattern in KEEP:
            for f in glob.glob(os.path.join(r["dir"], pattern)):
                target = os.path.join(out, r["name"], os.path.relpath(f, r["dir"]))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                copy_atomic(f, target)
    diverged = sum(r["status"] != "finished" for r in runs)
    print(f"[collect] {len(runs)} runs ({diverged} diverged) -> {out}" if diverged
          else f"[collect] {len(runs)} finished runs -> {out}")
    if sweeps:
        return
    for name, sweep in infer_sweeps(out).items():
        path = os.path.join(out, f"sweep_{name}.json")
        try:
            old = read_json(path) if os.path.isfile(path) else None
        except DamagedFile as e:
            warn(f"{e}; written anew")
            old = None
        if old is not None and not old.get("inferred"):
            print(f"[collect] {path} exists (written by scripts/sweep.py); left as it is")
            continue
        if old is not None:  # an earlier inferred one: keep its seeds and models too
            sweep["seeds"] = sorted(set(sweep["seeds"]) | set(old.get("seeds", [])))
            if old.get("models") is not None and sweep.get("models") is not None:
                sweep["models"] = sorted(set(sweep["models"]) | set(old["models"]))
        write_atomic(path, json.dumps(sweep, indent=2))
        print(f"[collect] no sweep file came with the runs: wrote {path} from their records")


if __name__ == "__main__":
    run(main)
