"""Where results go: metrics.jsonl (the record every table is built from), the run record
(config, git commit, versions), the console, and optionally W&B."""
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time

import torch

from mbn import UserError
from mbn.cli import EXIT_DIVERGED, EnvironmentFault

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary file, fsync, rename: a reader sees the old or the new text, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_error(path, e) from None


def write_error(path: str, e: Exception) -> UserError:
    """One line for a file that could not be written (disk full, read-only, gone): the machine's
    fault, exit status 4, like every other failed write of a run."""
    return EnvironmentFault(f"could not write {path}: {reason(e)}; free space (or fix the directory), then rerun "
                            "the same command to continue from the last checkpoint")


def reason(e: Exception) -> str:
    """An exception's first line, for a one-line message; a long one ends after its first sentence
    (torch's own messages run to several)."""
    text = (getattr(e, "strerror", None) or str(e)).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0].strip()
    end = line.find(". ", 40)
    return (line[:end + 1] if 0 < end < 200 else line[:200]) if len(line) > 120 else line


# ------------------------------------------------------------------------------ strict JSON
def finite(obj):
    """obj as plain JSON values: every NaN or infinity becomes None (strict JSON has neither),
    numpy and tensor scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj, **kwargs) -> str:
    """The one JSON encoder of every file a run writes: non-finite numbers are null, anything
    else unknown is written as its str()."""
    return json.dumps(finite(obj), allow_nan=False, default=str, **kwargs)


def write_json(path: str, obj) -> None:
    """metrics.json, run records: strict JSON, written atomically."""
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


# ------------------------------------------------------------------------------ divergence
class Diverged(UserError):
    """A loss stopped being finite. Entry points exit with status 3."""
    exit_code = EXIT_DIVERGED


def stop_if_diverged(losses: dict, epoch: int, step: int, run_dir=None) -> None:
    """Called at the end of every epoch with every loss the run computed (train and test), before
    the epoch's checkpoint is written: a non-finite one ends the run there, so the checkpoint of
    the last good epoch is the one kept. With run_dir (rank 0), metrics.json records the
    divergence (status "diverged", not finished)."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if not bad:
        return
    if run_dir is not None:
        write_json(os.path.join(run_dir, "metrics.json"),
                   {"status": "diverged", "finished": False, "epoch": epoch, "step": step,
                    **losses, "last_good_epoch": epoch - 1})
    kept = f"the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else "no checkpoint was written"
    which = " and ".join(f"the {k.replace('_loss', '')} loss" for k in bad)
    values = ", ".join(str(v) for v in bad.values())
    raise Diverged(f"training diverged: {which} of epoch {epoch} (up to step {step}) {'is' if len(bad) == 1 else 'are'} "
                   f"{values}; {kept}. Start a new run (another hydra.run.dir) with a smaller optim.lr "
                   "(or optim.weight_decay)")


# ------------------------------------------------------------------------------ console
def progress_postfix(lr: float, scheduled: dict, loss=None, err=None) -> dict:
    """The progress bar's postfix: running loss and error when known, the current lr and every
    scheduled normalizer value under the name its normalizer gives it (`mbn.norms.Scheduled`:
    λ, r_max, ...), e.g. {"loss": "2.301", "lr": "0.1", "λ": "0.5"}."""
    out = {}
    if loss is not None:
        out["loss"] = f"{loss:.3f}"
    if err is not None:
        out["err"] = f"{err:.1f}"
    out["lr"] = f"{lr:.3g}"
    out.update({getattr(v, "label", None) or k: f"{v:.3g}" for k, v in scheduled.items()})
    return out


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------ fault injection
_FAULT = os.environ.get("MBN_FAULT", "").partition(":")
_FAULT_COUNTS = {}


