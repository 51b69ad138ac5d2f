"""Every GPU path of the framework, end to end, in one script that an H100 runs in about 8 minutes.

    python scripts/gpu_check.py --data-root /path/to/cifar      # on a GPU machine
    python scripts/gpu_check.py --dry                           # a CPU rehearsal at toy sizes

Each configuration runs in its own subprocess with a timeout, so one crash never hides the rest;
a failure is reported with its name and the tail of its traceback, and the exit status is 1.
Phases:
1. correct  — for every normalizer, single and double forward: 12 steps across lr milestones with
              the step replayed as a CUDA graph equal the eager step (fp32, deterministic cuDNN),
              one capture per lr value, and the captured evaluation equals the eager one.
2. bench    — scripts/bench.py configurations (a)-(f) for ResNet-56 at batch 128 and 8, and (a), (b),
              (d), (f) for ResNet-20 at batch 128, with (g) and (h): 8 seeds of BN-1 and MBN-2 stacked
              into one process (grouped convolutions, mbn/stacked.py); processes compile in parallel,
              time one at a time.
3. packed   — 8 concurrent ResNet-20 BN-1 processes (CUDA MPS if it starts) against one, and against
              the 8 seeds stacked in one process of (g): keep stacking only if it wins.
4. train    — `train.py model=resnet20 norm=mbn train.epochs=3` on real CIFAR-10 (--data-root),
              per-epoch img/s and test error.
Writes one JSON line per measurement to stdout and <out>/gpu_check.jsonl, and results/bench.md.
Every process compiles into one torch.compile cache (--compile-cache; default $MBN_COMPILE_CACHE,
else runs/compile_cache, mbn/compile_cache.py), so a second check, or the sweeps after it, start warm."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PHASES = ["correct", "bench", "packed", "train"]
BENCH_MD = os.path.join(REPO, "results", "bench.md")  # read by mbn/plan.py for its GPU-time estimates
PACKED_N = {False: 8, True: 2}  # (not dry, dry): concurrent processes of the packed phase = seeds stacked by (g), (h)


# ------------------------------------------------------------------------ inside a subprocess
def correct(norm: str, double: bool, dry: bool) -> dict:
    """Graph replay vs eager for one normalizer: final state, loss sums and evaluation."""
    import torch

    from mbn.engine import Run
    from mbn.results import compose

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    device = torch.device("cpu" if dry else "cuda")
    model = "nin" if norm == "normprop" else "resnet20"
    overrides = [f"model={model}", f"norm={norm}", "data=synthetic", f"data.train_size={32 if dry else 96}",
                 "data.test_size=100", f"train.batch_size={8 if dry else 16}", "train.steps=12", "train.eval_batch_size=32", f"train.double_forward={double}",
                 "optim.lr=0.02", "perf.precision=fp32", "perf.compile=false", "perf.channels_last=false",
                 f"device={device}"]
    results = {}
    for graph in ([False] if dry else [False, True]):
        torch.manual_seed(0)
        run = Run(compose(overrides + [f"perf.cuda_graph={graph}"]), device)
        total = 2 * run.per_epoch
        for epoch in range(2):
            run.train_batches.start_epoch(epoch)
            for i in range(run.per_epoch):
                run.schedule(epoch * run.per_epoch + i)
                run.step()
        test = run.evaluate(key="default")
        state = {k: v.detach().double().cpu() for k, v in run.model.state_dict().items() if v.is_floating_point()}
        results[graph] = (state, run.step.loss_sum.item(), test, run.step.replay.captures, total)
    if dry:
        return {"ok": True, "note": "dry: eager only"}
    (a, la, ta, _, total), (b, lb, tb, captures, _) = results[False], results[True]
    diff = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-6)).item() for k in a)
    lrs = 3  # 12 steps across milestones 0.4 and 0.6: three lr values, the first partly in warm-up
    ok = diff < 1e-4 and abs(la - lb) <= 1e-4 * abs(la) and abs(ta["err"] - tb["err"]) < 1e-6 and captures <= lrs
    return {"ok": ok, "max_rel_state_diff": diff, "loss_sum": [la, lb], "test_err": [ta["err"], tb["err"]],
            "captures": captures, "steps": total}


def packed_worker(batch: int, steps: int, barrier_dir: str, n: int, dry: bool) -> dict:
    """One of n concurrent trainings: warm up, wait for all, then time `steps` steps."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from bench import build

    device = torch.device("cpu" if dry else "cuda")
    step, _ = build("b", "resnet20", batch, device, 32, ("perf.compile=false",) if dry else ())
    for _ in range(3 if dry else 30):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    open(os.path.join(barrier_dir, f"ready{os.getpid()}"), "w").close()
    deadline = time.time() + 120
    while len(os.listdir(barrier_dir)) < n and time.time() < deadline:
        time.sleep(0.01)
    t0 = time.time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"ok": True, "start": t0, "end": time.time(), "images": batch * steps}


