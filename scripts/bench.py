"""Training throughput in one process: a plain eager fp32 PyTorch loop against our training step.

    python scripts/bench.py                       # GPU: ResNet-56, batch 128 and 8; writes results/bench.md
    python scripts/bench.py --only b d --json     # some configurations, JSON lines only
    python scripts/bench.py --tiny --device cpu   # seconds on a CPU: proves the script works

Configurations: (a) reference: the eager fp32 loop written below with nn.BatchNorm2d on one fixed
batch; (b) our BN-1; (c) MBN-1; (d) MBN-2; (e) BRN-2; (f) our BN-1 without the CUDA graph (compile
only); (g) BN-1 and (h) MBN-2 for --seeds K seeds (default 8) trained together in one process, as one
network of grouped convolutions (`mbn.stacked`: exact, each seed its own initialisation and data
order), img/s counting all K models' images — so (g)'s "vs (b)" is what one process gains by
stacking, to set against K processes sharing the GPU. (b)-(h) run the framework's own training step
(`mbn.engine.Run`, or `mbn.stacked.StackedRun`: the device-side data plan, the device's default perf
settings — on a GPU bf16, channels_last, torch.compile and one CUDA graph replay per step) on
synthetic CIFAR-shaped data held on the device; (g), (h) are not in the default --only.
`scripts/gpu_check.py` runs every configuration in its own process; with $MBN_BENCH_LOCK set,
processes compile in parallel and take turns for the timed part.

    python scripts/bench.py --model resnet20 --batch-sizes 128 --only b g --seeds 8   # stacking's gain

--compile-cache DIR (default $MBN_COMPILE_CACHE, else torch's own) keeps torch.compile's caches in DIR
(mbn/compile_cache.py): a second bench with the same folder starts warm."""
import contextlib
import fcntl
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from mbn import compile_cache  # noqa: E402
from mbn.build import resolve_device  # noqa: E402
from mbn.cli import ArgumentParser, EnvironmentFault, run, whole_number  # noqa: E402
from mbn.engine import Run  # noqa: E402
from mbn.results import REPO, compose  # noqa: E402
from mbn.stacked import StackedRun  # noqa: E402
from mbn.tracking import git_state  # noqa: E402

CONFIGS = {"a": ("reference eager fp32, nn.BatchNorm2d", None, False, ()),
           "b": ("ours BN-1", "bn", False, ()), "c": ("ours MBN-1", "mbn", False, ()),
           "d": ("ours MBN-2", "mbn", True, ()), "e": ("ours BRN-2", "brn", True, ()),
           "f": ("ours BN-1, no CUDA graph", "bn", False, ("perf.cuda_graph=false",)),
           "g": ("ours BN-1, {k} seeds stacked in one process", "bn", False, ()),
           "h": ("ours MBN-2, {k} seeds stacked in one process", "mbn", True, ())}
BENCH_MD = os.path.join(REPO, "results", "bench.md")  # read by mbn/plan.py for its GPU-time estimates
STACKED = "gh"  # configurations that train --seeds models at once (mbn.stacked)


