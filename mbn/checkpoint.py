"""Checkpoints: atomic writes, every RNG, and the check that a checkpoint belongs to this config."""
import contextlib
import glob
import os
import random
import shutil

import numpy as np
import torch

from mbn import UserError
from mbn.cli import EnvironmentFault, environment_fault
from mbn.naming import run_changing
from mbn.tracking import fault_point, reason

CHECKPOINT = "checkpoint.pt"


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file, fsync, rename: a kill leaves the old or the new checkpoint. A
    failed write (disk full) removes the temporary file, keeps the old checkpoint and ends in
    one line. Temporary files of earlier processes killed while writing are removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            fault_point("checkpoint")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        kept = "the previous checkpoint is kept" if os.path.isfile(path) else "there is no earlier checkpoint"
        raise EnvironmentFault(f"could not write the checkpoint {path} ({reason(e)}; {free / 2**20:.0f} MiB free on "
                               f"its disk); {kept}. Free space, then rerun the same command to continue") from None
    for stale in glob.glob(glob.escape(path) + ".tmp*"):
        with contextlib.suppress(OSError):
            os.remove(stale)


REQUIRED = ("model", "optimizer", "epoch", "step", "config")


def load_checkpoint(path: str, device="cpu") -> dict:
    """A checkpoint written by save_checkpoint; anything else ends in one line naming the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    move = (f"move it away (mv {path} {path}.bad) to start this run over" if os.path.basename(path) == CHECKPOINT
            else f"name the {CHECKPOINT} a run of train.py wrote")  # eval.py ckpt=<another file>: leave it be
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except PermissionError as e:  # the machine's, not a damaged file
        raise environment_fault(e, "cannot read the checkpoint") from None
    except Exception as e:  # noqa: BLE001  (garbage or a cut-short file raises anything unpickling can)
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {reason(e)}); {move}") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"{path} is not a checkpoint written by train.py (it lacks {', '.join(missing)}); {move}")
    return state


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict, saved_as: str = "checkpoint"):
    """The settings that change a run and differ between a saved config (a checkpoint's, a
    finished run's record) and this one."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(f"{k}: {saved_as} {a.get(k)!r} vs now {b.get(k)!r}"
                  for k in set(a) | set(b) if run_changing(k) and a.get(k) != b.get(k))
