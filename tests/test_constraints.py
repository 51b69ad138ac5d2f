"""The property test of issue 18.6: for EVERY declared constraint (mbn/validate.py `key(...)` in
mbn/config.py and mbn/norms/*.py) hypothesis draws invalid values, and the check train.py runs
before a single run's directory exists (`mbn.validate.Preflight.on_run_start`, called by Hydra
with the composed config) refuses each with one `error:` line naming the key, exit status 2,
and leaves the run dir untouched. The constraints are found by walking composed configs, so a
key declared tomorrow is drawn too; a constraint kind without a strategy here fails the test.
A handful of real `train.py` processes check the same path end to end."""
import contextlib
import copy
import hashlib
import io
import math
import os
import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mbn import UserError
from mbn.config import norm_configs
from mbn.validate import FLOAT32_MAX, INT64_MAX, Each, Folder, Matches, NotBelow, OneOf, Pattern, Preflight, Range, Stages, When, \
    hydra_error, schema_fields
from tests.conftest import REPO, run_cli

BASES = [("bn", "synthetic"), ("bn", "cifar10"), ("bn", "imagenet")] + [(n, "synthetic") for n in norm_configs()]


@pytest.fixture(scope="module")
def composed():
    """One composed config (with its hydra node) per base: compositions cost a second each."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    out = {}
    for norm, data in BASES:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
            out[norm, data] = compose("train", [f"norm={norm}", f"data={data}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return out


def constraints():
    """(base, dotted key, Key) of every declared constraint, found in the composed configs."""
    from tests.conftest import make_cfg

    seen, out = set(), []
    for base in BASES:
        cfg = make_cfg([f"norm={base[0]}", f"data={base[1]}"])

        def walk(node, prefix):
            for name, decl in (schema_fields(node) or {}).items():
                child = node._get_node(name)
                if OmegaConf.is_dict(child):
                    walk(child, f"{prefix}{name}.")
                elif decl is not None and (decl.rule is not None or decl.relations):
                    where = (f"{prefix}{name}", OmegaConf.get_type(node))
                    if where not in seen:
                        seen.add(where)
                        out.append(pytest.param(base, f"{prefix}{name}", decl, id=f"{base[0]}-{base[1]}-{prefix}{name}"))
        walk(cfg, "")
    return out


SAFE = string.ascii_letters + string.digits + "_-.:/"


def invalid(rule):
    """Values that break `rule`."""
    if isinstance(rule, Range):
        parts = [st.just(float("nan")), st.just(float("inf"))]
        if not rule.optional:
            parts.append(st.none())
        if rule.low is not None:
            parts.append(st.floats(max_value=rule.low, exclude_max=not rule.low_open, allow_nan=False,
                                   allow_infinity=False))
            if rule.integer:
                parts.append(st.integers(max_value=math.ceil(rule.low) - (0 if rule.low_open else 1)))
        if rule.high is not None:
            parts.append(st.floats(min_value=rule.high, exclude_min=not rule.high_open, allow_nan=False,
                                   allow_infinity=False))
        if rule.integer:
            parts.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not float(x).is_integer()))
            if rule.high is None:  # beyond int64, torch's counter (train.epochs=99999999999999999999999)
                parts.append(st.integers(min_value=INT64_MAX + 1))
        else:  # finite, but beyond what torch's float32 holds (an SGD step with lr=1e300 overflows)
            parts.append(st.floats(min_value=FLOAT32_MAX, exclude_min=True, allow_infinity=False).map(
                lambda x: x if rule.ok(-x) or rule.low is None else -x))
        return st.one_of(parts)
    if isinstance(rule, OneOf):
        options = rule.options()
        if all(isinstance(o, bool) for o in options):
            return st.sampled_from([b for b in (True, False) if b not in options])
        return st.text(SAFE, min_size=1, max_size=12).filter(lambda s: s not in options)
    if isinstance(rule, Pattern):
        return st.text(SAFE + " ", max_size=12).filter(lambda s: not rule.ok(s))
    if isinstance(rule, Folder):  # a file, or a path through one ("" too)
        afile = os.path.join(REPO, "README.md")
        return st.one_of(st.just(""), st.just(afile), st.text(string.ascii_letters, min_size=1, max_size=8).map(
            lambda s: os.path.join(afile, s)))
    if isinstance(rule, Each):
        inner = invalid(rule.rule)
        bad_element = st.tuples(st.lists(st.just(0.5), max_size=2), inner).map(lambda t: [*t[0], t[1]])
        parts = [bad_element]
        if rule.nonempty:
            parts.append(st.just([]))
        if rule.increasing:
            parts.append(st.floats(0.01, 1).map(lambda x: [x, x / 2]))
        return st.one_of(parts)
    raise AssertionError(f"no strategy for the constraint kind {type(rule).__name__}: add one")


def breaking(relation, value_rule):
    """{dotted key: value} assignments (the constrained key as `SELF`) that break `relation`."""
    if isinstance(relation, Matches):
        return st.sampled_from(sorted(relation.table.items())).flatmap(lambda kv: st.integers(1, 10**4).filter(
            lambda v: v != kv[1]).map(lambda v: {relation.other: kv[0], "SELF": v}))
    if isinstance(relation, Stages):
        return st.integers(0, 3).flatmap(lambda m: st.integers(2, 6).filter(lambda n: n != m + 1).map(
            lambda n: {relation.other: [round((i + 1) / (m + 1), 3) for i in range(m)], "SELF": [0.5] * n}))
    if isinstance(relation, NotBelow):
        return st.integers(2, 512).flatmap(lambda o: st.integers(1, o - 1).map(
            lambda v: {relation.other: o, "SELF": v}))
    if isinstance(relation, When):
        if relation.rule is None:  # the other key must exist: norm=bn has no norm.input_norm
            return st.just({"SELF": relation.value, "norm": "bn"})
        return invalid(relation.rule).map(lambda o: {"SELF": relation.value, relation.other: o})
    raise AssertionError(f"no strategy for the relation kind {type(relation).__name__}: add one")


def draws(decl):
    parts = [invalid(decl.rule).map(lambda v: {"SELF": v})] if decl.rule is not None else []
    parts += [breaking(r, decl.rule) for r in decl.relations]
    return st.one_of(parts)


def tree_digest(path):
    h = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(path)):
        h.update(root.encode())
        for f in sorted(files):
            h.update(f.encode() + open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def refused(cfg, dotted):
    """Run the preflight check train.py runs; return its one error line (asserting exit 2)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        Preflight().on_run_start(config=cfg)
    lines = err.getvalue().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    return lines[0]


