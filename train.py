"""Train a model: python train.py model=resnet56 norm=mbn [data=cifar100] [experiment=smoke]
(`python train.py --help` lists every key with its value and constraints).

One error boundary: a mistake in the command (unknown key or option, bad syntax or type, a value
outside its declared constraints), a missing or damaged file and a fault of the machine end in one
`error:` line and an exit status of mbn.cli; Ctrl-C says how to continue. The command is checked
and --help printed before torch is imported; nothing is written before the checks pass."""
import os
import sys

os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors: our boundary turns them into one line

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mbn import UserError, cli, preempt  # noqa: E402
from mbn.config import CONFIGS, Config, config_groups, group_options, norm_configs, register_configs  # noqa: E402
from mbn.validate import Preflight, check_group_overrides, help_lines, hydra_error, validate  # noqa: E402

register_configs()

STARTED = []  # the task function has run: errors from then on are not about the command line
USAGE = "python train.py model=resnet56 norm=mbn [data=cifar100] [experiment=smoke] [key=value ...]"


def discard_unstarted(run_dir: str, multirun: bool) -> None:
    """A run refused before it started leaves nothing behind: remove the folders made for it while
    they are empty — a single run's: those the preflight check created (Preflight.created; never a
    folder that existed before, even empty); a multirun job's: its dir, which Hydra made, and its
    parents under the working directory that are left empty."""
    if not multirun:
        for path in Preflight.created:  # deepest first
            if not os.path.isdir(path) or os.listdir(path):
                return
            os.rmdir(path)
        return
    if not os.path.isdir(run_dir) or os.listdir(run_dir):
        return
    os.rmdir(run_dir)
    top, parent = os.getcwd(), os.path.dirname(os.path.abspath(run_dir))
    while parent.startswith(top + os.sep) and not os.listdir(parent):  # runs/<name>/ made for it
        os.rmdir(parent)
        parent = os.path.dirname(parent)


def save_hydra_files(run_dir: str, cfg) -> None:
    """What Hydra would have written into <run dir>/.hydra/ (hydra.output_subdir is null, so that
    a refused command rewrites nothing): written once the run has passed every check."""
    from mbn.tracking import atomic_write_text

    hc = HydraConfig.get()
    folder = os.path.join(run_dir, ".hydra")
    os.makedirs(folder, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        atomic_write_text(os.path.join(folder, name), OmegaConf.to_yaml(node))


def train(cfg, run_dir: str, multirun: bool, overrides) -> int:
    """One run (one job of a multirun): check, then fit. Returns test_err for sweepers."""
    try:
        validate(cfg)
        from mbn.engine import fit  # torch: only once the command is known to be good

        summary = fit(cfg, run_dir, overrides, on_start=lambda: save_hydra_files(run_dir, cfg))
    except UserError as e:
        if e.exit_code != cli.EXIT_DIVERGED:
            discard_unstarted(run_dir, multirun)  # e.g. a normalizer's own check of its hyper-parameters
            raise
        preempt.disarm()  # the sweep goes on with its next run
        if not multirun:
            raise
        print(f"error: {e}", file=sys.stderr)  # one diverged run of a sweep (its metrics.json says so)
        return None                            # does not end the sweep
    except (MemoryError, RuntimeError) as e:  # out of memory is the machine's; other errors keep their traceback
        err = cli.out_of_memory(e)
        if err is None:
            raise
        discard_unstarted(run_dir, multirun)
        raise err from None
    if preempt.stopped():
        preempt.requeue_and_exit()  # never returns: exit status preempt.EXIT_PREEMPTED or submitit's
    preempt.disarm()
    return summary.get("test_err")  # for sweepers


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")  # absolute: also in-process
def main(cfg):
    STARTED.append(True)
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    # SLURM's time-limit signal: stop at the next epoch boundary, then requeue (mbn/preempt.py). A
    # rerun finds this run dir again in a sweep (named by config) or when the command names it.
    preempt.install(run_dir, resumable=multirun or any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra))
    return cli.guarded(train, cfg, run_dir, multirun, list(hc.overrides.task),
                       on_interrupt=f"continue with: {preempt.same_command()}")


# ------------------------------------------------------------------ --help, from the declarations
def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def help_text(overrides) -> str:
    cfg = compose([o for o in overrides if not o.startswith("hydra")])
    norms = "\n".join(f"    {name:<10}{(c.__doc__ or '').strip().splitlines()[0]}" for name, c in norm_configs().items())
    groups = "\n".join(f"  {g + '=':<12}{', '.join(group_options(g))}" for g in ("model", "data", "logger", "experiment"))
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in cli.EXIT_STATUSES.items())
    return f"""train.py: train a classifier with Batch Normalization or a variant of it, as in
"Double Forward Propagation for Memorized Batch Normalization" (Guo et al., AAAI 2018).

  {USAGE}

Choices (group=option):
  norm=       the normalizer:
{norms}
{groups}

Keys of this command's config (its values; norm=<name> --help shows that normalizer's keys):
{chr(10).join(help_lines(cfg))}

Run directory:
  hydra.run.dir=DIR               where the run writes (default runs/<name>/<time>); the same command
                                  with it again continues the run from its checkpoint
  -m key=a,b ...                  a multirun: one run per combination, each in runs/<name>/<run id>

Exit statuses:
{codes}

Every key can be set with key=value; the whole config: --cfg job. Hydra's own options: --hydra-help."""


def check_options(args) -> None:
    """Hydra's own argparse answers an unknown or misplaced option (`--bogus`, `a=1 -m b=2`) with
    its usage and a message; say it in one line, with the fix."""
    from hydra._internal.utils import get_args_parser

    def error(message):
        where = "; options (-m, --cfg job, ...) go before the key=value overrides" if "unrecognized" in message else ""
        raise UserError(f"{message}{where} (python train.py --help)")

    parser = get_args_parser()
    parser.error = error
    overrides = parser.parse_args(args).overrides
    check_group_overrides(overrides, config_groups(), Config)


def cli_main() -> int:
    args = sys.argv[1:]
    try:
        if "--help" in args or "-h" in args:
            print(help_text([a for a in args if a not in ("--help", "-h") and not a.startswith("-")]))
            return cli.EXIT_OK
        check_options(args)
        main()
    except Exception as e:  # noqa: BLE001  (Hydra's errors about the command; anything else is re-raised)
        err = None if STARTED else hydra_error(e)  # an error of the run itself keeps its traceback
        if err is None:
            raise
        raise err from None
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(cli_main)
