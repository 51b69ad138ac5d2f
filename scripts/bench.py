"""Training throughput in one process: a plain eager fp32 PyTorch loop against our train step.

    python scripts/bench.py                       # GPU: ResNet-56, batch 128 and 8; writes results/bench.md
    python scripts/bench.py --concurrent 8        # + aggregate img/s of 8 processes (MPS if available)
    python scripts/bench.py --tiny --device cpu   # seconds on a CPU: proves the script works

Configurations: (a) reference: eager fp32 loop written below, nn.BatchNorm2d; (b) our BN, single
forward; (c) MBN single forward; (d) MBN double forward; (e) BRN double forward. (b)-(e) use the
framework's train step with the device's default perf settings (GPU: bf16, channels_last,
torch.compile). Images are random tensors already on the device: this measures the step."""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from mbn.build import autocast_for, make_model, make_optimizer, resolve_device, resolve_perf  # noqa: E402
from mbn.step import train_step  # noqa: E402
from mbn.results import REPO, compose  # noqa: E402
from mbn.tracking import git_state  # noqa: E402

CONFIGS = {"a": ("reference eager fp32, nn.BatchNorm2d", None, False),
           "b": ("ours BN-1", "bn", False), "c": ("ours MBN-1", "mbn", False),
           "d": ("ours MBN-2", "mbn", True), "e": ("ours BRN-2", "brn", True)}


def reference_step(model, opt, x, y):
    """What a plain PyTorch CIFAR loop does each step."""
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def measure(key, model_name, batch, steps, warmup, device, size, perf_overrides=()):
    label, norm, double = CONFIGS[key]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if norm is None:
        model = models.build_model(model_name, 10, torch.nn.BatchNorm2d, torch.nn.ReLU).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        step = lambda: reference_step(model, opt, x, y)  # noqa: E731
        perf = {"precision": "fp32", "channels_last": False, "compile": False}
    else:
        cfg = compose([f"model={model_name}", f"norm={norm}", "data=synthetic", *perf_overrides])
        perf = resolve_perf(cfg.perf, device)
        model = make_model(cfg).to(device)
        if perf["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = make_optimizer(cfg, model)
        fwd = torch.compile(model, mode=perf["compile_mode"]) if perf["compile"] else model
        autocast = autocast_for(perf, device)
        for g in opt.param_groups:
            g["lr"] = 0.01
        step = lambda: train_step(model, opt, x, y, double, autocast, fwd)  # noqa: E731
    model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t0
    return {"key": key, "config": label, "batch": batch, "images_per_s": batch * steps / elapsed,
            "ms_per_step": 1000 * elapsed / steps, "perf": {k: perf[k] for k in ("precision", "channels_last", "compile")}}


def concurrent(n, args):
    """Aggregate throughput of n processes each running config (d) at the first batch size."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", "d", "--json", "--model", args.model,
           "--batch-sizes", str(args.batch_sizes[0]), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device] + (["--tiny"] if args.tiny else [])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(r[0]["images_per_s"] for r in results)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 8])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS))
    ap.add_argument("--concurrent", type=int, nargs="*", default=[])
    ap.add_argument("--tiny", action="store_true", help="16x16 images, resnet20, few steps: for CPU tests")
    ap.add_argument("--json", action="store_true", help="print results as JSON only")
    ap.add_argument("--out", default=os.path.join(REPO, "results", "bench.md"))
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    size = 32
    if args.tiny:
        args.model, size = "resnet20", 16
        args.batch_sizes = [8, 4]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    rows = [measure(k, args.model, b, args.steps, args.warmup, device, size) for b in args.batch_sizes for k in args.only]
    if args.json:
        print(json.dumps(rows))
        return 0
    lines = [f"# Training throughput: {args.model}, images/s after {args.warmup} warm-up steps, {args.steps} timed steps",
             "", "Generated by `scripts/bench.py`" + (" --tiny (CPU smoke sizes, not a measurement)" if args.tiny else ""), "",
             f"- device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu ' + platform.machine()}",
             f"- torch {torch.__version__}, commit {git_state()['commit']}" + (" (dirty)" if git_state()["dirty"] else ""),
             f"- date {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| config | batch | img/s | ms/step | vs (a) | vs (b) | precision | channels_last | compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in args.batch_sizes:
        by = {r["key"]: r for r in rows if r["batch"] == b}
        for k, r in by.items():
            ra = r["images_per_s"] / by["a"]["images_per_s"] if "a" in by else float("nan")
            rb = r["images_per_s"] / by["b"]["images_per_s"] if "b" in by else float("nan")
            p = r["perf"]
            lines.append(f"| ({k}) {r['config']} | {b} | {r['images_per_s']:.0f} | {r['ms_per_step']:.2f} | {ra:.2f} | "
                         f"{rb:.2f} | {p['precision']} | {p['channels_last']} | {p['compile']} |")
    if args.concurrent:
        one = next(r["images_per_s"] for r in rows if r["key"] == "d" and r["batch"] == args.batch_sizes[0]) \
            if "d" in args.only else None
        lines += ["", f"Concurrent processes, config (d), batch {args.batch_sizes[0]}:", "",
                  "| processes | aggregate img/s | vs one process |", "|---|---|---|"]
        for n in args.concurrent:
            agg = concurrent(n, args)
            lines.append(f"| {n} | {agg:.0f} | {agg / one:.2f} |" if one else f"| {n} | {agg:.0f} | — |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