def fault_point(phase: str) -> None:
    """Test hook (tests/test_faults.py), inert unless MBN_FAULT=<phase>:<n> was set when the
    process started: the n-th time it reaches `phase` it kills itself with SIGKILL, as a power
    cut or the OOM killer would. Phases: "metrics" (an epoch evaluated and half of its
    metrics.jsonl line written), "checkpoint" (the checkpoint in its temporary file, not yet
    renamed into place)."""
    if _FAULT[0] != phase:
        return
    _FAULT_COUNTS[phase] = _FAULT_COUNTS.get(phase, 0) + 1
    if _FAULT_COUNTS[phase] == int(_FAULT[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


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

    wants_steps = False  # True: log_steps gets the epoch's per-step training loss and error

    def log_epoch(self, metrics: dict, step: int) -> None:
        pass

    def log_steps(self, first_step: int, losses, errors) -> None:
        """The per-step training loss and error (%) of steps first_step + 1, first_step + 2, ..."""

    def finish(self, summary: dict) -> None:
        pass


class JsonlTracker(Tracker):
    """metrics.jsonl: one line per epoch. On resume it is rewritten from the checkpoint's
    history, so a run killed mid-epoch leaves no line the checkpoint does not know."""

    def __init__(self, run_dir: str, history=()):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        atomic_write_text(self.path, "".join(to_json(h) + "\n" for h in history))

    def log_epoch(self, metrics, step):
        line = to_json(metrics) + "\n"
        try:
            with open(self.path, "a") as f:
                f.write(line[:len(line) // 2])
                f.flush()
                fault_point("metrics")
                f.write(line[len(line) // 2:])
        except OSError as e:  # a partial line is dropped on resume: the file is rebuilt from the checkpoint
            raise write_error(self.path, e) from None


# W&B names of the epoch metrics; any other value of an epoch line is a normalizer's scheduled
# hyper-parameter (λ, r_max, ...: mbn.norms.scheduled_values), logged as hparams/<key>
WANDB_NAMES = {"epoch": "epoch", "step": "step", "train_loss": "train/loss", "train_err": "train/err",
               "test_loss": "test/loss", "test_err": "test/err", "test_err5": "test/err5", "lr": "hparams/lr",
               "epoch_time": "perf/epoch_time", "images_per_s": "perf/images_per_s"}
PROBE_TIMEOUT_S = 3.0


def wandb_name(key: str) -> str:
    return WANDB_NAMES.get(key, f"hparams/{key}")


def wandb_server_error(timeout: float = PROBE_TIMEOUT_S):
    """None if W&B's server ($WANDB_BASE_URL, else api.wandb.ai) accepts a connection within
    `timeout` seconds, else why not (wandb.init itself would retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} does not answer ({reason(e) if not isinstance(e, socket.timeout) else 'timed out'})"
    return None


def wandb_mode(cfg, run_dir: str) -> str:
    """The W&B mode a run logs in. Online needs the server: it is probed first (a few seconds);
    without an answer a run whose mode was chosen automatically (an API key is configured) logs
    offline, saying so, and an explicit logger.mode=online ends in one line. Called before the run
    writes anything (mbn.engine), so that refusal leaves the run dir as it was."""
    mode = cfg.logger.mode or os.environ.get("WANDB_MODE")
    chosen = mode is not None
    if mode is None:
        mode = "online" if (os.environ.get("WANDB_API_KEY") or _has_netrc_key()) else "offline"
    if mode == "online":
        unreachable = wandb_server_error()
        if unreachable and chosen:
            raise EnvironmentFault(f"W&B server {unreachable} and logger.mode=online; log offline with "
                                   "logger.mode=offline (upload later with wandb sync) or check the network")
        if unreachable:
            mode = "offline"
            print(f"W&B server {unreachable}: logging offline into {run_dir}/wandb/; upload later with "
                  f"`wandb sync {run_dir}/wandb/offline-run-*`", flush=True)
    return mode


class WandbTracker(Tracker):
    """One W&B run per training run, in the mode `wandb_mode` chose (by default it chooses now)."""

    wants_steps = True

    def __init__(self, cfg, cfg_dict, record, run_dir, overrides, resume_id=None, mode=None):
        import wandb  # only with logger=wandb

        mode = mode or wandb_mode(cfg, run_dir)
        tags = [cfg.model.name, cfg.norm.name, cfg.data.name, f"bs{cfg.train.batch_size}"]
        try:
            self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=mode,
                                  dir=run_dir, config=cfg_dict, group=cfg.name, tags=tags,
                                  name=run_name(overrides) or cfg.name, id=resume_id,
                                  resume="allow" if resume_id else None, reinit="finish_previous",
                                  settings=wandb.Settings(init_timeout=30))
        except wandb.errors.Error as e:  # the server answered, but not with a run (key, entity, timeout)
            raise EnvironmentFault(f"W&B could not start the run ({reason(e)}); check logger.entity/project and "
                                   "the API key, or log offline with logger.mode=offline") from None
        self.run.summary["run_record"] = record
        self.id = self.run.id
        # epoch curves plot against the epoch, so runs of different batch sizes line up; the
        # per-step training curves against the global step
        self.run.define_metric("epoch")
        for prefix in ("train/*", "test/*", "hparams/*"):
            self.run.define_metric(prefix, step_metric="epoch")
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")

    def log_steps(self, first_step, losses, errors):
        for i, (loss, err) in enumerate(zip(losses, errors)):
            s = first_step + i + 1
            self.run.log({"global_step": s, "step/train_loss": loss, "step/train_err": err}, step=s)

    def log_epoch(self, metrics, step):
        self.epoch_keys = set(metrics)
        self.run.log({wandb_name(k): v for k, v in metrics.items()}, step=step)

    def finish(self, summary):
        keys = getattr(self, "epoch_keys", WANDB_NAMES)
        for k, v in summary.items():  # the last epoch's values under their curve names, the rest as they are
            self.run.summary[wandb_name(k) if k in keys else k] = v
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
        self.wants_steps = any(t.wants_steps for t in trackers)

    def log_epoch(self, metrics, step):
        for t in self.trackers:
            t.log_epoch(metrics, step)

    def log_steps(self, first_step, losses, errors):
        for t in self.trackers:
            if t.wants_steps:
                t.log_steps(first_step, losses, errors)

    def finish(self, summary):
        for t in self.trackers:
            t.finish(summary)
