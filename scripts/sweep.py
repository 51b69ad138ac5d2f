"""Run the paper's experiments and the studies that test them.

    python scripts/sweep.py plan [--profile e200] [--runs DIR] [--jobs 8]       # what is done, what is left, how long
    python scripts/sweep.py next --budget 3600 --jobs 8 [--profile e30] [--tables mbn_ablation]   # run what fits
    python scripts/sweep.py table1 [--epochs 200] [--seeds 3] [--jobs 4] [--launcher joblib] [-- overrides]
    python scripts/sweep.py all --epochs 30 --jobs 8 -- data.root=/data
    python scripts/sweep.py mbn_ablation --epochs 30 --seeds 3 --dry-run    # the runs, and their GPU time
    python scripts/sweep.py small_batch --protocol steps|epochs         # 7 normalizers x batch 2..128

`plan` lists every block of the suite in priority order (mbn/plan.py) with its runs' status in
runs/<profile>/ and the GPU time left, estimated from results/bench.md. `next` runs the
highest-priority unfinished runs, N at a time, each stopping at its last epoch boundary before the
budget ends with a checkpoint; the same command continues them (bitwise), a finished run's
checkpoint is deleted, so runs/ can be carried to the next machine. A table name runs that grid,
one Hydra multirun per block (mbn/sweeps.py).

Runs land in runs/<name>/<run id> (name: e<epochs>, or the profile, with the data appended when an
extra override selects data other than the grid's, e.g. e2-synthetic); torch.compile's cache in
runs/compile_cache (--compile-cache). A finished run is skipped and an interrupted one resumed.
Extra overrides after `--` apply to every run and replace a block's value for the same key."""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mbn import UserError, compile_cache  # noqa: E402
from mbn import plan as planner  # noqa: E402
from mbn.cli import ArgumentParser, environment_fault, run, seconds, whole_number, writable_dirs  # noqa: E402
from mbn.results import REPO, merge_overrides, steps_per_epoch_at_128  # noqa: E402
from mbn.sweeps import grids, multirun_overrides  # noqa: E402

ORDER = ["table1", "table6", "figure1", "table5", "table4", "figure2", "table2"]  # `all`: the CIFAR ones
IMAGENET = ["table3"]
STUDIES = ["mbn_ablation", "small_batch"]
PLANNING = ["plan", "next"]
DEFAULT_ROOT = os.path.join(REPO, "runs")


# ------------------------------------------------------------------------------ arguments
def profile(text):
    if not re.fullmatch(r"e[1-9]\d*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: a profile is e<epochs>, e.g. e30 or e200")
    return text


def add_common(ap, jobs_help="runs at once"):
    ap.add_argument("--seeds", type=whole_number(), default=3, help="seeds 0 .. N-1 of every cell (default 3)")
    ap.add_argument("--root", default=DEFAULT_ROOT, help="where runs/<name>/ folders go (default: runs/)")
    ap.add_argument("--jobs", type=whole_number(), default=1, help=jobs_help)
    ap.add_argument("--compile-cache", default=None,
                    help="torch.compile's cache folder for every run (default: $MBN_COMPILE_CACHE, else "
                         "<root>/compile_cache); carry it with the runs for warm starts")
    ap.add_argument("--bench", default=planner.BENCH, help="throughput measurements for the time estimates")
    ap.add_argument("--models", nargs="+", default=None, choices=planner.choices("model"), metavar="MODEL",
                    help="only these models' cells (e.g. the ResNet-20 column of Table 1)")
    ap.add_argument("--norms", nargs="+", default=None, choices=planner.choices("norm"), metavar="NORM",
                    help="only these normalizers' cells")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --)")


