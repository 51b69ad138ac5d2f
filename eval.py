"""Report test loss and error of a saved run.

    python eval.py run_dir=runs/smoke/2026-01-01_00-00-00
    python eval.py ckpt=path/to/checkpoint.pt [eval_stats=all|default|memory|running|precise] [precise_batches=200] [device=cpu] [data.root=DIR]

`all` (the default) reports every inference statistic the normalizer supports — for MBN the paper's
memorized statistics and BN-style running averages — and PreciseBN's (statistics recomputed with
the final weights over `precise_batches` training batches).
"""
import os
import sys

from omegaconf import OmegaConf

from mbn import UserError
from mbn.tracking import to_json

USAGE = ("usage: python eval.py run_dir=<dir> | ckpt=<file> [eval_stats=all|default|memory|running|precise] "
         "[precise_batches=200] [device=..] [data.root=..]")


def evaluate_checkpoint(path, eval_stats="all", device=None, data_root=None, precise_batches=200) -> dict:
    """Test loss and errors of a checkpoint with each inference statistic its normalizer supports
    (`all`), or one of them; `precise` recomputes the statistics with the final weights over
    `precise_batches` training batches (PreciseBN) first."""
    from mbn import norms
    from mbn.build import autocast_for, make_model, resolve_device, resolve_perf
    from mbn.checkpoint import load_checkpoint
    from mbn.data import make_loaders
    from mbn.step import Evaluator, precise_data

    state = load_checkpoint(path)  # a missing or unreadable file: UserError naming it
    cfg = OmegaConf.create(state["config"])
    if data_root:
        cfg.data.root = data_root
    dev = resolve_device(device or cfg.device)
    cfg.perf.cuda_graph = False  # evaluation here is eager; a GPU run's checkpoint also evaluates on a CPU
    perf = resolve_perf(cfg.perf, dev)
    train_batches, batches = make_loaders(cfg, dev, channels_last=perf["channels_last"])
    model = make_model(cfg).to(dev)
    model.load_state_dict(state["model"])
    autocast = autocast_for(perf, dev)
    available = norms.inference_modes(model)
    precise = ["precise"] if available and precise_batches > 0 else []
    modes = {"all": ["default", *available[1:], *precise], "default": ["default"]}.get(eval_stats, [eval_stats])
    if any(m not in ("default", *available, *precise) for m in modes):
        raise UserError(f"eval_stats={eval_stats} is not available for norm={cfg.norm.name}; choose one of "
                        f"{['all', 'default', *available[1:], *precise]}")
    report = {"checkpoint": path, "epoch": state["epoch"], "step": state["step"],
              "model": cfg.model.name, "norm": cfg.norm.name, "data": cfg.data.name}
    for mode in modes:
        if mode == "precise":
            norms.precise_statistics(model, precise_data(train_batches, cfg.train.batch_size, precise_batches),
                                     autocast)
        else:
            norms.inference_stats(model, mode)
        r = Evaluator(model, batches, autocast)()
        suffix = "" if mode == "default" else f"_{mode}"
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
    unknown = set(args) - {"run_dir", "ckpt", "eval_stats", "precise_batches", "device", "data.root"}
    if unknown or ("run_dir" in args) == ("ckpt" in args):
        print(USAGE + (f"\nunknown argument(s): {', '.join(sorted(unknown))}" if unknown else ""), file=sys.stderr)
        return 2
    path = args.get("ckpt") or os.path.join(args["run_dir"], "checkpoint.pt")
    try:
        if not args.get("precise_batches", "0").isdigit():
            raise UserError(f"precise_batches must be a whole number, got {args['precise_batches']!r}")
        report = evaluate_checkpoint(path, args.get("eval_stats", "all"), args.get("device"), args.get("data.root"),
                                     int(args.get("precise_batches", 200)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_json(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