def child(spec: dict) -> dict:
    if spec["kind"] == "correct":
        return correct(spec["norm"], spec["double"], spec["dry"])
    if spec["kind"] == "bench":
        import torch

        sys.path.insert(0, os.path.join(REPO, "scripts"))
        from bench import measure

        device = torch.device("cpu" if spec["dry"] else "cuda")
        extra = ("perf.compile=false",) if spec["dry"] else ()
        return {"ok": True, **measure(spec["key"], spec["model"], spec["batch"], spec["steps"], spec["warmup"],
                                      device, extra=extra, seeds=spec.get("seeds", 8))}
    if spec["kind"] == "packed":
        return packed_worker(spec["batch"], spec["steps"], spec["barrier"], spec["n"], spec["dry"])
    raise ValueError(spec["kind"])


# ------------------------------------------------------------------------------ orchestration
class Check:
    def __init__(self, out_dir: str, dry: bool, budget: float):
        self.out_dir, self.dry, self.deadline = out_dir, dry, time.time() + budget
        self.rows, self.failures = [], []
        os.makedirs(out_dir, exist_ok=True)
        self.log = open(os.path.join(out_dir, "gpu_check.jsonl"), "w")

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        line = json.dumps(row, default=str)
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()
        if not row.get("ok", False):
            self.failures.append(row)

    def run(self, specs, timeout: float, env=None, parallel: int = 16):
        """Run child specs as subprocesses, `parallel` at a time; one JSON row each."""
        pending, running, results = list(specs), [], []
        while pending or running:
            while pending and len(running) < parallel:
                spec = pending.pop(0)
                cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
                log = tempfile.TemporaryFile(mode="w+")
                running.append((spec, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                                       env=env or os.environ.copy(), cwd=REPO), log, time.time()))
            for item in list(running):
                spec, proc, log, started = item
                over = time.time() - started > timeout or time.time() > self.deadline
                if proc.poll() is None and not over:
                    continue
                if proc.poll() is None:
                    proc.kill()
                out = proc.communicate()[0]
                log.seek(0)
                err = log.read()
                running.remove(item)
                name = spec["name"]
                try:
                    row = {"name": name, **json.loads(out.strip().splitlines()[-1])}
                except (ValueError, IndexError):
                    why = "timed out" if over else f"exit {proc.returncode}"
                    row = {"name": name, "ok": False, "error": why, "traceback_tail": err.strip().splitlines()[-12:]}
                results.append(row)
                self.emit(row)
            time.sleep(0.05)
        return results


def norms_list(dry):
    from mbn.norms import NORMS

    return ["bn", "mbn"] if dry else sorted(NORMS)


