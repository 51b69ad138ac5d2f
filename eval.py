"""Report test loss and error of a saved run.

    python eval.py run_dir=runs/smoke/2026-01-01_00-00-00
    python eval.py ckpt=path/to/checkpoint.pt [eval_stats=both|memory|running] [device=cpu] [data.root=DIR]

For MBN, `both` (the default) reports the paper's memorized statistics and BN-style running averages.
"""
import json
import os
import sys

from omegaconf import OmegaConf

from mbn import UserError

USAGE = "usage: python eval.py run_dir=<dir> | ckpt=<file> [eval_stats=both|memory|running] [device=..] [data.root=..]"


def evaluate_checkpoint(path, eval_stats="both", device=None, data_root=None) -> dict:
    from mbn.data import make_loaders
    from mbn.checkpoint import load_checkpoint
    from mbn.engine import (autocast_for, evaluate, make_model, resolve_device, resolve_perf,
                            set_eval_stats)

    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    if data_root:
        cfg.data.root = data_root
    dev = resolve_device(device or cfg.device)
    batches = make_loaders(cfg, dev)[1]
    model = make_model(cfg).to(dev)
    model.load_state_dict(state["model"])
    autocast = autocast_for(resolve_perf(cfg.perf, dev), dev)
    has_memory = any(hasattr(m, "eval_stats") for m in model.modules())
    modes = ["memory", "running"] if eval_stats == "both" else [eval_stats]
    if eval_stats not in ("both", "memory", "running"):
        raise UserError(f"eval_stats must be both, memory or running (got {eval_stats!r})")
    report = {"checkpoint": path, "epoch": state["epoch"], "step": state["step"],
              "model": cfg.model.name, "norm": cfg.norm.name, "data": cfg.data.name}
    if not has_memory:
        modes = ["default"]
    for mode in modes:
        if has_memory:
            set_eval_stats(model, mode)
        r = evaluate(model, batches, autocast)
        suffix = "" if mode in ("default", "memory") else f"_{mode}"
        report[f"test_loss{suffix}"], report[f"test_err{suffix}"] = r["loss"], r["err"]
        report[f"test_err5{suffix}"] = r["err5"]
    return report


def main(argv):
    args = {}
    for a in argv:
        if "=" not in a:
            print(USAGE, file=sys.stderr)
            return 2
        k, v = a.split("=", 1)
        args[k] = v
    unknown = set(args) - {"run_dir", "ckpt", "eval_stats", "device", "data.root"}
    if unknown or ("run_dir" in args) == ("ckpt" in args):
        print(USAGE + (f"\nunknown argument(s): {', '.join(sorted(unknown))}" if unknown else ""), file=sys.stderr)
        return 2
    path = args.get("ckpt") or os.path.join(args["run_dir"], "checkpoint.pt")
    try:
        report = evaluate_checkpoint(path, args.get("eval_stats", "both"), args.get("device"), args.get("data.root"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
