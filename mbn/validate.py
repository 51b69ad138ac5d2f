"""Constraints live with the keys: every config field that has a valid range, a set of choices or
a relation to another key declares it where it is defined (`key(...)` in a structured-config
dataclass: mbn/config.py and each normalizer's config in mbn/norms/*.py), and `problems(cfg)`
checks all of them in one walk over the composed config. The walk also refuses keys that no
schema declares (Hydra lets `+key=value` add any), naming the closest valid one, and a value that
comes from an interpolation names where it comes from. Nothing here imports torch: train.py and
eval.py check a command and print --help before the heavy imports.
"""
import dataclasses
import difflib
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mbn import UserError

_ABSENT = object()
PROGRAM = ["python train.py"]  # named in the hint of an unknown key (eval.py sets its own)


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


FLOAT32_MAX = 3.4028234663852886e38  # torch computes in float32: a larger number overflows there (optim.lr=1e300)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= FLOAT32_MAX


INT64_MAX = 2**63 - 1  # torch counts steps and sizes in int64: a larger count wraps or turns into a float


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= INT64_MAX


# ------------------------------------------------------------------ a value's own constraint
@dataclass(frozen=True)
class Range:
    """A finite number within bounds (`low_open`/`high_open`: the bound itself is excluded)."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False   # null is allowed too

    def ok(self, v) -> bool:
        if v is None:
            return self.optional
        if not (_integer(v) if self.integer else _number(v)):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        null = "null or " if self.optional else ""
        if self.low is not None and self.high is not None:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{null}{kind} in {lo}{_num(self.low)}, {_num(self.high)}{hi}"
        if self.low is not None:
            return f"{null}{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{null}{kind} {'<' if self.high_open else '<='} {_num(self.high)}"
        return f"{null}{kind}"


@dataclass(frozen=True)
class OneOf:
    """One of a set of values; `choices` may be a function (names found at run time: models,
    normalizers)."""
    choices: Any
    optional: bool = False

    def options(self) -> list:
        return list(self.choices() if callable(self.choices) else self.choices)

    def ok(self, v) -> bool:
        return (v is None and self.optional) or v in self.options()

    def describe(self) -> str:
        return ("null or " if self.optional else "") + "one of " + ", ".join(map(str, self.options()))


@dataclass(frozen=True)
class Pattern:
    """A string matching `regex` (fully), described by `text`."""
    regex: str
    text: str
    optional: bool = False

    def ok(self, v) -> bool:
        return (v is None and self.optional) or isinstance(v, str) and re.fullmatch(self.regex, v) is not None

    def describe(self) -> str:
        return ("null or " if self.optional else "") + self.text


@dataclass(frozen=True)
class Folder:
    """A folder's path: one that exists or can be made (no part of it is a file). The one rule that
    looks at the disk: a file named where a folder belongs is a mistake in the command, refused
    before the run dir exists rather than when the folder is first used."""
    optional: bool = False

    def ok(self, v) -> bool:
        if v is None or not isinstance(v, str) or not v.strip():
            return v is None and self.optional
        from mbn.cli import nearest_existing

        return os.path.isdir(nearest_existing(v))

    def describe(self) -> str:
        return ("null or " if self.optional else "") + "a folder (one that exists or can be made, not a file)"


@dataclass(frozen=True)
class Each:
    """A list whose every value satisfies `rule`; `increasing`: in increasing order."""
    rule: Any
    increasing: bool = False
    nonempty: bool = True

    def ok(self, v) -> bool:
        return (isinstance(v, list) and (len(v) > 0 or not self.nonempty) and all(self.rule.ok(x) for x in v)
                and (not self.increasing or v == sorted(v)))

    def describe(self) -> str:
        order = ", in increasing order" if self.increasing else ""
        empty = "" if self.nonempty else " (may be empty)"
        return f"a list of {self.rule.describe().replace('a number', 'numbers').replace('an integer', 'integers')}" \
               f"{order}{empty}"


unit = Range(0, 1)
positive = Range(0, low_open=True)
nonnegative = Range(0)
count = Range(1, integer=True)          # an integer >= 1
whole = Range(0, integer=True)          # an integer >= 0
fractions = Each(unit, increasing=True, nonempty=False)  # points in training (milestones)


def optional(rule):
    """The same rule, null allowed."""
    return dataclasses.replace(rule, optional=True)


# ------------------------------------------------------------------ relations to other keys
# Each relation is called with the key's value and `get(dotted_key)` (the composed config's value,
# _ABSENT where it has no such key) and returns what is wrong, or None. `others`: the keys it reads.
@dataclass(frozen=True)
class Matches:
    """The value must equal `table[<other key's value>]` where the table has an entry."""
    other: str
    table: dict

    @property
    def others(self):
        return (self.other,)

    def check(self, v, get):
        o = get(self.other)
        if o in self.table and v != self.table[o]:
            return f"must be {self.table[o]} with {self.other}={o}"
        return None

    def describe(self) -> str:
        return "; ".join(f"{v} with {self.other}={k}" for k, v in self.table.items())


@dataclass(frozen=True)
class Stages:
    """Values per stage of training, switching at the milestones in `other`: one value (constant),
    or one more value than milestones."""
    other: str

    @property
    def others(self):
        return (self.other,)

    def check(self, v, get):
        m = get(self.other)
        if not isinstance(v, list) or not isinstance(m, list) or len(v) <= 1 or len(v) == len(m) + 1:
            return None
        need = f"{len(v) - 1} milestone" + ("s" if len(v) > 2 else "")
        return (f"{len(v)} values need {need}, {self.other} has {len(m)} ({m}{origin_of(self.other)}); "
                "give one value for a constant, or one more value than milestones")

    def describe(self) -> str:
        return f"one value, or one more than {self.other}"


@dataclass(frozen=True)
class NotBelow:
    """The value must be >= the other key's."""
    other: str

    @property
    def others(self):
        return (self.other,)

    def check(self, v, get):
        o = get(self.other)
        if _number(v) and _number(o) and v < o:
            return f"must be >= {self.other}={o}"
        return None

    def describe(self) -> str:
        return f">= {self.other}"