def main(argv=None):
    from mbn.cli import ArgumentParser, seconds

    ap = ArgumentParser(prog="gpu_check.py", description=__doc__)
    ap.add_argument("--dry", action="store_true", help="CPU rehearsal at toy sizes (no timings worth reading)")
    ap.add_argument("--data-root", default=None, help="holds cifar-10-batches-py/ for the train phase")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "runs", "gpu_check"))
    ap.add_argument("--budget", type=seconds, default=470.0, help="seconds for the whole check")
    ap.add_argument("--phases", nargs="+", default=PHASES, choices=PHASES)
    ap.add_argument("--compile-cache", default=None,
                    help="torch.compile's cache folder for every process (default: $MBN_COMPILE_CACHE, else "
                         "runs/compile_cache); carry it to the next machine for warm starts")
    ap.add_argument("--bench-md", default=None,
                    help="where the bench table goes besides <out>/bench.md (default: results/bench.md; a --dry "
                         "rehearsal writes only <out>/bench.md, its timings are not measurements)")
    ap.add_argument("--commit", default=None,
                    help="the commit the code was taken from, where the machine's copy has no usable git")
    ap.add_argument("--report", metavar="LOG",
                    help="only write --bench-md from a saved gpu_check.jsonl (its env row or, for logs without "
                         "one, the header of the bench.md written beside it as <LOG stem>.raw.md)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.bench_md or BENCH_MD, args.commit)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec), default=str), flush=True)
        return 0

    import torch

    from mbn import compile_cache
    from mbn.cli import EnvironmentFault

    if not args.dry and not torch.cuda.is_available():
        raise EnvironmentFault("no CUDA device is visible; run with --dry for a CPU rehearsal")
    if args.data_root and not os.path.isdir(os.path.join(args.data_root, "cifar-10-batches-py")):
        from mbn import UserError

        raise UserError(f"--data-root {args.data_root}: no cifar-10-batches-py/ there; build it with "
                        f"python ../shared/data/build_cifar.py --root {args.data_root} --dataset cifar10")
    # every subprocess inherits the folder ($MBN_COMPILE_CACHE, TORCHINDUCTOR_CACHE_DIR); a rehearsal keeps
    # its own beside its output
    default_cache = os.path.join(args.out, "compile_cache") if args.dry else os.path.join(REPO, "runs", "compile_cache")
    compile_cache.use(args.compile_cache or compile_cache.resolve() or default_cache, key="--compile-cache")
    check = Check(args.out, args.dry, args.budget)
    check.emit(environment(args.commit, dry=args.dry))
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="2", PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    dry = args.dry
    if "correct" in args.phases:
        specs = [{"kind": "correct", "name": f"correct:{n}-{2 if d else 1}", "norm": n, "double": d, "dry": dry}
                 for n in norms_list(dry) for d in (False, True)]
        check.run(specs, 120, env, parallel=2 if dry else 16)
    bench = []
    if "bench" in args.phases:
        steps, warmup = (2, 1) if dry else (100, 30)
        grid = [("resnet20", 8, "abdfgh")] if dry else \
            [("resnet56", 128, "abcdef"), ("resnet56", 8, "abcdef"), ("resnet20", 128, "abdfgh")]
        specs = [{"kind": "bench", "name": f"bench:{m}-bs{b}-{k}", "model": m, "batch": b, "key": k,
                  "steps": steps, "warmup": warmup, "dry": dry, "seeds": PACKED_N[dry]}
                 for m, b, keys in grid for k in keys]
        lock = os.path.join(args.out, "bench.lock")
        bench = [r for r in check.run(specs, 300, dict(env, MBN_BENCH_LOCK=lock), parallel=2 if dry else len(specs))
                 if r.get("ok")]
        ratio_rows(check, bench)
    if "packed" in args.phases:
        packed(check, env, bench, dry)
    if "train" in args.phases:
        train(check, env, args.data_root, dry)
    if bench:
        text = render(check.rows, dry)
        for path in (args.bench_md or (None if dry else BENCH_MD), os.path.join(args.out, "bench.md")):
            if path is None:
                continue
            with open(path, "w") as f:
                f.write(text)
    print(f"\n{len(check.rows)} checks, {len(check.failures)} failed")
    for f in check.failures:
        print(f"FAILED {f['name']}: {f.get('error', '')}")
        for line in f.get("traceback_tail", []):
            print(f"    {line}")
    return 1 if check.failures else 0


def environment(commit=None, dry=False) -> dict:
    import platform

    import torch

    from mbn.tracking import git_state

    git = git_state()
    return {"name": "env", "ok": True, "dry": dry, "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu {platform.machine()}",
            "torch": torch.__version__, "commit": commit or git["commit"], "dirty": None if commit else git["dirty"]}


def render(rows, dry=False) -> str:
    """results/bench.md from the rows of one check."""
    env = next(r for r in rows if r["name"] == "env")
    bench = [r for r in rows if r["name"].startswith("bench:") and r.get("ok")]
    order = {k: i for i, k in enumerate("abcdefgh")}
    bench.sort(key=lambda r: (r["model"] != "resnet56", -r["batch"], order[r["key"]]))
    title = "Training throughput, one run of scripts/gpu_check.py" + (" (--dry: CPU rehearsal, not a measurement)" if dry else "")
    lines = [f"# {title}", "", "Generated by `scripts/gpu_check.py` from its log; do not edit.", "",
             f"- device: {env['device']}", f"- torch {env['torch']}",
             f"- commit {env['commit']}" + (" (dirty)" if env.get("dirty") else ""), f"- date {env['date']}",
             "- (a) a plain eager fp32 loop on one fixed batch; (b)-(f) the framework's step on device-resident "
             "synthetic CIFAR-shaped data; (g), (h) as many seeds of (b), (d) as the packed phase has processes, "
             "stacked in one process; 30 warm-up steps, 100 timed, processes timed one at a time", ""]
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from bench import table_lines

    lines += table_lines(bench)
    lines += ["", "Other measurements of the same run:", ""]
    lines += [f"- {r['name']}: {summary(r)}" for r in rows if r["name"].startswith(("ratio", "packed:", "train", "correct"))
              and not r["name"][len("packed:"):].isdigit()]
    failed = [r["name"] for r in rows if not r.get("ok")]
    lines += ["", f"Failed checks: {', '.join(failed) if failed else 'none'}"]
    return "\n".join(lines) + "\n"


def report(log: str, out: str, commit=None) -> int:
    rows = [json.loads(line) for line in open(log) if line.strip()]
    if not any(r["name"] == "env" for r in rows):  # logs written before the env row existed
        raw = os.path.splitext(log)[0] + ".raw.md"
        head = {k.strip(): v.strip() for k, v in (line[2:].split(" ", 1) for line in open(raw) if line.startswith("- "))}
        env = {"name": "env", "ok": True, "device": head["device:"], "torch": head["torch"].split(",")[0],
               "date": head["date"], "commit": commit, "dirty": None}
        rows.insert(0, env)
    if commit:
        next(r for r in rows if r["name"] == "env").update(commit=commit, dirty=None)
    with open(out, "w") as f:
        f.write(render(rows))
    print(f"wrote {out}")
    return 0


def summary(row: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                     if k not in ("name", "ok"))


def ratio_rows(check, bench):
    """The issue's target ratios from one run's bench rows."""
    def ips(model, batch, key):
        return next((r["images_per_s"] for r in bench if (r["model"], r["batch"], r["key"]) == (model, batch, key)), None)

    for model, batch in (("resnet56", 128), ("resnet56", 8), ("resnet20", 128), ("resnet20", 8)):
        a, b = ips(model, batch, "a"), ips(model, batch, "b")
        if not (a and b):
            continue
        row = {"name": f"ratio:{model}-bs{batch}", "ok": True, "bn1_vs_a": b / a}
        for key, label in (("c", "mbn1_vs_bn1"), ("d", "mbn2_vs_bn1"), ("e", "brn2_vs_bn1"), ("f", "bn1_graph_vs_nograph")):
            v = ips(model, batch, key)
            if v:
                row[label] = b / v if key == "f" else v / b
        for key, base, label in (("g", b, "bn1_stacked_vs_bn1"), ("h", ips(model, batch, "d"), "mbn2_stacked_vs_mbn2")):
            v = ips(model, batch, key)
            if v and base:  # all seeds' images per second in one process against one seed's
                row[label] = v / base
        if model == "resnet20":
            row["bn1_images_per_s"] = b
            d = ips(model, batch, "d")
            if d:  # 200 epochs of 50,000 images (training only)
                row["est_200_epochs_mbn2_min"] = 200 * 50000 / d / 60
        if model == "resnet56" and batch == 128 and ips(model, batch, "d"):
            row["est_200_epochs_mbn2_min"] = 200 * 50000 / ips(model, batch, "d") / 60
        check.emit(row)


def packed(check, env, bench, dry):
    """n concurrent ResNet-20 BN-1 trainings under CUDA MPS against one process, and against the n
    seeds stacked in one process ((g) of the bench phase)."""
    n, steps = PACKED_N[dry], 2 if dry else 150
    mps = None if dry else start_mps(env)
    env = dict(env, **mps) if mps else env
    barrier = tempfile.mkdtemp()
    specs = [{"kind": "packed", "name": f"packed:{i}", "batch": 8 if dry else 128, "steps": steps, "barrier": barrier,
              "n": n, "dry": dry} for i in range(n)]
    rows = check.run(specs, 150, env, parallel=n)
    if mps:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, timeout=20)
    done = [r for r in rows if r.get("ok")]
    if len(done) == n:
        agg = sum(r["images"] for r in done) / (max(r["end"] for r in done) - min(r["start"] for r in done))

        def ips(key):
            return next((r["images_per_s"] for r in bench
                         if (r["model"], r["batch"], r["key"]) == ("resnet20", specs[0]["batch"], key)
                         and r.get("seeds", n) == n), None)

        one, stacked = ips("b"), ips("g")
        row = {"name": f"packed:{n}-processes", "ok": True, "aggregate_images_per_s": agg, "mps": bool(mps),
               "vs_one_process": agg / one if one else None}
        if stacked:  # the question: n seeds in one process (stacked) or in n processes?
            r = stacked / agg
            row.update(stacked_images_per_s=stacked, stacked_vs_processes=r, verdict=(
                f"{n} seeds stacked in one process beat {n} processes by {r:.2f}x: keep stacking" if r > 1.05 else
                f"{n} seeds stacked in one process do not beat {n} processes ({r:.2f}x, 5% margin): drop stacking"))
        check.emit(row)