def check_one_draw(composed, tmp_path_factory, base, dotted, decl, data):
    """One invalid draw into an existing run dir with files in it, or into one that does not exist."""
    assignment = data.draw(draws(decl))
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')  # a run dir with something to lose
    fresh = run_dir / "fresh" / "deeper"
    target = data.draw(st.sampled_from([run_dir, fresh]))
    before = tree_digest(run_dir)
    cfg = copy.deepcopy(composed[base])
    try:
        if assignment.get("norm") == "bn" and base[0] != "bn":  # the other normalizer: a composed base
            cfg = copy.deepcopy(composed["bn", base[1]])
        for key, value in assignment.items():
            if key != "norm":
                OmegaConf.update(cfg, dotted if key == "SELF" else key, value, force_add=False)
    except OmegaConfBaseException as e:  # a value of the wrong type: what Hydra reports at the command line
        err = hydra_error(e)
        assert err is not None and "\n" not in str(err) and e.full_key.split(".")[-1] in str(err), (assignment, e)
        return
    OmegaConf.update(cfg, "hydra.run.dir", str(target))
    line = refused(cfg, dotted)
    assert f"{dotted}=" in line or f"{dotted}:" in line, (assignment, line)
    assert tree_digest(run_dir) == before and not fresh.parent.exists()


@pytest.mark.parametrize("base,dotted,decl", constraints())
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_declared_constraint_refuses_invalid_values(composed, tmp_path_factory, base, dotted, decl, data):
    check_one_draw(composed, tmp_path_factory, base, dotted, decl, data)


@pytest.mark.slow
@pytest.mark.parametrize("base,dotted,decl", constraints())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_declared_constraint_refuses_many_invalid_values(composed, tmp_path_factory, base, dotted, decl,
                                                               data):
    check_one_draw(composed, tmp_path_factory, base, dotted, decl, data)