def parser_for(command: str):
    if command in PLANNING:
        ap = ArgumentParser(prog=f"sweep.py {command}", description=__doc__)
        ap.add_argument("command", choices=PLANNING)
        ap.add_argument("--profile", type=profile, default="e200",
                        help="the schedule: e200 (the paper's 200 epochs), e30, or any e<epochs>")
        ap.add_argument("--runs", default=None, help="the runs folder (default: <root>/<profile>[-<data>])")
        ap.add_argument("--tables", nargs="+", default=None, choices=planner.table_names(), metavar="TABLE",
                        help=f"only these blocks' tables: {', '.join(planner.table_names())}")
        if command == "next":
            ap.add_argument("--budget", type=seconds, required=True, help="seconds this call may take")
            ap.add_argument("--margin", type=seconds, default=60.0,
                            help="seconds kept free at the end for the last checkpoints and final evaluations "
                                 "(default 60): runs stop at their last epoch boundary before budget - margin")
            ap.add_argument("--dry-run", action="store_true", help="print the plan and the queue only")
        add_common(ap, "runs at once on one GPU (CUDA MPS helps: see the output)")
        return ap
    ap = ArgumentParser(prog="sweep.py", description=__doc__)
    ap.add_argument("table", help=f"plan, next, one of {ORDER + IMAGENET + STUDIES} or 'all' (the paper's CIFAR ones)")
    ap.add_argument("--epochs", type=whole_number(), default=200, help="schedule length (the paper: 200)")
    ap.add_argument("--name", default=None, help="runs/<name>/ (default: e<epochs>[-<data>])")
    ap.add_argument("--launcher", default=None, choices=["basic", "joblib", "slurm"],
                    help="Hydra launcher (default: joblib when --jobs > 1, else basic)")
    ap.add_argument("--protocol", default="steps", choices=["steps", "epochs"],
                    help="small_batch: steps = every batch size gets the batch-128 run's SGD steps at lr 0.1 "
                         "(the paper's Table 4 rule); epochs = the same epochs with lr 0.1 * batch / 128")
    ap.add_argument("--time-limit", type=seconds, default=None,
                    help="seconds for the whole sweep: every run stops at its last epoch boundary before the "
                         "deadline with a checkpoint, runs not started by then are left; rerun to continue")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run counts and GPU time only")
    add_common(ap, "runs at once (joblib launcher)")
    return ap


def check_overrides(overrides, runs=()):
    """Every extra override is key=value and every run's config builds and passes the config's
    declared constraints: a mistake is one line here, not a failure in every run."""
    from mbn.config import config_groups
    from mbn.validate import check_group_overrides, hydra_error, validate

    for o in overrides:
        if "=" not in o:
            raise UserError(f"{o!r} is not a key=value override; options (--x) go before the overrides, "
                            "e.g. sweep.py table1 --seeds 1 -- data.root=/data")
    try:
        check_group_overrides(overrides, config_groups())
    except UserError as e:
        raise UserError(f"the extra overrides: {e}") from None
    for overrides_of_run in list(runs)[:1] or [list(overrides)]:
        try:
            cfg = planner.cell_config(overrides_of_run)
        except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors: an unknown key, a bad value
            err = hydra_error(e)
            if err is None:
                raise
            raise UserError(f"the extra overrides: {err}") from None
        validate(cfg)


def bench_of(args) -> planner.Bench:
    if args.bench != planner.BENCH and not os.path.isfile(args.bench):
        raise UserError(f"--bench {args.bench}: no such file (results/bench.md is written by scripts/gpu_check.py)")
    return planner.Bench(args.bench)


def cache_dir(args, root: str) -> str:
    return args.compile_cache or compile_cache.resolve() or os.path.join(root, "compile_cache")


ARGV = []  # this command's arguments (main)


def this_command(*replace_first) -> str:
    """The command line that repeats this one (what 'rerun to continue' means); `replace_first`:
    other words in place of `plan` (next --budget SECONDS)."""
    args = list(ARGV)
    if replace_first:
        i = args.index("plan")
        args[i:i + 1] = replace_first
    return "python " + shlex.join([os.path.relpath(os.path.abspath(__file__)), *args])


