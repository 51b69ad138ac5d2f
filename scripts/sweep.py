"""Run the paper's experiments and the studies that test them: one Hydra multirun per block of a
grid (mbn/sweeps.py).

    python scripts/sweep.py table1 [--epochs 200] [--seeds 3] [--jobs 4] [--launcher joblib] [-- overrides]
    python scripts/sweep.py all --epochs 30 --jobs 8 -- data.root=/data
    python scripts/sweep.py mbn_ablation --epochs 30 --seeds 3          # MBN options, each paired with BN-1
    python scripts/sweep.py small_batch --protocol steps|epochs         # 7 normalizers x batch 2..128

Runs land in runs/<name>/<run id>; the name defaults to e<epochs>, with the data appended when an
extra override selects data other than the grid's (e.g. e2-synthetic). A finished run is skipped
and an interrupted one resumed, so the same command continues a sweep. Extra overrides after `--`
apply to every run and replace a block's value for the same key (e.g. data=synthetic)."""
import argparse
import json
import os
import shutil
import subprocess
import time
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn.results import REPO, merge_overrides, steps_per_epoch_at_128  # noqa: E402
from mbn.sweeps import grids, multirun_overrides  # noqa: E402

ORDER = ["table1", "table6", "figure1", "table5", "table4", "figure2", "table2"]  # `all`: the CIFAR ones
IMAGENET = ["table3"]
STUDIES = ["mbn_ablation", "small_batch"]


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


def default_name(epochs: int, extra) -> str:
    """e<epochs>, plus the data when an extra override replaces the grids' (e2-synthetic)."""
    data = [o.split("=", 1)[1] for o in extra if o.split("=", 1)[0] == "data"]
    return f"e{epochs}" + "".join(f"-{d}" for d in data if d != "cifar10")


def available_norms() -> set:
    return {f[:-5] for f in os.listdir(os.path.join(REPO, "configs", "norm")) if f.endswith(".yaml")}


def restrict(block, key, wanted):
    """The block with `key` limited to `wanted` (None: unchanged); None when nothing is left."""
    if wanted is None or key not in block:
        return block
    block = dict(block, **{key: [v for v in block[key] if v in wanted]})
    return block if block[key] else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", help=f"one of {ORDER + IMAGENET + STUDIES} or 'all' (the paper's CIFAR ones)")
    ap.add_argument("--epochs", type=int, default=200, help="schedule length (the paper: 200)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--name", default=None, help="runs/<name>/ (default: e<epochs>[-<data>])")
    ap.add_argument("--root", default=os.path.join(REPO, "runs"), help="where run directories go")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (joblib launcher)")
    ap.add_argument("--launcher", default=None, choices=["basic", "joblib", "slurm"],
                    help="Hydra launcher (default: joblib when --jobs > 1, else basic)")
    ap.add_argument("--models", nargs="+", default=None,
                    help="run only these models' cells (e.g. the ResNet-20 column of Table 1)")
    ap.add_argument("--norms", nargs="+", default=None, help="run only these normalizers' cells")
    ap.add_argument("--protocol", default="steps", choices=["steps", "epochs"],
                    help="small_batch: steps = every batch size gets the batch-128 run's SGD steps at lr 0.1 "
                         "(the paper's Table 4 rule); epochs = the same epochs with lr 0.1 * batch / 128")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds for the whole sweep: every run stops at its last epoch boundary before the "
                         "deadline with a checkpoint, runs not started by then are left; rerun to continue")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_intermixed_args(argv)
    tables = ORDER if args.table == "all" else [args.table]
    if any(t not in ORDER + IMAGENET + STUDIES for t in tables):
        ap.error(f"unknown table {args.table!r}; choose one of {ORDER + IMAGENET + STUDIES} or all")
    tables = [f"small_batch_{args.protocol}" if t == "small_batch" else t for t in tables]
    name = args.name or default_name(args.epochs, args.overrides)
    seeds = list(range(args.seeds))
    per_epoch = steps_per_epoch_at_128(args.overrides)
    all_grids = grids(args.epochs, per_epoch)
    have = available_norms()
    launcher = args.launcher or ("joblib" if args.jobs > 1 else "basic")
    launch = {"basic": [], "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"],
              "slurm": ["hydra/launcher=slurm"]}[launcher]
    root = os.path.abspath(os.path.join(args.root, name))
    if not args.dry_run:
        os.makedirs(root, exist_ok=True)
        if args.jobs > 1:
            start_mps()
    env = dict(os.environ)
    if args.time_limit:
        env["MBN_DEADLINE"] = str(time.time() + args.time_limit)  # an absolute time every job reads
    failed, noted = [], set()
    for table in tables:
        grid = all_grids[table]
        sweep = {"table": table, "epochs": args.epochs, "seeds": seeds, "extra": args.overrides,
                 "models": args.models, "norms": args.norms, "steps_per_epoch_at_128": per_epoch}
        if not args.dry_run:
            with open(os.path.join(root, f"sweep_{table}.json"), "w") as f:
                json.dump(sweep, f, indent=2)
        for block in grid.blocks:
            block = restrict(restrict(block, "model", args.models), "norm", args.norms)
            if block and "norm" in block and set(block["norm"]) - have:
                lacking = sorted(set(block["norm"]) - have)
                if table not in noted:
                    noted.add(table)
                    print(f"[sweep] {table}: no configs/norm/ for {lacking} in this checkout; their cells are skipped")
                block = restrict(block, "norm", have)
            if not block:
                continue
            block_overrides = merge_overrides(multirun_overrides(block), args.overrides)
            cmd = [sys.executable, os.path.join(REPO, "train.py"), "-m", *block_overrides,
                   f"seed={','.join(map(str, seeds))}", f"train.epochs={args.epochs}", f"name={name}",
                   f"hydra.sweep.dir={root}", "train.progress=false", *launch]
            print("[sweep]", " ".join(cmd[1:]), flush=True)
            if not args.dry_run:
                r = subprocess.run(cmd, cwd=REPO, env=env)
                if r.returncode != 0:  # the other blocks still run (e.g. an option this checkout lacks)
                    failed.append(f"{table}: {' '.join(multirun_overrides(block))}")
                    print(f"[sweep] {table}: a run of this block failed (exit {r.returncode})")
    if args.time_limit and time.time() > float(env["MBN_DEADLINE"]):
        print("[sweep] the time limit was reached; rerun the same command to continue")
    if failed:
        print(f"[sweep] {len(failed)} block(s) failed: {'; '.join(failed)}. "
              "Rerun the same command to continue them (finished runs are skipped)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
