"""Train a model: python train.py model=resnet56 norm=mbn [data=cifar100] [experiment=smoke]
(`python train.py --help` describes the main keys)."""
import os
import shutil
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from mbn import UserError, preempt
from mbn.config import register_configs
from mbn.tracking import Diverged
from mbn.validate import validate

register_configs()

HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def fail(e: UserError):
    """One line on stderr, no traceback; exit 2 (3 for a diverged run: mbn.tracking.Diverged)."""
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 2))


def discard_unstarted(run_dir: str) -> None:
    """A run refused before it started leaves nothing behind: remove the run dir when all it
    holds is what Hydra wrote into it (.hydra/), and its parents that are left empty."""
    hydra_dir = os.path.join(run_dir, ".hydra")
    if set(os.listdir(run_dir)) - {".hydra"} or (os.path.isdir(hydra_dir) and set(os.listdir(hydra_dir)) - HYDRA_FILES):
        return
    shutil.rmtree(hydra_dir, ignore_errors=True)
    os.rmdir(run_dir)
    top, parent = os.getcwd(), os.path.dirname(os.path.abspath(run_dir))
    while parent.startswith(top + os.sep) and not os.listdir(parent):  # runs/<name>/ made for it
        os.rmdir(parent)
        parent = os.path.dirname(parent)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg):
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    # SLURM's time-limit signal: stop at the next epoch boundary, then requeue (mbn/preempt.py). A
    # rerun finds this run dir again in a sweep (named by config) or when the command names it.
    preempt.install(run_dir, resumable=multirun or any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra))
    try:
        validate(cfg)
    except UserError as e:
        discard_unstarted(run_dir)
        fail(e)
    from mbn.engine import fit  # after Hydra has parsed the command line: fast --help

    try:
        summary = fit(cfg, run_dir, hc.overrides.task)
    except Diverged as e:
        preempt.disarm()  # the sweep goes on with its next run
        if not multirun:
            fail(e)
        print(f"error: {e}", file=sys.stderr)  # one diverged run of a sweep (its metrics.json says so)
        return None                            # does not end the sweep
    except UserError as e:
        discard_unstarted(run_dir)  # e.g. a normalizer's own check of its hyper-parameters
        fail(e)
    if preempt.stopped():
        preempt.requeue_and_exit()  # never returns: exit status preempt.EXIT_PREEMPTED or submitit's
    preempt.disarm()
    return summary.get("test_err")  # for sweepers


if __name__ == "__main__":
    main()