def start_mps(jobs: int) -> None:
    """Several runs share one GPU far better under CUDA MPS (measured on an H100: 2.3-2.8x one
    run's throughput with 4-8 runs, 1.5x without): start it, or say that it is not running."""
    if jobs < 2 or shutil.which("nvidia-smi") is None:
        return
    pipe = os.environ.setdefault("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    if os.path.exists(os.path.join(pipe, "control")):
        print(f"[sweep] CUDA MPS is running (pipe directory {pipe})")
        return
    why = "nvidia-cuda-mps-control is not installed"
    if shutil.which("nvidia-cuda-mps-control"):
        os.environ.setdefault("CUDA_MPS_LOG_DIRECTORY", "/tmp/nvidia-mps-log")
        try:
            os.makedirs(pipe, exist_ok=True)
            os.makedirs(os.environ["CUDA_MPS_LOG_DIRECTORY"], exist_ok=True)
            r = subprocess.run(["nvidia-cuda-mps-control", "-d"], capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                print(f"[sweep] CUDA MPS started (pipe directory {pipe}; stop it with "
                      "`echo quit | nvidia-cuda-mps-control`)")
                return
            why = (r.stderr or r.stdout).strip() or f"exit {r.returncode}"
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
    print(f"[sweep] CUDA MPS is not running ({why}): {jobs} runs share the GPU without it, at about 1.5x one "
          "run's throughput instead of 2.3-2.8x. Start it with `nvidia-cuda-mps-control -d` (as the user who runs "
          "the jobs; CUDA_MPS_PIPE_DIRECTORY for a private pipe), then rerun")


# ------------------------------------------------------------------------------ plan and next
def build_plan(args):
    epochs = int(args.profile[1:])
    runs_dir = os.path.abspath(args.runs or os.path.join(args.root, planner.default_name(epochs, args.overrides)))
    if os.path.exists(runs_dir) and not os.path.isdir(runs_dir):
        raise UserError(f"{'--runs' if args.runs else '--root'}: {runs_dir} is a file, not a runs folder")
    check_overrides(args.overrides)
    plan = planner.build(runs_dir, epochs, range(args.seeds), args.overrides, planner.expand_tables(args.tables),
                         args.models, args.norms, bench_of(args))
    return plan


def cmd_plan(args) -> int:
    plan = build_plan(args)
    if not os.path.isdir(plan.runs_dir):
        print(f"({plan.runs_dir} does not exist yet: nothing has run there)")
    print(planner.render(plan, args.jobs))
    print("\nRun what fits into a time budget: " + this_command("next", "--budget", "SECONDS"))
    return 0


class Job:
    """One train.py process of `next`, in its own session (so stopping it stops its compile workers)."""

    def __init__(self, cmd, log_path, env):
        self.log = open(log_path, "a")
        self.log.write(f"\n$ {shlex.join(cmd)}\n")
        self.log.flush()
        self.popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def poll(self):
        rc = self.popen.poll()
        if rc is not None and not self.log.closed:
            self.log.close()
        return rc

    def stop(self, sig):
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:  # ended meanwhile
            pass


def outcome_status(o: planner.Outcome) -> str:
    """What a run of this call left behind: finished, partial, diverged, failed or not started."""
    from mbn.results import load_run

    if not o.started:
        return "not started"
    found = load_run(o.run.dir) if os.path.isdir(o.run.dir) else None
    status = found["status"] if found else planner.MISSING
    if status in (planner.FINISHED, planner.DIVERGED):
        return status
    if os.path.isfile(os.path.join(o.run.dir, planner.CHECKPOINT)) and (o.stopped or o.returncode in (0, 75)):
        return planner.PARTIAL
    return "failed"


def log_tail(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.rstrip() for line in f if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def cmd_next(args) -> int:
    t0 = time.time()
    if args.margin >= args.budget:
        raise UserError(f"--margin {args.margin:g} leaves nothing of --budget {args.budget:g} (runs stop "
                        "--margin seconds before the budget ends); give a larger --budget or a smaller --margin")
    plan = build_plan(args)
    queue = [r for r in plan.unique() if r.status in (planner.PARTIAL, planner.MISSING)]
    # checked before anything is written or deleted: a refused command, or a dry run, changes nothing
    check_overrides(args.overrides, [queue[0].overrides] if queue else [])
    print(planner.render(plan, args.jobs))
    deadline, hard_end = t0 + args.budget - args.margin, t0 + args.budget
    print(f"\n[next] budget {planner.duration(args.budget)}: runs stop at their last epoch boundary before "
          f"{time.strftime('%H:%M:%S', time.localtime(deadline))}, {args.jobs} at a time; "
          f"{len(queue)} unfinished run(s) in priority order")
    if args.dry_run:
        for r in queue:
            print(f"  {r.run_id} ({r.table}, {r.status}"
                  + (f", epoch {r.epochs_done}/{r.epochs}" if r.status == planner.PARTIAL else "")
                  + f"): {planner.duration(r.seconds_left(args.jobs, plan.bench))}")
        return 0
    runs_key = "--runs" if args.runs else "--root"
    runs_dir, _, cache = writable_dirs((runs_key, plan.runs_dir), (runs_key, os.path.join(plan.runs_dir, "logs")),
                                    ("--compile-cache", cache_dir(args, os.path.dirname(os.path.abspath(plan.runs_dir)))))
    compile_cache.use(cache, key="--compile-cache")
    removed = planner.drop_checkpoints(plan.unique(), runs_dir)
    if removed:
        print(f"[next] deleted the checkpoints of {len(removed)} finished run(s) (their metrics.json stays)")
    name = os.path.basename(runs_dir)
    for table in sorted({grids(plan.epochs, plan.steps_per_epoch_at_128)[b.step.table].sweep for b in plan.blocks}):
        write_sweep(runs_dir, plan.sweep_file(table))
    start_mps(args.jobs)
    logs = os.path.join(runs_dir, "logs")
    env = dict(os.environ, MBN_DEADLINE=repr(deadline))
    defaults = [f"name={name}", "train.progress=false", f"perf.compile_cache={cache}"]

    def start(r):
        left = r.seconds_left(args.jobs, plan.bench)
        print(f"[next] start {r.run_id} ({r.table}" + (f", from epoch {r.epochs_done}" if r.epochs_done else "")
              + (f"; about {planner.duration(left)}" if left is not None else "; no estimate") + ")", flush=True)
        cmd = [sys.executable, os.path.join(REPO, "train.py"),
               *merge_overrides(defaults, r.overrides + [f"seed={r.seed}"]), f"hydra.run.dir={r.dir}"]
        return Job(cmd, os.path.join(logs, f"{r.run_id}.log"), env)

    outcomes = planner.execute(queue, args.jobs, deadline, hard_end, start,
                               lambda r: r.first_epoch_s(args.jobs, plan.bench))
    by = {}
    for o in outcomes:
        status = outcome_status(o)
        by.setdefault(status, []).append(o)
        if status == planner.FINISHED:
            o.run.status = planner.FINISHED
            planner.drop_checkpoints([o.run], runs_dir)
    print("\n[next] this call:", ", ".join(f"{len(v)} {k}" for k, v in by.items()) or "nothing to run")
    for o in by.get(planner.FINISHED, []):
        print(f"  finished: {o.run.run_id}")
    for o in by.get(planner.PARTIAL, []):
        done = planner.epochs_done(o.run.dir)
        print(f"  partial:  {o.run.run_id} (epoch {done}/{o.run.epochs}; continues on the next call)")
    for o in by.get(planner.DIVERGED, []):
        print(f"  diverged: {o.run.run_id} (counted as such in its table)")
    for o in by.get("failed", []):
        log = os.path.join(logs, f"{o.run.run_id}.log")
        print(f"  failed:   {o.run.run_id} (exit {o.returncode}; {log}: {log_tail(log)})")
    if by.get("not started"):
        print(f"  not started: {len(by['not started'])} (no time left for their first epoch)")
    print(f"[next] {runs_dir}: {planner.size_text(planner.folder_size(runs_dir))}; compile cache {cache}: "
          f"{planner.size_text(planner.folder_size(cache))}. Carry both to the next machine, then continue with: "
          f"{this_command()}")
    return 1 if by.get("failed") else 0


def write_sweep(runs_dir: str, sweep: dict) -> None:
    """sweep_<table>.json, for the tables: the seeds of an earlier sweep of the same schedule and
    overrides are kept (the union), another schedule's file is replaced."""
    path = os.path.join(runs_dir, f"sweep_{sweep['table']}.json")
    try:
        with open(path) as f:
            old = json.load(f)
        if old.get("epochs") == sweep["epochs"] and old.get("extra") == sweep["extra"]:
            sweep = dict(sweep, seeds=sorted(set(sweep["seeds"]) | set(old.get("seeds") or [])))
    except (OSError, ValueError):
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(sweep, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        raise environment_fault(e, "writing") from None


# ------------------------------------------------------------------------------ one table
def cmd_table(args) -> int:
    tables = ORDER if args.table == "all" else [args.table]
    if any(t not in ORDER + IMAGENET + STUDIES for t in tables):
        raise UserError(f"unknown table {args.table!r}; choose plan, next, one of "
                        f"{', '.join(ORDER + IMAGENET + STUDIES)} or all")
    check_overrides(args.overrides)
    tables = [f"small_batch_{args.protocol}" if t == "small_batch" else t for t in tables]
    name = args.name or planner.default_name(args.epochs, args.overrides)
    seeds = list(range(args.seeds))
    per_epoch = steps_per_epoch_at_128(args.overrides)
    all_grids = grids(args.epochs, per_epoch)
    planner.check_restriction([all_grids[t] for t in tables], args.models, args.norms)
    have = set(planner.choices("norm"))
    launcher = args.launcher or ("joblib" if args.jobs > 1 else "basic")
    launch = {"basic": [], "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"],
              "slurm": ["hydra/launcher=slurm"]}[launcher]
    root = os.path.abspath(os.path.join(args.root, name))
    bench = bench_of(args)
    env = dict(os.environ)
    _, cache = writable_dirs(("--root", root), ("--compile-cache", cache_dir(args, os.path.dirname(root))),
                             make=not args.dry_run)  # a dry run says what the run would refuse
    if not args.dry_run:
        compile_cache.use(cache, key="--compile-cache")
        env = dict(os.environ)
        start_mps(args.jobs)
        if args.time_limit:
            env["MBN_DEADLINE"] = repr(time.time() + args.time_limit)  # an absolute time every job reads
    else:
        print(bench.describe(args.jobs))
    failed, total = [], []
    for table in tables:
        grid = all_grids[table]
        sweep = {"table": table, "epochs": args.epochs, "seeds": seeds, "extra": args.overrides,
                 "models": args.models, "norms": args.norms, "steps_per_epoch_at_128": per_epoch}
        if not args.dry_run:
            write_sweep(root, sweep)
        for block in grid.blocks:
            block = planner.restrict(planner.restrict(block, "model", args.models), "norm", args.norms)
            if block and "norm" in block and set(block["norm"]) - have:
                print(f"[sweep] {table}: no configs/norm/ for {sorted(set(block['norm']) - have)} in this checkout; "
                      "their cells are skipped")
                block = planner.restrict(block, "norm", have)
            if not block:
                continue
            block_overrides = merge_overrides(multirun_overrides(block), args.overrides)
            cmd = [sys.executable, os.path.join(REPO, "train.py"), "-m", *block_overrides,
                   f"seed={','.join(map(str, seeds))}", f"train.epochs={args.epochs}", f"name={name}",
                   f"hydra.sweep.dir={root}", "train.progress=false", f"perf.compile_cache={cache}", *launch]
            print("[sweep]", shlex.join(cmd[1:]), flush=True)
            if args.dry_run:
                runs, bad = planner.cell_runs(table, block, args.epochs, seeds, args.overrides, root, bench)
                total += runs
                print(f"        {len(runs)} runs; GPU time {planner.gpu_time_text(runs, args.jobs, bench)}"
                      + (f"; cannot be built here: {'; '.join(bad)}" if bad else ""))
                continue
            r = subprocess.run(cmd, cwd=REPO, env=env)
            if r.returncode != 0:  # the other blocks still run
                failed.append(f"{table}: {' '.join(multirun_overrides(block))}")
                print(f"[sweep] {table}: a run of this block failed (exit {r.returncode})")
    if args.dry_run:
        print(f"[sweep] {len(total)} runs in all; GPU time {planner.gpu_time_text(total, args.jobs, bench)}")
    if args.time_limit and not args.dry_run and time.time() > float(env["MBN_DEADLINE"]):
        print(f"[sweep] the time limit was reached; continue with: {this_command()}")
    if failed:
        print(f"[sweep] {len(failed)} block(s) failed: {'; '.join(failed)}. "
              f"Continue them with: {this_command()} (finished runs are skipped)")
        return 1
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ARGV[:] = argv
    command = argv[0] if argv and not argv[0].startswith("-") else next((a for a in argv if a in PLANNING), "")
    ap = parser_for(command)
    args = ap.parse_intermixed_args(argv)
    if command == "plan":
        return cmd_plan(args)
    if command == "next":
        return cmd_next(args)
    return cmd_table(args)


if __name__ == "__main__":
    run(main, on_interrupt="rerun the same command to continue (finished runs are skipped, partial ones resume)")