def start_mps(env):
    """Start the CUDA MPS daemon for the packed phase; None if it is not there."""
    if not shutil.which("nvidia-cuda-mps-control"):
        return None
    d = tempfile.mkdtemp()
    mps = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(d, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(d, "log")}
    for p in mps.values():
        os.makedirs(p)
    r = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=dict(env, **mps), capture_output=True, timeout=20)
    return mps if r.returncode == 0 else None


def train(check, env, data_root, dry):
    """The real thing through train.py: 3 epochs of ResNet-20 MBN-2 on CIFAR-10."""
    real = data_root and os.path.isdir(os.path.join(data_root, "cifar-10-batches-py"))
    run_dir = os.path.join(check.out_dir, "train_run")
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["model=resnet20", "norm=mbn", "train.epochs=3", "train.progress=false", f"hydra.run.dir={run_dir}"]
    args += [f"data.root={data_root}"] if real else ["data=synthetic", "data.train_size=2048"]
    if dry:
        args += ["train.epochs=1", "data.train_size=64", "data.test_size=32", "train.batch_size=16", "device=cpu",
                 "train.precise_batches=2"]
    timeout = min(200, max(5, check.deadline - time.time()))
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=timeout)
        code, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        code, err = "timeout", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    row = {"name": "train:resnet20-mbn2-3ep" + ("" if real else "-synthetic"), "ok": code == 0, "wall_s": time.time() - t0}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        hist = [json.loads(line) for line in open(path) if line.strip()]
        row.update(images_per_s=[round(h["images_per_s"]) for h in hist], test_err=[h["test_err"] for h in hist])
        if hist:
            row["est_200_epochs_min"] = 200 * sum(h["epoch_time"] for h in hist[1:] or hist) / max(1, len(hist[1:] or hist)) / 60
    if code != 0:
        row.update(error=f"exit {code}", traceback_tail=err.strip().splitlines()[-12:])
    check.emit(row)


if __name__ == "__main__":
    from mbn.cli import run

    run(main)
