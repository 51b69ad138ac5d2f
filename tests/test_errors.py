"""Every bad input ends in one clear line (issue 12): for each, the exit status, no traceback, and
what the line says. The fault side (kills, a full disk) is tests/test_faults.py."""
import json
import math
import os
import pickle
import re

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import models
from mbn import UserError
from mbn.config import Config, norm_configs
from mbn.data import load_cifar
from mbn.tracking import progress_postfix, to_json
from mbn.validate import declared_keys, problems
from tests.conftest import TINY, make_cfg, run_cli
from tests.test_data import write_fake_cifar


def one_line_error(r, status=2):
    """The process ended with `status` and said why in one `error:` line, without a traceback."""
    out = r.stderr + r.stdout
    assert r.returncode == status, out
    assert "Traceback" not in out, out
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def strict_json(text):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("overrides,says", [
    (["norm=mbn", "norm.lam=[-1]", "optim.lr=-1", "train.epochs=0"],
     ["norm.lam=[-1.0]: MBN's λ must be a list of numbers in [0, 1]",
      "optim.lr=-1.0: the learning rate must be a number > 0", "train.epochs=0: the number of epochs must be"]),
    (["norm=mbn", "norm.lam=[2]", "train.steps=0"],
     ["norm.lam=[2.0]: MBN's λ must be a list of numbers in [0, 1]", "train.steps=0: the step budget"]),
])
def test_out_of_range_values_are_refused_before_anything_is_written(tmp_path, overrides, says):
    """One process per row would cost seconds each: every out-of-range value is named in the one
    line, so a process with several shows each row's message (problems() checks them one by one)."""
    run_dir = tmp_path / "runs" / "r"
    line = one_line_error(run_cli("train.py", *TINY, *overrides, f"hydra.run.dir={run_dir}"))
    for text in says:
        assert text in line
    assert not run_dir.exists()  # not even Hydra's .hydra/
    for override, text in zip(overrides[1:], says):  # and each alone
        found = problems(make_cfg(TINY + ["norm=mbn", override]))
        assert len(found) == 1 and found[0].startswith(text)


def test_a_normalizers_own_check_leaves_nothing_behind(tmp_path):
    """Hyper-parameters a normalizer checks itself (here CBN's window) end in one line, exit 2, and
    no run directory."""
    run_dir = tmp_path / "runs" / "r"
    line = one_line_error(run_cli("train.py", *TINY, "norm=cbn", "norm.window=0", f"hydra.run.dir={run_dir}"))
    assert "window" in line
    assert not run_dir.exists()


def test_every_scheduled_value_is_checked_and_the_paper_configs_pass():
    for norm in norm_configs():
        for data in ("cifar10", "cifar100", "synthetic", "imagenet"):
            found = problems(make_cfg([f"norm={norm}", f"data={data}"]))
            if (norm, data) == ("rbn", "imagenet"):  # its input BN wants [0, 1] CIFAR-style images
                assert len(found) == 1 and "data.input_norm=dataset works" in found[0]
            else:
                assert found == [], (norm, data)
    bad = problems(make_cfg(["norm=brn", "norm.relax_start=1.5", "norm.r_max=0.5", "schedule.milestones=[0.6,0.4]"]))
    assert [p.split("=")[0] for p in bad] == ["norm.r_max", "norm.relax_start", "norm.r_max_end", "norm.d_max_end",
                                              "schedule.milestones"]  # the ends before relax_start=1.5, too
    # BRN relaxes from relax_start to each end: an end before the start is refused, not silently a jump
    assert problems(make_cfg(["norm=brn", "norm.relax_start=0.3", "norm.r_max_end=0.2"])) == [
        "norm.r_max_end=0.2 (BRN's r_max_end (a fraction of training)): must be >= norm.relax_start=0.3"]
    assert "need 1 milestone," in problems(make_cfg(["norm=mbn", "norm.lam=[0.1,0.9]"]))[0]
    assert problems(make_cfg(["norm=mbn", "norm.lam=[0.5]", "norm.eta=1.5"])) == [
        "norm.eta=1.5: MBN's η (decay of an older batch's weight) must lie in [0, 1]; the paper's is 0.9"]


