"""Config composition for the tables: the config Hydra would build for a cell's overrides, and a
recorded config brought onto today's keys so that keys added later do not orphan old runs."""
import json
import os
from typing import List, Optional

from mbn.naming import identity

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(REPO, "results", "paper.json")

# The value a run had for a key its code did not record yet, where today's default differs: NormProp
# ran with filters of length norm.filter_norm before norm.recipe named that choice.
RECORDED_BEFORE = {"norm.recipe": "filter_norm"}


def compose(overrides):
    """The job config Hydra would build for these overrides (launcher settings ignored)."""
    overrides = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from mbn.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


_COMPOSED = {}


def compose_cached(overrides):
    """compose(), remembered (a table composes the same cells for every seed and every table)."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        try:
            _COMPOSED[key] = compose(list(overrides))
        except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors: a key or choice this checkout lacks
            _COMPOSED[key] = e
    if isinstance(_COMPOSED[key], Exception):
        raise _COMPOSED[key]
    return _COMPOSED[key]


def merge_overrides(base: List[str], extra: List[str]) -> List[str]:
    """base overrides with extra ones replacing those of the same key."""
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(extra)


def steps_per_epoch_at_128(extra) -> int:
    """SGD steps of a batch-128 epoch for the data these overrides select (Table 4's budget)."""
    cfg = compose(merge_overrides([], extra))
    n = cfg.data.train_size if cfg.data.name == "synthetic" else 50_000
    return max(1, n // 128)


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_key(flat_identity: dict) -> str:
    return json.dumps(flat_identity, sort_keys=True)


def filled_identity(record: dict) -> Optional[dict]:
    """The flat identity of a recorded config on today's keys: a key the run's code did not have
    takes the value it had before the key existed (RECORDED_BEFORE) or today's default for the run's
    own overrides (re-composed); a key today's configs no longer have is dropped. None when the
    record has no config."""
    config = record.get("config") or {}
    if not config:
        return None
    recorded = flat(identity(config))
    overrides = [o for o in record.get("overrides", []) if not o.startswith("seed=")]
    groups = [f"{g}={config[g]['name']}" for g in ("model", "norm", "data")
              if isinstance(config.get(g), dict) and "name" in config[g]]
    # the group choices first: a run made through the API (fit) records no overrides
    for attempt in (merge_overrides(groups, overrides), groups):
        try:
            defaults = flat(identity(compose_cached(attempt)))
            break
        except Exception:  # noqa: BLE001 - an override today's configs reject: try the group choices only
            continue
    else:
        return recorded
    return {k: recorded.get(k, RECORDED_BEFORE.get(k, v)) for k, v in defaults.items()}


def config_value(cfg, dotted):
    """A config value by dotted key; lists as tuples (hashable: they name rows and columns)."""
    from omegaconf import OmegaConf

    v = OmegaConf.select(cfg, dotted)
    if v is not None and not isinstance(v, (str, int, float, bool)):
        v = tuple(OmegaConf.to_container(v))
    return v


def value_from_overrides(overrides, dotted):
    """A cell key read from its overrides, for a cell today's configs cannot compose."""
    import yaml

    for o in overrides:
        k, _, v = o.partition("=")
        if k in (dotted, dotted[:-len(".name")] if dotted.endswith(".name") else None):
            v = yaml.safe_load(v)
            return tuple(v) if isinstance(v, list) else v
    return None