@dataclass(frozen=True)
class When:
    """Where the value is `value`, the other key must satisfy `rule` (absent: `rule` None means it
    must exist)."""
    value: Any
    other: str
    rule: Any = None

    @property
    def others(self):
        return (self.other,)

    def check(self, v, get):
        if v != self.value:
            return None
        o = get(self.other)
        if o is _ABSENT and self.rule is None:
            return f"needs a {self.other} key (a normalizer that has one)"
        if self.rule is not None and (o is _ABSENT or not self.rule.ok(o)):
            return f"needs {self.other} to be {self.rule.describe()} (it is {'unset' if o is _ABSENT else o})"
        return None

    def describe(self) -> str:
        return f"{self.value} needs {self.other}" + (f" {self.rule.describe()}" if self.rule else "")


# ------------------------------------------------------------------ the declaration
@dataclass(frozen=True)
class Key:
    what: str                            # what the key is: "the learning rate"
    rule: Any = None                     # the value's own constraint
    relations: Tuple[Any, ...] = ()      # constraints that involve other keys
    note: str = ""                       # after the requirement: "the paper's is 0.1"


def key(default=dataclasses.MISSING, what: str = "", rule=None, *relations, note: str = ""):
    """A structured-config field with its description and constraints, e.g.
    `lr: float = key(0.1, "the learning rate", positive, note="the paper's is 0.1")`
    (a list default is copied for every instance)."""
    meta = {"key": Key(what, rule, tuple(relations), note)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def schema_keys(schema) -> dict:
    """{field name: its Key or None} of a dataclass schema. A subclass that only changes a field's
    default (`name: str = "mbn"`) keeps the declaration of the class it derives from."""
    out = {}
    for f in dataclasses.fields(schema):
        decl = f.metadata.get("key")
        for base in schema.__mro__[1:]:
            if decl is not None:
                break
            inherited = getattr(base, "__dataclass_fields__", {}).get(f.name)
            decl = inherited.metadata.get("key") if inherited is not None else None
        out[f.name] = decl
    return out


def schema_fields(node) -> Optional[dict]:
    """schema_keys of a structured-config node's schema, None if it has none."""
    typ = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    return schema_keys(typ) if dataclasses.is_dataclass(typ) else None


def declared_keys(schema, prefix: str = ""):
    """(dotted key, Key or None, Field) of every field of a dataclass schema, nested schemas included."""
    decls = schema_keys(schema)
    for f in dataclasses.fields(schema):
        typ = f.type if isinstance(f.type, type) else None
        if dataclasses.is_dataclass(typ):
            yield from declared_keys(typ, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", decls[f.name], f


# ------------------------------------------------------------------ checking a composed config
_CURRENT = {"cfg": None}


def origin_of(dotted: str) -> str:
    """', from schedule.milestones' where the key's value is the interpolation ${schedule.milestones}."""
    cfg = _CURRENT["cfg"]
    parent, _, name = dotted.rpartition(".")
    try:
        node = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(name)
    except (AttributeError, KeyError, OmegaConfBaseException):
        return ""
    source = origin_of_node(node)
    return f", from {source}" if source else ""


def origin_of_node(node) -> str:
    """The key a node's value is interpolated from ("" if it is a value of its own)."""
    if node is None or not node._is_interpolation():
        return ""
    text = str(node._value())
    env = re.match(r"\$\{oc\.env:(\w+)", text)
    if env:
        return f"${env.group(1)}"
    m = re.match(r"\$\{(?:oc\.select:)?([\w.]+)", text)
    return m.group(1) if m else text


def _value(cfg, dotted):
    """The resolved plain value of a key, _ABSENT if the config has no such key."""
    v = OmegaConf.select(cfg, dotted, default=_ABSENT, throw_on_resolution_failure=True)
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def closest(name: str, candidates, elsewhere=()) -> str:
    """'; did you mean X?': a key of the same name in another section, the shallowest first
    (train.device -> device), else the closest of `candidates` (the siblings), else the closest
    key of `elsewhere`."""
    leaf = name.rpartition(".")[2]
    match = (sorted((k for k in elsewhere if k != name and k.rpartition(".")[2] == leaf), key=lambda k: k.count("."))
             or difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
             or difflib.get_close_matches(name, [k for k in elsewhere if k != name], n=1, cutoff=0.6))
    return f"; did you mean {match[0]}?" if match else ""


def dotted_keys(node, prefix: str = "") -> list:
    """Every declared leaf key under a structured-config node, dotted (Hydra's own keys left out)."""
    fields = schema_fields(node) or {}
    out = []
    for name in fields:
        if prefix == "" and name == "hydra":
            continue
        try:
            child = node._get_node(name)
        except (AttributeError, KeyError, OmegaConfBaseException):
            continue
        inner = dotted_keys(child, f"{prefix}{name}.") if isinstance(child, DictConfig) and not child._is_missing() else []
        out.extend(inner or [f"{prefix}{name}"])
    return out


def _root(node):
    while node is not None and node._get_parent() is not None:
        node = node._get_parent()
    return node


def _shown(v) -> str:
    """A value as it is written on the command line."""
    if isinstance(v, list):
        return "[" + ",".join(_shown(x) for x in v) + "]"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _walk(cfg, node, prefix, found):
    fields = schema_fields(node)
    if fields is None:
        return
    for name in node.keys():
        dotted = f"{prefix}{name}"
        if prefix == "" and name == "hydra":
            continue
        if name not in fields:
            raw = node._get_node(name)._value()
            siblings = [f"{prefix}{f}" for f in fields]
            found.append(f"{dotted}={_shown(raw)}: unknown key{closest(dotted, siblings, dotted_keys(cfg))} "
                         f"({PROGRAM[0]} --help lists the keys)")
            continue
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            _walk(cfg, child, dotted + ".", found)
            continue
        try:
            value = _value(cfg, dotted)
        except OmegaConfBaseException as e:  # a missing value, an interpolation that does not resolve
            source = origin_of(dotted).replace(", from ", "")
            fix = f"set {dotted}=<value>" + (f" or fix {source}" if source else "")
            found.append(f"{dotted}={_shown(child._value())}: cannot be resolved ({first_line(e)}); {fix}")
            continue
        if fields[name] is not None:
            found.extend(_check(cfg, dotted, value, fields[name]))
    for name in fields:
        if name not in node:
            found.append(f"{prefix}{name} is missing (removed with ~{prefix}{name}?); every key needs a value")


def _check(cfg, dotted, value, decl: Key):
    """`<key>=<value>: <what> must ...; <note>` for the value's own rule, `<key>=<value> (<what>):
    <what is wrong>; <note>` for each relation it breaks."""
    shown = f"{dotted}={_shown(value)}{origin_of(dotted)}"
    note = f"; {decl.note}" if decl.note else ""
    if decl.rule is not None and not decl.rule.ok(value):
        text = decl.rule.describe()
        if text.startswith(("a number in", "an integer in")):
            text = "lie " + text.split(" ", 2)[2]
        else:
            text = "be " + text
        if isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            text += f", at most {FLOAT32_MAX:.4g} in size (float32's largest: torch computes in float32)"
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            text += f", at most {INT64_MAX} (int64's largest: torch counts in int64)"
        return [f"{shown}: {decl.what} must {text}{note}"]
    out = []
    for rel in decl.relations:
        wrong = rel.check(value, lambda k: _safe_value(cfg, k))
        if wrong:
            out.append(f"{shown} ({decl.what}): {wrong}{note}")
    return out


def _safe_value(cfg, dotted):
    try:
        return _value(cfg, dotted)
    except OmegaConfBaseException:
        return _ABSENT


def first_line(e: BaseException) -> str:
    text = (getattr(e, "msg", None) or str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def problems(cfg) -> list:
    """Everything wrong with a composed config, one sentence each, in the config's order: values
    outside their declared constraints, broken relations, unknown keys."""
    found = []
    _CURRENT["cfg"] = cfg
    try:
        _walk(cfg, cfg, "", found)
    finally:
        _CURRENT["cfg"] = None
    return found


def validate(cfg) -> None:
    """Raise one UserError naming everything wrong, before anything is built or written."""
    found = problems(cfg)
    if found:
        raise UserError("; ".join(found))


# ------------------------------------------------------------------ help from the declarations
HELP_WIDTH = 110

def describe_key(dotted: str, value, decl: Optional[Key], follows: str = "") -> str:
    """`  optim.lr=0.1   the learning rate; a number > 0 (the paper's is 0.1)`"""
    text = (decl.what if decl else "") + follows
    if decl and decl.rule is not None:
        text += f"; {decl.rule.describe()}"
    for rel in decl.relations if decl else ():
        text += f"; {rel.describe()}"
    if decl and decl.note:
        text += f" ({decl.note})"
    left = f"  {dotted}={_shown(value)}"
    lines = textwrap.wrap(text, width=HELP_WIDTH - 35) or [""]
    first = f"{left:<34} {lines[0]}" if len(left) < 34 else f"{left}\n{'':<34} {lines[0]}"
    return "\n".join([first.rstrip()] + [f"{'':<34} {line}" for line in lines[1:]])


def help_lines(cfg, prefix: str = "", node=None) -> list:
    """One line per declared key of the composed config with its current value."""
    node = cfg if node is None else node
    fields = schema_fields(node) or {}
    lines = []
    for name in node.keys():
        if (prefix == "" and name == "hydra") or name not in fields:
            continue
        dotted = f"{prefix}{name}"
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            lines.extend(help_lines(cfg, dotted + ".", child))
            continue
        try:
            value = _value(cfg, dotted)
        except OmegaConfBaseException:
            value = child._value()
        source = origin_of_node(child)
        lines.append(describe_key(dotted, value, fields[name], f" (follows {source})" if source else ""))
    return lines


# ------------------------------------------------------------------ Hydra's own errors
def hydra_error(e: BaseException) -> Optional[UserError]:
    """One line for an error Hydra raises while reading the command (bad override syntax, an
    unknown key or option, a value of the wrong type); None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(e, MissingConfigException) and e.options is not None:
        group = (e.missing_cfg_file or "").rpartition("/")[0] or "the config"
        wanted = (e.missing_cfg_file or "").rpartition("/")[2]
        choices = [o for o in e.options if "schema" not in o]
        return UserError(f"{group}={wanted}: no such option{closest(wanted, choices)}; choose one of "
                         f"{', '.join(choices)}")
    if isinstance(e, (ConfigCompositionException, MissingConfigException)) or isinstance(cause, OmegaConfBaseException):
        full_key = getattr(cause, "full_key", None)
        typ = getattr(cause, "object_type", None)
        text = first_line(cause)
        if "not in" in text and full_key and dataclasses.is_dataclass(typ):  # an unknown key
            prefix = full_key.rpartition(".")[0]
            siblings = [f"{prefix}.{f.name}" if prefix else f.name for f in dataclasses.fields(typ)]
            root = _root(getattr(cause, "parent_node", None))
            elsewhere = dotted_keys(root) if isinstance(root, DictConfig) else ()
            return UserError(f"{full_key}: unknown key{closest(full_key, siblings, elsewhere)} "
                             f"({PROGRAM[0]} --help lists the keys)")
        where = f"{full_key}: " if full_key else ""
        decl = schema_keys(typ).get(full_key.rpartition(".")[2]) if full_key and dataclasses.is_dataclass(typ) else None
        what = f" ({decl.what}: {decl.rule.describe()})" if decl is not None and decl.rule is not None else ""
        return UserError(f"{where}{text}{what}".replace("\n", " "))
    if isinstance(e, OverrideParseException):
        return UserError(f"cannot read the override: {first_line(e)} (overrides are key=value; quote lists: "
                         "'norm.lam=[0.1,0.5]')")
    return None


def check_sections(pairs, schema) -> None:
    """`train=5`, `perf=null`, eval.py's `data=cifar10`: a value given to a whole section of keys
    (a field of `schema` that is itself a dataclass) is refused naming the section and one of its
    keys; OmegaConf says "int is not a subclass of TrainConfig", or names no key at all.
    `pairs`: (key, value, the argument as written)."""
    for name, value, line in pairs:
        typ = next((f.type for f in dataclasses.fields(schema) if f.name == name), None)
        if dataclasses.is_dataclass(typ) and not isinstance(value, dict):
            first = dataclasses.fields(typ)[0].name
            raise UserError(f"{line}: {name} is a section of keys, not a value; set its keys, e.g. "
                            f"{name}.{first}=<value> ({PROGRAM[0]} --help lists them)")


def check_group_overrides(overrides, groups: dict, schema=None) -> None:
    """A config group (`groups`: {name: its options}) takes one option by name. Hydra answers
    `norm=null` or `norm=1` with a ValueError and `norm=[bn,gn]` with a merge error, neither
    naming the group, and `~norm` with errors about the keys that follow it: refuse them here, in
    one line naming the group, its options and how to run several. `schema`: the root config's
    dataclass, whose sections are checked too (check_sections)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise hydra_error(e) from None
    if schema is not None:
        check_sections([(o.key_or_group, o.value(), o.input_line) for o in parsed
                        if o.key_or_group not in groups and not o.is_sweep_override() and not o.is_delete()], schema)
    for o in parsed:
        group = o.key_or_group
        if (group not in groups and "/" not in group) or o.is_sweep_override():  # hydra/launcher: Hydra's
            continue
        if o.is_delete() or not isinstance(o.value(), str):
            options = f", one of {', '.join(groups[group])}" if groups.get(group) else ""
            raise UserError(f"{o.input_line}: {group} takes one option by name{options} "
                            f"(to run several: -m {group}=a,b)")


# ------------------------------------------------------------------ Hydra callback
try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class Preflight(Callback):
    """Checks a single run's composed config before Hydra creates its run directory, and creates
    that directory itself so that a location it cannot write is named with its key
    (configs/train.yaml registers it in hydra.callbacks). Hydra turns a callback's exceptions into
    warnings, so a refusal ends the process here (mbn.cli.guarded: one line, SystemExit).
    `created`: the folders it made for the run dir, deepest first — all a refused run may remove
    again (a folder that existed before, even empty, is the user's)."""

    created: Tuple[str, ...] = ()

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from mbn.cli import guarded

        guarded(self.check, config)

    @staticmethod
    def check(config) -> None:
        import os

        from mbn.cli import environment_fault

        validate(config)
        run_dir = str(OmegaConf.select(config, "hydra.run.dir"))
        missing, path = [], os.path.abspath(run_dir)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            missing.append(path)
            path = os.path.dirname(path)
        Preflight.created = tuple(missing)
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise environment_fault(e, "cannot create the run directory (hydra.run.dir):") from None


__all__ = ["Range", "OneOf", "Pattern", "Folder", "Each", "Matches", "Stages", "NotBelow", "When", "Key", "key", "unit",
           "positive", "nonnegative", "count", "whole", "fractions", "optional", "problems", "validate",
           "help_lines", "declared_keys", "schema_keys", "hydra_error"]