# ------------------------------------------------------------------ a few real processes
@pytest.mark.parametrize("overrides,says", [
    (["+train.batchsize=32"], "train.batchsize=32: unknown key; did you mean train.batch_size?"),
    (["train.precise_batches=-1"], "train.precise_batches=-1: "),
    (["data=cifar10", "data.num_classes=5"], "data.num_classes=5 (the number of classes): must be 10 with data.name=cifar10"),
    (["norm=null"], "norm=null: norm takes one option by name, one of bn, brn, cbn, gn, mabn, mbn, normprop, rbn"),
])
def test_train_py_refuses_in_one_line_and_creates_nothing(tmp_path, overrides, says):
    from tests.test_errors import one_line_error

    run_dir = tmp_path / "runs" / "r"
    r = run_cli("train.py", "data=synthetic", "logger=none", *overrides, f"hydra.run.dir={run_dir}")
    assert says in one_line_error(r)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override", ["norm=null", "norm=1", "norm=[bn,gn]", "model={}", "~data", "~norm=bn",
                                      "hydra/launcher=null"])
def test_a_config_group_takes_one_option_by_name(override):
    """null, a number, a list, a dict or a deletion for a group: Hydra's ValueError or merge error
    names no group; ours names it and its options. A name, and a sweep over names, pass."""
    from mbn.validate import check_group_overrides

    groups = {"norm": ["bn", "gn"], "model": ["resnet20"], "data": ["synthetic"]}
    group = override.lstrip("~").partition("=")[0]
    with pytest.raises(UserError, match=f"^{re.escape(override)}: {group} takes one option by name"):
        check_group_overrides(["optim.lr=null", override], groups)
    check_group_overrides(["norm=bn", "norm=bn,gn", "model='resnet20'", "optim.lr=null", "hydra/launcher=basic"],
                          groups)


@pytest.mark.parametrize("program, argv, says", [
    ("train.py", ["train=5"], "train=5: train is a section of keys, not a value; set its keys, e.g. train.epochs="),
    ("train.py", ["perf=null"], "perf=null: perf is a section of keys"),
    ("train.py", ["optim.lr=0.1", "train=[1]"], "train=[1]: train is a section of keys"),
    ("eval.py", ["run_dir=x", "data=cifar10"], "data=cifar10: data is a section of keys, not a value; set its keys"),
])
def test_a_value_for_a_whole_section_names_it_and_its_keys(program, argv, says):
    """OmegaConf says "int is not a subclass of TrainConfig" or, for eval.py, names no key."""
    import importlib.util

    from mbn.config import Config, config_groups
    from mbn.validate import check_group_overrides

    with pytest.raises(UserError, match=re.escape(says)):
        if program == "train.py":
            check_group_overrides(argv, config_groups(), Config)
        else:
            spec = importlib.util.spec_from_file_location("_eval_script", os.path.join(REPO, "eval.py"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.parse(argv)
    check_group_overrides(["train.epochs=5", "train={}", "norm=bn"], config_groups(), Config)


def test_range_bounds_open_and_closed_by_hand():
    """Each kind of bound at the bound itself and one step past it. The draws above reach past a
    bound with floats, which an integer rule refuses for being floats: config.seed's open upper
    bound 2**31 is checked here."""
    from mbn.validate import problems
    from tests.conftest import make_cfg

    seed = Range(0, 2**31, high_open=True, integer=True)
    assert seed.ok(0) and seed.ok(2**31 - 1) and not seed.ok(2**31) and not seed.ok(-1) and not seed.ok(3.0)
    closed = Range(1, 3)
    assert closed.ok(1) and closed.ok(3) and not closed.ok(0.999) and not closed.ok(3.001)
    opened = Range(0, 1, low_open=True, high_open=True)
    assert opened.ok(0.5) and not opened.ok(0) and not opened.ok(1)
    assert not Range(0).ok(None) and Range(0, optional=True).ok(None)
    assert not any(Range(0).ok(v) for v in (float("nan"), float("inf"), True))
    assert Range(0).ok(FLOAT32_MAX) and not Range(0).ok(1e300) and not Range().ok(-1e39)  # float32 holds it
    (found,) = problems(make_cfg(["optim.lr=1e300"]))
    assert found.startswith("optim.lr=1e+300: the learning rate must be a number > 0, at most 3.403e+38 in size")
    assert Range(1, integer=True).ok(INT64_MAX) and not Range(1, integer=True).ok(INT64_MAX + 1)
    (found,) = problems(make_cfg([f"train.epochs={10**23}"]))
    assert found.startswith(f"train.epochs={10**23}: the number of epochs must be an integer >= 1, at most {INT64_MAX}")
    assert problems(make_cfg([f"seed={2**31 - 1}"])) == []
    (found,) = problems(make_cfg([f"seed={2**31}"]))
    assert found.startswith(f"seed={2**31}: the seed must lie in [0, 2147483648)")