# ------------------------------------------------------------------------ divergence
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from mbn.checkpoint import load_checkpoint

    r = run_cli("train.py", *TINY, "optim.lr=100000", f"hydra.run.dir={tmp_path}")
    line = one_line_error(r, status=3)
    summary = strict_json((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "diverged" and summary["finished"] is False
    assert None in (summary["train_loss"], summary["test_loss"])  # every loss is judged
    epoch, step = summary["epoch"], summary["step"]
    assert epoch <= 2 and f"epoch {epoch} (up to step {step})" in line and "training diverged" in line
    if epoch > 1:  # the diverged epoch was not checkpointed
        assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == epoch - 1
    else:
        assert not (tmp_path / "checkpoint.pt").exists()
    history = [strict_json(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epoch))


@pytest.mark.slow
def test_a_diverged_run_does_not_end_a_sweep(tmp_path):
    r = run_cli("train.py", "-m", *TINY, "train.epochs=3", "optim.lr=100000,0.1", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0 and "Traceback" not in r.stderr and "error: training diverged" in r.stderr
    status = sorted(strict_json(p.read_text()).get("status") for p in tmp_path.glob("*/metrics.json"))
    assert status == ["diverged", "finished"]


def test_json_is_strict_everywhere():
    text = to_json({"loss": float("nan"), "values": [float("inf"), -float("inf"), 1.5], "n": 3})
    assert strict_json(text) == {"loss": None, "values": [None, None, 1.5], "n": 3}
    assert "NaN" not in to_json({"x": math.nan})


# ------------------------------------------------------------------------ files
def test_garbage_checkpoint_names_the_file_and_what_to_do(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"this is not a checkpoint\n" * 10)
    line = one_line_error(run_cli("train.py", *TINY, f"hydra.run.dir={tmp_path}"))
    assert str(ckpt) in line and "not a readable checkpoint" in line and "move it away" in line
    line = one_line_error(run_cli("eval.py", f"ckpt={ckpt}"))
    assert str(ckpt) in line and "move it away" in line
    assert ckpt.read_bytes().startswith(b"this is not")  # left alone


def test_a_checkpoint_cut_short_is_named_in_one_sentence(tmp_path):
    """torch's message for a cut-short zip runs to several sentences: the line keeps its first."""
    from mbn.checkpoint import load_checkpoint, save_checkpoint
    from mbn.tracking import reason

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {k: 1 for k in ("model", "optimizer", "epoch", "step", "config")})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError) as e:
        load_checkpoint(str(path))
    assert "failed finding central directory.)" in str(e.value) and "high likelihood" not in str(e.value)
    long = RuntimeError("a first sentence that is long enough to be cut here. " * 5)
    assert reason(long) == "a first sentence that is long enough to be cut here."
    assert reason(RuntimeError("short. message. \nsecond line")) == "short. message."
    assert reason(OSError(28, "No space left on device")) == "No space left on device"


def test_eval_py_on_a_file_that_is_no_checkpoint_or_a_missing_run_dir_moves_nothing(tmp_path, monkeypatch):
    """eval.py ckpt=<metrics.json> must not advise moving that file away (only a damaged
    checkpoint.pt is moved to start a run over); a run_dir that does not exist is named as such."""
    import eval as eval_py

    monkeypatch.setattr(eval_py, "PROGRAM", [""])  # eval's main names itself in it: not in the shared list
    other = tmp_path / "metrics.json"
    other.write_text("{}")
    with pytest.raises(UserError) as e:
        eval_py.main([f"ckpt={other}"])
    assert "not a readable checkpoint" in str(e.value) and "mv " not in str(e.value)
    with pytest.raises(UserError, match=f"run_dir {tmp_path / 'gone'}: no such folder"):
        eval_py.main([f"run_dir={tmp_path / 'gone'}"])


def test_truncated_cifar_file_names_it_and_the_rebuild_command(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10")
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    r = run_cli("train.py", "data=cifar10", f"data.root={tmp_path}", "device=cpu", f"hydra.run.dir={tmp_path}/run")
    line = one_line_error(r)
    assert f"{batch} is unreadable" in line and "build_cifar.py --root" in line


@pytest.mark.parametrize("name,labels,says", [
    ("cifar10", lambda y: y[:3], "3 labels for 4 images"),          # labels and images out of step
    ("cifar10", lambda y: [12] + y[1:], "labels 0..12, expected 0..9"),
    ("cifar100", lambda y: [-1] + y[1:], "expected 0..99"),
    ("cifar10", lambda y: [str(v) for v in y], "expected integers"),
])
def test_cifar_labels_that_do_not_fit_the_images_or_the_classes_name_the_file(tmp_path, name, labels, says):
    """A damaged or foreign file is refused before training (never an IndexError in the loss
    after the run's files were written, nor images trained on under the wrong labels)."""
    write_fake_cifar(str(tmp_path), name)
    folder, file, key = (("cifar-10-batches-py", "data_batch_2", "labels") if name == "cifar10" else
                         ("cifar-100-python", "train", "fine_labels"))
    path = tmp_path / folder / file
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry[key] = labels(entry[key])
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)
    with pytest.raises(UserError) as e:
        load_cifar(name, str(tmp_path), download=False)
    assert str(e.value).startswith(f"{path} is unreadable") and says in str(e.value)


def test_missing_test_batch_is_named_first(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10")
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(UserError) as e:
        load_cifar("cifar10", str(tmp_path), download=False)
    assert str(e.value).startswith(f"cifar10 is incomplete: {tmp_path}/cifar-10-batches-py/ lacks test_batch (")


def test_download_hint_only_when_download_is_off(tmp_path, monkeypatch):
    monkeypatch.setattr("mbn.data._download", lambda name, root: "URLError: offline")
    with pytest.raises(UserError) as e:
        load_cifar("cifar100", str(tmp_path), download=True)
    assert "data.download=true" not in str(e.value) and "downloading it failed (URLError: offline)" in str(e.value)
    with pytest.raises(UserError, match="run with data.download=true"):
        load_cifar("cifar100", str(tmp_path), download=False)


# ------------------------------------------------------------------------ configs and help
def test_help_is_written_from_the_declarations_and_offers_no_schema():
    """--help lists every normalizer and model, and every key of the command's config with its value
    (norm=mbn: MBN's keys) and its declared constraint; no torch, no Hydra boilerplate."""
    r = run_cli("train.py", "norm=mbn", "optim.lr=0.05", "--help")
    assert r.returncode == 0 and "powered by Hydra" not in r.stdout and "schema" not in r.stdout, r.stderr
    for name in [*norm_configs(), *models.MODELS]:
        assert re.search(rf"\b{name}\b", r.stdout), name
    shown = dict(re.findall(r"^  ([\w.]+)=(\S+)", r.stdout, re.M))
    cfg = make_cfg(["norm=mbn", "optim.lr=0.05"])
    declared = [k for k, _, _ in declared_keys(Config) if k not in ("model", "norm", "data")]
    declared += [f"norm.{k}" for k in cfg.norm] + [f"data.{k}" for k in cfg.data] + ["model.name"]
    assert set(declared) <= set(shown), set(declared) - set(shown)
    parser = OverridesParser.create()
    for k in declared:  # the command's values, as they are written on the command line
        value = parser.parse_override(f"{k}={shown[k]}").value()
        expected = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, k)}), resolve=True)["v"]
        assert value == expected or (value is None and expected is None), k
    assert "norm.lam=[0.1,0.5,0.9]" in r.stdout and "optim.lr=0.05" in r.stdout and "a number > 0" in r.stdout


