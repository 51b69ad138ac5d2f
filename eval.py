"""Report test loss and error of a saved run.

    python eval.py run_dir=runs/smoke/2026-01-01_00-00-00
    python eval.py ckpt=path/to/checkpoint.pt [eval_stats=all] [precise_batches=200] [device=cpu] [data.root=DIR]

`all` (the default) reports every inference statistic the normalizer supports — for MBN the paper's
memorized statistics and BN-style running averages — and PreciseBN's (statistics recomputed with
the final weights over `precise_batches` training batches). `python eval.py --help` lists the
keys, written from their declarations below; they are checked like train.py's, before torch loads.
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mbn import UserError, cli
from mbn.config import DEVICE
from mbn.validate import PROGRAM, Folder, OneOf, check_sections, help_lines, hydra_error, key, optional, problems, \
    whole

USAGE = "python eval.py run_dir=<dir> | ckpt=<file> [key=value ...]"


@dataclass
class EvalData:
    root: Optional[str] = key(None, "where the dataset is (null: the run's data.root)", Folder(optional=True))


@dataclass
class EvalConfig:
    run_dir: Optional[str] = key(None, "a run directory: evaluates its checkpoint.pt (or give ckpt)")
    ckpt: Optional[str] = key(None, "a checkpoint file (or give run_dir)")
    eval_stats: str = key("all", "the inference statistics to report (all: every one the normalizer has)",
                          OneOf(["all", "default", "memory", "running", "precise"]))
    precise_batches: int = key(200, "the training batches PreciseBN recomputes the statistics over", whole,
                               note="0 turns it off")
    device: Optional[str] = key(None, "the device (null: the run's, a CPU where it has no GPU)", optional(DEVICE))
    data: EvalData = field(default_factory=EvalData)


def evaluate_checkpoint(path, eval_stats="all", device=None, data_root=None, precise_batches=200,
                        run_config=None) -> dict:
    """Test loss and errors of a checkpoint with each inference statistic its normalizer supports
    (`all`), or one of them; `precise` recomputes the statistics with the final weights over
    `precise_batches` training batches (PreciseBN) first. `run_config`: the config of the run dir
    it lies in (.hydra/config.yaml): a checkpoint of another run (copied there) is refused, not
    reported as that run's numbers."""
    from mbn import norms
    from mbn.build import autocast_for, make_model, resolve_device, resolve_perf
    from mbn.checkpoint import load_checkpoint
    from mbn.data import make_loaders
    from mbn.step import Evaluator, precise_data

    state = load_checkpoint(path)  # a missing or unreadable file: UserError naming it
    if run_config is not None:
        from mbn.checkpoint import config_differences

        differ = config_differences(state["config"], run_config, "checkpoint")
        if differ:
            raise UserError(f"{path} is not the checkpoint of the run its folder holds (now = that run's "
                            f".hydra/config.yaml): {'; '.join(differ)}; evaluate it with ckpt={path} alone")
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


def parse(argv) -> OmegaConf:
    """key=value arguments -> the checked EvalConfig (one UserError naming every mistake)."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise UserError(f"arguments are key=value, got {' '.join(bad)}; usage: {USAGE} (--help lists the keys)")
    try:
        given = [(a.partition("=")[0], OmegaConf.to_container(OmegaConf.from_dotlist([a])), a) for a in argv]
        check_sections([(k, value.get(k), a) for k, value, a in given], EvalConfig)
        cfg = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as e:  # an unknown key, a value of the wrong type
        raise (hydra_error(e) or UserError(str(e))) from None
    found = problems(cfg)
    if (cfg.run_dir is None) == (cfg.ckpt is None):
        found.append("give run_dir=<dir> or ckpt=<file> (one of them)")
    if found:
        raise UserError("; ".join(found))
    return cfg


def help_text() -> str:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in cli.EXIT_STATUSES.items())
    return (f"eval.py: test loss, top-1 and top-5 error of a saved run with every inference statistic its "
            f"normalizer supports.\n\n  {USAGE}\n\nKeys (default values):\n"
            + "\n".join(help_lines(OmegaConf.structured(EvalConfig))) + f"\n\nExit statuses:\n{codes}")


def main(argv) -> int:
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return cli.EXIT_OK
    PROGRAM[0] = "python eval.py"
    cfg = parse(argv)
    if cfg.run_dir:
        cli.existing_dir(cfg.run_dir, "run_dir")
    path = cfg.ckpt or os.path.join(cfg.run_dir, "checkpoint.pt")
    if cfg.run_dir and not os.path.exists(path) and os.path.isfile(os.path.join(cfg.run_dir, "metrics.json")):
        raise UserError(f"{cfg.run_dir} has no checkpoint.pt (sweeps delete the checkpoints of finished runs); "
                        "its test errors are in its metrics.json")
    saved, run_config = os.path.join(cfg.run_dir or "", ".hydra", "config.yaml"), None
    if cfg.run_dir and os.path.isfile(saved):
        try:
            run_config = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        except (OSError, ValueError, OmegaConfBaseException):  # unreadable or damaged: the checkpoint's own is used
            print(f"warning: {saved} is unreadable or damaged; the checkpoint is not checked against it",
                  file=sys.stderr)
    report = evaluate_checkpoint(path, cfg.eval_stats, cfg.device, cfg.data.root, cfg.precise_batches, run_config)
    from mbn.tracking import to_json

    print(to_json(report, indent=2))
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
