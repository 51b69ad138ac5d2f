"""Where results go: metrics.jsonl (the record every table is built from), the run record
(config, git commit, versions), the console, and optionally W&B."""
import json
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_state(repo: str = REPO):
    def git(*args):
        return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# The code a process runs is the code it imported: read the commit once, at import, so that every
# job of a long multirun records the commit it actually runs, not whatever HEAD is by then.
GIT_AT_IMPORT = git_state()


def versions():
    import hydra
    import torchvision

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "torchvision": torchvision.__version__, "hydra": hydra.__version__,
         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_record(cfg_dict: dict, overrides, device: torch.device) -> dict:
    return {"config": cfg_dict, "overrides": list(overrides), "command": " ".join(sys.argv),
            "git": GIT_AT_IMPORT, "versions": versions(), "device": device_name(device),
            "hostname": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Tracker:
    """Interface the training loop talks to."""

    def log_step(self, metrics: dict, step: int) -> None:
        pass

    def log_epoch(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class JsonlTracker(Tracker):
    """metrics.jsonl: one line per epoch. On resume it is rewritten from the checkpoint's
    history, so a run killed mid-epoch leaves no line the checkpoint does not know."""

    def __init__(self, run_dir: str, history=()):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        atomic_write_text(self.path, "".join(json.dumps(h) + "\n" for h in history))

    def log_epoch(self, metrics, step):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")


WANDB_NAMES = {"train_loss": "train/loss", "train_err": "train/err", "test_loss": "test/loss", "test_err": "test/err",
               "test_err5": "test/err5", "lr": "hparams/lr", "lam": "hparams/lam", "r_max": "hparams/r_max",
               "d_max": "hparams/d_max", "epoch_time": "perf/epoch_time", "images_per_s": "perf/images_per_s"}


class WandbTracker(Tracker):
    def __init__(self, cfg, cfg_dict, record, run_dir, overrides, resume_id=None):
        import wandb  # only with logger=wandb

        mode = cfg.logger.mode or os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if (os.environ.get("WANDB_API_KEY") or _has_netrc_key()) else "offline"
        tags = [cfg.model.name, cfg.norm.name, cfg.data.name, f"bs{cfg.train.batch_size}"]
        self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=mode,
                              dir=run_dir, config=cfg_dict, group=cfg.name, tags=tags,
                              name=run_name(overrides) or cfg.name, id=resume_id,
                              resume="allow" if resume_id else None, reinit="finish_previous")
        self.run.summary["run_record"] = record
        self.id = self.run.id
        # epoch curves plot against the epoch, so runs of different batch sizes line up
        self.run.define_metric("epoch")
        for prefix in ("train/*", "test/*", "hparams/*"):
            self.run.define_metric(prefix, step_metric="epoch")

    def log_step(self, metrics, step):
        self.run.log({"step/" + k.replace("/", "_"): v for k, v in metrics.items()}, step=step)

    def log_epoch(self, metrics, step):
        self.run.log({WANDB_NAMES.get(k, k): v for k, v in metrics.items()}, step=step)

    def finish(self, summary):
        for k, v in summary.items():
            self.run.summary[WANDB_NAMES.get(k, k)] = v
        self.run.finish()


def run_name(overrides) -> str:
    """The overrides that define the run (not where it logs or how often)."""
    from mbn.naming import run_changing

    return ",".join(o for o in overrides if run_changing(o.split("=", 1)[0]))


def _has_netrc_key():
    return os.path.isfile(os.path.expanduser("~/.netrc")) and "api.wandb.ai" in open(
        os.path.expanduser("~/.netrc")).read()


class Trackers(Tracker):
    def __init__(self, trackers):
        self.trackers = trackers

    def log_step(self, metrics, step):
        for t in self.trackers:
            t.log_step(metrics, step)

    def log_epoch(self, metrics, step):
        for t in self.trackers:
            t.log_epoch(metrics, step)

    def finish(self, summary):
        for t in self.trackers:
            t.finish(summary)
