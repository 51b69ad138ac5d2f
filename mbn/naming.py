"""Run directories named by what the run *is*, not by how it was asked for: the same config
reached from two sweeps lands in the same directory, so finished runs are reused."""
import hashlib
import json

from omegaconf import DictConfig, ListConfig, OmegaConf

# settings that do not change what is computed
IGNORED = {"data": ("root", "download"), "train": ("stop_after", "progress", "eval_batch_size"),
           "logger": None, "resume": None, "device": None, "name": None}


def identity(cfg) -> dict:
    """The part of a config that determines a run's result."""
    out = {}
    for k in cfg:
        if k == "hydra" or (k in IGNORED and IGNORED[k] is None):
            continue
        v = cfg[k]
        if isinstance(v, (DictConfig, ListConfig)):
            v = OmegaConf.to_container(v, resolve=True)
        if k in IGNORED and isinstance(v, dict):
            v = {kk: vv for kk, vv in v.items() if kk not in IGNORED[k]}
        out[k] = v
    return out


def run_id(cfg) -> str:
    d = identity(cfg)
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
    t = d["train"]
    budget = f"s{t['steps']}" if t.get("steps") else f"e{t['epochs']}"
    return (f"{d['data']['name']}-{d['model']['name']}-{d['norm']['name']}-bs{t['batch_size']}-{budget}"
            f"-df{int(bool(t['double_forward']))}-seed{d['seed']}-{digest}")


def _resolver(*_, _root_):
    return run_id(_root_)


if not OmegaConf.has_resolver("mbn.run_id"):
    OmegaConf.register_new_resolver("mbn.run_id", _resolver)
