"""Run directories named by what the run *is*, not by how it was asked for: the same config
reached from two sweeps lands in the same directory, so finished runs are reused.

`RUN_FREE` is the one list of settings that do not change what a run computes: run ids, run
names, the resume check and the tables all read it."""
import hashlib
import json

from omegaconf import DictConfig, OmegaConf

RUN_FREE = ("hydra", "logger", "resume", "device", "name", "data.root", "data.download",
            "train.stop_after", "train.progress", "train.eval_batch_size", "train.time_limit",
            "perf.compile_cache")


def run_changing(key: str) -> bool:
    """False for a dotted config key (or override key) that is, or lies under, a RUN_FREE entry."""
    key = key.lstrip("+~")
    return not any(key == f or key.startswith(f + ".") for f in RUN_FREE)


def identity(cfg) -> dict:
    """The part of a config that determines a run's result."""
    if isinstance(cfg, DictConfig):  # drop `hydra` before resolving: its sweep subdir calls run_id
        cfg = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
               for k in cfg if run_changing(k)}

    def keep(d, prefix):
        return {k: keep(v, f"{prefix}{k}.") if isinstance(v, dict) else v
                for k, v in d.items() if run_changing(prefix + k)}

    return keep(cfg, "")


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