@pytest.mark.parametrize("choice", ["model=schema", "norm=mbn_schema"])
def test_schemas_are_not_choices(choice):
    line = one_line_error(run_cli("train.py", choice))
    assert "no such option" in line and ("resnet20" in line or "mbn" in line) and "schema, " not in line.split(
        "choose one of")[1]


def test_cifar_run_records_only_its_data_fields_and_no_empty_log(tmp_path):
    write_fake_cifar(str(tmp_path), "cifar10")  # 4 images a file
    run_dir = tmp_path / "run"
    r = run_cli("train.py", "data=cifar10", f"data.root={tmp_path}", "device=cpu", "train.epochs=1",
                "train.batch_size=4", "train.eval_batch_size=4", "train.progress=false", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    assert "(1 epoch)" in r.stdout and "(1 epochs)" not in r.stdout
    record = strict_json((run_dir / "run_record.json").read_text())
    data = set(record["config"]["data"])
    assert {"name", "num_classes", "root", "download", "augment"} <= data
    assert not data & {"train_size", "test_size", "seed", "image_size", "workers"}  # synthetic / ImageNet only
    assert not (run_dir / "train.log").exists()
    strict_json((run_dir / "metrics.json").read_text())
    assert (run_dir / ".hydra" / "config.yaml").exists()  # Hydra's record of the config stays


def test_progress_postfix_shows_the_current_lr_and_scheduled_values():
    """The names come from the normalizers (mbn.norms.Scheduled), tracking.py names none of them."""
    from mbn.norms import MemorizedBatchNorm2d, scheduled_values
    from mbn.norms.base import Scheduled

    mbn = torch.nn.Sequential(MemorizedBatchNorm2d(4, lam_values=[0.1, 0.5], lam_milestones=[0.5]))
    mbn[0].set_progress(0.7)
    assert progress_postfix(0.01, scheduled_values(mbn)) == {"lr": "0.01", "λ": "0.5"}
    assert progress_postfix(0.01, {"lam": Scheduled(0.5, "λ")}) == {"lr": "0.01", "λ": "0.5"}
    assert progress_postfix(0.1, {"r_max": 1.5, "d_max": 0.25}, loss=2.30259, err=90.0) == {
        "loss": "2.303", "err": "90.0", "lr": "0.1", "r_max": "1.5", "d_max": "0.25"}



def test_a_run_refused_inside_fit_leaves_no_run_dir(tmp_path, monkeypatch):
    """A check only the build can make (NormProp on a residual network: the model decides) refuses
    the run after Hydra's preflight check has made its run dir; train.py removes the empty dir."""
    import importlib.util

    from tests.conftest import REPO

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # train.py sets it at import; undone after the test
    spec = importlib.util.spec_from_file_location("_train_script", os.path.join(REPO, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from omegaconf import open_dict

    from mbn.validate import Preflight

    monkeypatch.setattr(Preflight, "created", ())  # what the check records, undone after the test
    run_dir = tmp_path / "runs" / "r"
    cfg = make_cfg(TINY + ["model=resnet20", "norm=normprop"])
    with open_dict(cfg):
        cfg.hydra = {"run": {"dir": str(run_dir)}}
    for existed in (False, True):  # a folder that existed before, even empty, is the user's: kept
        if existed:
            run_dir.mkdir(parents=True)
        Preflight.check(cfg)  # Hydra's callback: makes the run dir
        with pytest.raises(UserError, match="norm=normprop is defined for plain networks only"):
            train.train(cfg, str(run_dir), False, [])
        assert run_dir.is_dir() if existed else not (tmp_path / "runs").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_any_non_finite_loss_is_a_divergence(tmp_path, bad):
    from mbn.tracking import Diverged, stop_if_diverged

    stop_if_diverged({"train_loss": 2.3, "test_loss": 1e30}, 3, 30, str(tmp_path))  # large but finite: go on
    assert not (tmp_path / "metrics.json").exists()
    with pytest.raises(Diverged, match=re.escape(f"the test loss of epoch 3 (up to step 30) is {bad}")):
        stop_if_diverged({"train_loss": 2.3, "test_loss": bad}, 3, 30, str(tmp_path))
    summary = strict_json((tmp_path / "metrics.json").read_text())
    assert (summary["status"], summary["test_loss"], summary["last_good_epoch"]) == ("diverged", None, 2)


def test_out_of_memory_is_the_machines_fault_and_leaves_no_run_dir(tmp_path, monkeypatch):
    """torch's CPU allocator and CUDA say "out of memory" with a RuntimeError (data.train_size=1e11
    asked for 800 GB): one line, exit 4, the run dir made for the run removed; any other
    RuntimeError is a programming error and keeps its traceback."""
    import importlib.util

    import mbn.engine
    from mbn.cli import EXIT_ENVIRONMENT, out_of_memory
    from mbn.validate import Preflight
    from tests.conftest import REPO

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 799999999992 bytes. Error code 12 (Cannot allocate memory)")
    assert "(it asked for 799999999992 bytes)" in str(out_of_memory(cpu))
    assert out_of_memory(cpu).exit_code == EXIT_ENVIRONMENT
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "(it asked for 20.00 GiB)" in str(out_of_memory(cuda))
    assert out_of_memory(MemoryError()) is not None
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    spec = importlib.util.spec_from_file_location("_train_script", os.path.join(REPO, "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from omegaconf import open_dict

    monkeypatch.setattr(Preflight, "created", ())
    run_dir = tmp_path / "runs" / "r"
    cfg = make_cfg(TINY)
    with open_dict(cfg):
        cfg.hydra = {"run": {"dir": str(run_dir)}}
    for error, raised in ((cpu, UserError), (RuntimeError("a bug"), RuntimeError)):
        def make_loaders(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(mbn.engine, "make_loaders", make_loaders)
        Preflight.check(cfg)
        with pytest.raises(raised) as caught:
            train.train(cfg, str(run_dir), False, [])
        if raised is UserError:
            assert caught.value.exit_code == EXIT_ENVIRONMENT and not (tmp_path / "runs").exists()


def test_eval_py_refuses_a_checkpoint_of_another_run_in_a_run_dir(tmp_path):
    """A GN run's checkpoint copied into a BN run's folder was evaluated and printed as if it were
    that run's; the run dir's .hydra/config.yaml (interpolations resolved) names the differences."""
    import shutil

    import eval as eval_script
    from mbn.engine import fit

    base = TINY + ["logger=none", "train.epochs=1", "train.precise_batches=0"]
    for name, norm in (("bn", "bn"), ("gn", "gn")):
        cfg = make_cfg(base + [f"norm={norm}"])
        fit(cfg, str(tmp_path / name))
        (tmp_path / name / ".hydra").mkdir()
        OmegaConf.save(cfg, tmp_path / name / ".hydra" / "config.yaml")
    assert eval_script.main([f"run_dir={tmp_path / 'bn'}", "precise_batches=0"]) == 0  # its own: no difference
    shutil.copy(tmp_path / "gn" / "checkpoint.pt", tmp_path / "bn" / "checkpoint.pt")
    with pytest.raises(UserError, match="is not the checkpoint of the run its folder holds .*norm.name: checkpoint "
                                        "'gn' vs now 'bn'"):
        eval_script.main([f"run_dir={tmp_path / 'bn'}", "precise_batches=0"])