def reference_step(model, opt, x, y):
    """What a plain PyTorch CIFAR loop does each step."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


@contextlib.contextmanager
def turn():
    """Hold the file lock named by $MBN_BENCH_LOCK (if any) while timing."""
    path = os.environ.get("MBN_BENCH_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(key, model_name, batch, device, size, extra=(), seeds=8):
    """A zero-argument step function and the perf settings it runs with (for the stacked
    configurations one step trains `seeds` models, each on its own batch of `batch`)."""
    label, norm, double, overrides = CONFIGS[key]
    torch.manual_seed(0)
    if norm is None:
        model = models.build_model(model_name, 10, torch.nn.BatchNorm2d, torch.nn.ReLU).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        return (lambda: reference_step(model, opt, x, y)), {"precision": "fp32", "channels_last": False,
                                                            "compile": False, "cuda_graph": False}
    cfg = compose([f"model={model_name}", f"norm={norm}", "data=synthetic", f"data.train_size={batch * 50}",
                   f"train.batch_size={batch}", f"train.double_forward={double}", "optim.lr=0.01",
                   f"device={device}", *overrides, *extra])
    if key in STACKED:
        run = StackedRun(cfg, device, range(seeds))
        start_epoch = run.start_epoch
    else:
        run = Run(cfg, device)
        start_epoch = run.train_batches.start_epoch
    run.model.train()
    state = {"i": 0}

    def step():
        if state["i"] % run.per_epoch == 0:
            start_epoch(state["i"] // run.per_epoch)
        run.schedule(0)
        run.step()
        state["i"] += 1

    return step, run.perf


def measure(key, model_name, batch, steps, warmup, device, size=32, extra=(), seeds=8):
    step, perf = build(key, model_name, batch, device, size, extra, seeds)
    models = seeds if key in STACKED else 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    with turn():
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        elapsed = time.perf_counter() - t0
    row = {"key": key, "config": CONFIGS[key][0].format(k=seeds), "model": model_name, "batch": batch,
           "images_per_s": models * batch * steps / elapsed, "ms_per_step": 1000 * elapsed / steps, "warmup_s": warm_s,
           "perf": {k: perf[k] for k in ("precision", "channels_last", "compile", "cuda_graph")}}
    if key in STACKED:
        row["seeds"] = seeds  # images_per_s counts every seed's images; batch is each seed's
    return row


def table_lines(rows) -> list:
    """The markdown table of measurements, with each row's ratio to (a) and (b) of its model and batch."""
    lines = ["| model | config | batch | img/s | ms/step | vs (a) | vs (b) | precision | channels_last | compile | graph |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = {x["key"]: x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]}
        ratio = {k: f"{r['images_per_s'] / same[k]['images_per_s']:.2f}" if k in same else "—" for k in "ab"}
        p = r["perf"]
        lines.append(f"| {r['model']} | ({r['key']}) {r['config']} | {r['batch']} | {r['images_per_s']:.0f} | "
                     f"{r['ms_per_step']:.2f} | {ratio['a']} | {ratio['b']} | "
                     f"{p['precision']} | {p['channels_last']} | {p['compile']} | {p['cuda_graph']} |")
    if any("seeds" in r for r in rows):
        lines += ["", "Stacked rows ((g), (h)): K seeds in one process as one network of grouped convolutions; "
                      "img/s counts all K models' images, batch is each model's, so \"vs (b)\" is the gain over one "
                      "process."]
    return lines


def table(rows, title) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu {platform.machine()}"
    git = git_state()
    lines = [f"# {title}", "", "Generated by `scripts/bench.py`; do not edit.", "",
             f"- device: {device}", f"- torch {torch.__version__}, commit {git['commit']}" + (" (dirty)" if git["dirty"] else ""),
             f"- date {time.strftime('%Y-%m-%d %H:%M')}", ""]
    return "\n".join(lines + table_lines(rows)) + "\n"


def main(argv=None):
    ap = ArgumentParser(prog="bench.py", description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="resnet56", choices=models.MODELS, metavar="MODEL",
                    help=f"one of {', '.join(models.MODELS)}")
    ap.add_argument("--batch-sizes", type=whole_number(1), nargs="+", help="default 128 8 (--tiny: 8 4)")
    ap.add_argument("--steps", type=whole_number(1), default=100)
    ap.add_argument("--warmup", type=whole_number(0), default=30)
    ap.add_argument("--only", nargs="+", default=list("abcde"), choices=list(CONFIGS))
    ap.add_argument("--seeds", type=whole_number(1), default=8,
                    help="models trained at once by the stacked configurations (g, h)")
    ap.add_argument("--compile-cache", default=None,
                    help="torch.compile's cache folder (default: $MBN_COMPILE_CACHE, else torch's own)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes: resnet20, batch 8 and 4 (or as given), 3 steps")
    ap.add_argument("--json", action="store_true", help="print one JSON line per measurement only")
    ap.add_argument("--out", default=None, help="the table's file (default: results/bench.md for a GPU measurement; "
                                                "a CPU or --tiny run writes nothing unless given --out)")
    args = ap.parse_args(argv)
    compile_cache.use(args.compile_cache, key="--compile-cache")
    device = resolve_device(args.device)
    if device.type != "cuda" and args.device == "auto" and not args.tiny:
        raise EnvironmentFault("no CUDA device is visible and bench.py measures a GPU; python scripts/bench.py "
                               "--tiny --device cpu proves it runs on a CPU")
    out = args.out or (BENCH_MD if device.type == "cuda" and not args.tiny else None)
    extra = ()
    if args.tiny:
        args.model, args.batch_sizes = "resnet20", args.batch_sizes or [8, 4]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        extra = ("perf.compile=false",)
    rows = []
    for b in args.batch_sizes or [128, 8]:
        for k in args.only:
            rows.append(measure(k, args.model, b, args.steps, args.warmup, device, extra=extra, seeds=args.seeds))
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        return 0
    text = table(rows, f"Training throughput: {args.model}, images/s after {args.warmup} warm-up steps, "
                       f"{args.steps} timed steps" + (" (--tiny: CPU smoke sizes, not a measurement)" if args.tiny else ""))
    print(text)
    if out is None:
        print(f"not written to {os.path.relpath(BENCH_MD)}: a CPU or --tiny run is not a GPU measurement "
              "(sweep.py plan reads that file for its estimates); --out FILE keeps this table")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    run(main)
