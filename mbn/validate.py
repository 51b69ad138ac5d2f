"""Checks of a composed config's values, run once before a training run builds or writes
anything. Hydra already rejects unknown keys and wrong types; these are the ranges and shapes
that would otherwise end in a traceback, in NaN, or in a run that silently means something else.
A key the config does not have (another normalizer's, another dataset's) is skipped."""
import math

from omegaconf import OmegaConf

from mbn import UserError

_ABSENT = object()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def unit(v) -> bool:
    return _number(v) and 0 <= v <= 1


def positive(v) -> bool:
    return _number(v) and v > 0


def at_least(low):
    return lambda v: _number(v) and v >= low


def count(v) -> bool:
    """An integer >= 1."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def optional_count(v) -> bool:
    return v is None or count(v)


def each(test):
    return lambda v: isinstance(v, list) and len(v) > 0 and all(test(x) for x in v)


def fractions(v) -> bool:
    """Points in training as fractions of it, in increasing order (milestones)."""
    return isinstance(v, list) and all(unit(x) for x in v) and v == sorted(v)


UNIT, FRACTIONS = "must lie in [0, 1]", "must be fractions of training in [0, 1], in increasing order"

# key, what it is, the requirement, the test. Every value documented as a probability, a weight
# or a fraction of training (all scheduled normalizer values among them) must lie in [0, 1].
RULES = [
    ("norm.lam", "MBN's λ (every value)", UNIT + "; the paper's are [0.1, 0.5, 0.9]", each(unit)),
    ("norm.lam_milestones", "λ's milestones", FRACTIONS, fractions),
    ("norm.eta", "MBN's η", UNIT + "; the paper's is 0.9", unit),
    ("norm.memory_size", "MBN's k (batches memorized)", "must be an integer >= 1; the paper's is 10", count),
    ("norm.momentum", "the normalizer's running-average rate", UNIT, unit),
    ("norm.eps", "the normalizer's eps", "must be > 0", positive),
    ("norm.r_max", "BRN's r_max", "must be >= 1", at_least(1)),
    ("norm.d_max", "BRN's d_max", "must be >= 0", at_least(0)),
    ("norm.relax_start", "BRN's relax_start", UNIT + " (a fraction of training)", unit),
    ("norm.r_max_end", "BRN's r_max_end", UNIT + " (a fraction of training)", unit),
    ("norm.d_max_end", "BRN's d_max_end", UNIT + " (a fraction of training)", unit),
    ("norm.const", "NormProp's constant", "must be > 0", positive),
    ("norm.filter_norm", "NormProp's initial filter length", "must be > 0; the default is 10", positive),
    ("optim.lr", "the learning rate", "must be a number > 0; the paper's is 0.1", positive),
    ("optim.momentum", "SGD's momentum", UNIT, unit),
    ("optim.weight_decay", "the weight decay", "must be >= 0", at_least(0)),
    ("schedule.milestones", "the lr milestones", FRACTIONS, fractions),
    ("schedule.gamma", "the lr decay factor", "must be > 0", positive),
    ("train.steps", "the step budget", "must be null (use train.epochs) or an integer >= 1", optional_count),
    ("train.batch_size", "the batch size", "must be an integer >= 1", count),
    ("train.eval_batch_size", "the evaluation batch size", "must be an integer >= 1", count),
    ("train.stop_after", "the epochs of this invocation", "must be null or an integer >= 1", optional_count),
    ("seed", "the seed", "must be an integer in [0, 2**31)", lambda v: isinstance(v, int) and 0 <= v < 2**31),
    ("data.num_classes", "the number of classes", "must be an integer >= 1", count),
    ("data.train_size", "the synthetic training set size", "must be an integer >= 1", count),
    ("data.test_size", "the synthetic test set size", "must be an integer >= 1", count),
    ("data.image_size", "the crop size", "must be an integer >= 1", count),
    ("data.workers", "the loader workers", "must be an integer >= 0", lambda v: isinstance(v, int) and v >= 0),
]


def _get(cfg, key):
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def problems(cfg) -> list:
    """Every value of cfg that is out of range, one sentence each."""
    found = []
    for key, what, requirement, test in RULES:
        value = _get(cfg, key)
        if value is not _ABSENT and not test(value):
            found.append(f"{key}={value}: {what} {requirement}")
    steps, epochs = _get(cfg, "train.steps"), _get(cfg, "train.epochs")
    if steps is None and epochs is not _ABSENT and not count(epochs):
        found.append(f"train.epochs={epochs}: the number of epochs must be an integer >= 1 (or set train.steps)")
    lam, lam_milestones = _get(cfg, "norm.lam"), _get(cfg, "norm.lam_milestones")
    if (isinstance(lam, list) and isinstance(lam_milestones, list) and len(lam) > 1
            and len(lam) != len(lam_milestones) + 1):
        need = f"{len(lam) - 1} milestone" + ("s" if len(lam) > 2 else "")
        found.append(f"norm.lam={lam}: {len(lam)} values of λ need {need}, "
                     f"norm.lam_milestones has {len(lam_milestones)} ({lam_milestones}); give one λ for a "
                     "constant, or one more λ than milestones")
    if _get(cfg, "optim.nesterov") is True and not positive(_get(cfg, "optim.momentum")):
        found.append("optim.nesterov=true needs optim.momentum > 0")
    return found


def validate(cfg) -> None:
    """Raise one UserError naming every out-of-range value, before anything is built or written."""
    found = problems(cfg)
    if found:
        raise UserError("; ".join(found))
