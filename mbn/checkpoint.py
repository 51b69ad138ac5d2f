"""Checkpoints: atomic writes, every RNG, and the check that a checkpoint belongs to this config."""
import os
import random

import numpy as np
import torch

from mbn.naming import run_changing

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
    """Write to a temporary file, fsync, rename: a kill leaves the old or the new checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, device="cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=False)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict):
    """The settings that change a run and differ between a checkpoint's config and this one."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
                  for k in set(a) | set(b) if run_changing(k) and a.get(k) != b.get(k))
