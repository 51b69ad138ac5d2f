"""Run the paper's experiments: one Hydra multirun per block of a table's grid.

    python scripts/sweep.py table1 [--epochs 200] [--seeds 3] [--jobs 4] [--launcher joblib] [-- overrides]
    python scripts/sweep.py all --epochs 30 --jobs 8 -- data.root=/data

Runs land in runs/<name>/<run id> (name defaults to e<epochs>); a finished run is skipped and an
interrupted one resumed, so the same command continues a sweep. Extra overrides after `--`
apply to every run and replace a block's value for the same key (e.g. data=synthetic)."""
import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn.results import REPO, compose, merge_overrides  # noqa: E402
from mbn.sweeps import grids, multirun_overrides  # noqa: E402

ORDER = ["table1", "table6", "figure1", "table5", "table4", "figure2", "table2"]  # `all`: the CIFAR ones
IMAGENET = ["table3"]


def start_mps() -> None:
    """Several trainings share one GPU far better under CUDA MPS (measured on an H100: 2.3-2.7x
    one run's throughput with 4-8 runs, 1.5x without)."""
    if shutil.which("nvidia-cuda-mps-control") is None or shutil.which("nvidia-smi") is None:
        return
    pipe = os.environ.setdefault("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    os.environ.setdefault("CUDA_MPS_LOG_DIRECTORY", "/tmp/nvidia-mps-log")
    os.makedirs(pipe, exist_ok=True)
    os.makedirs(os.environ["CUDA_MPS_LOG_DIRECTORY"], exist_ok=True)
    r = subprocess.run(["nvidia-cuda-mps-control", "-d"], capture_output=True, text=True)
    state = "started" if r.returncode == 0 else f"not started ({(r.stderr or r.stdout).strip() or 'already running?'})"
    print(f"[sweep] CUDA MPS {state}; pipe directory {pipe}")


def steps_per_epoch_at_128(extra) -> int:
    cfg = compose(merge_overrides([], extra))
    n = cfg.data.train_size if cfg.data.name == "synthetic" else 50_000
    return max(1, n // 128)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help=f"one of {ORDER + IMAGENET} or 'all' (the CIFAR ones)")
    ap.add_argument("--epochs", type=int, default=200, help="schedule length (the paper: 200)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--name", default=None, help="runs/<name>/ (default: e<epochs>)")
    ap.add_argument("--root", default=os.path.join(REPO, "runs"), help="where run directories go")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (joblib launcher)")
    ap.add_argument("--launcher", default=None, choices=["basic", "joblib", "slurm"],
                    help="Hydra launcher (default: joblib when --jobs > 1, else basic)")
    ap.add_argument("--models", nargs="+", default=None,
                    help="run only these models' cells (e.g. the ResNet-20 column of Table 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_intermixed_args(argv)
    tables = ORDER if args.table == "all" else [args.table]
    if any(t not in ORDER + IMAGENET for t in tables):
        ap.error(f"unknown table {args.table!r}; choose one of {ORDER + IMAGENET} or all")
    name = args.name or f"e{args.epochs}"
    seeds = list(range(args.seeds))
    all_grids = grids(args.epochs, steps_per_epoch_at_128(args.overrides))
    launcher = args.launcher or ("joblib" if args.jobs > 1 else "basic")
    launch = {"basic": [], "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"],
              "slurm": ["hydra/launcher=slurm"]}[launcher]
    root = os.path.abspath(os.path.join(args.root, name))
    if not args.dry_run:
        os.makedirs(root, exist_ok=True)
        if args.jobs > 1:
            start_mps()
    for table in tables:
        grid = all_grids[table]
        sweep = {"table": table, "epochs": args.epochs, "seeds": seeds, "extra": args.overrides,
                 "models": args.models}
        if not args.dry_run:
            with open(os.path.join(root, f"sweep_{table}.json"), "w") as f:
                json.dump(sweep, f, indent=2)
        for block in grid.blocks:
            if args.models:
                block = dict(block, model=[m for m in block["model"] if m in args.models])
                if not block["model"]:
                    continue
            block_overrides = merge_overrides(multirun_overrides(block), args.overrides)
            cmd = [sys.executable, os.path.join(REPO, "train.py"), "-m", *block_overrides,
                   f"seed={','.join(map(str, seeds))}", f"train.epochs={args.epochs}", f"name={name}",
                   f"hydra.sweep.dir={root}", "train.progress=false", *launch]
            print("[sweep]", " ".join(cmd[1:]), flush=True)
            if not args.dry_run:
                r = subprocess.run(cmd, cwd=REPO)
                if r.returncode != 0:
                    print(f"[sweep] {table}: a run failed (exit {r.returncode}); rerun the same command to continue")
                    return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
