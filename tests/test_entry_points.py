"""One error boundary per entry point (issue 18.2, 18.5 and the "also" list): Hydra's own errors,
files this user may not read, paths that are files, Ctrl-C, an unreachable W&B server; --help
and refusals before torch is imported; logger=none reports progress; W&B gets per-step curves
read once per epoch."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mbn import UserError
from mbn.cli import EXIT_ENVIRONMENT, EXIT_INTERRUPTED, EnvironmentFault
from mbn.data import load_cifar
from mbn.engine import fit
from tests.conftest import REPO, TINY, make_cfg, run_cli
from tests.test_errors import one_line_error

ONE = TINY + ["train.epochs=1", "train.precise_batches=0"]


# ------------------------------------------------------------------ the command line
@pytest.mark.parametrize("args,says", [
    (["train.batchsize=32"], "train.batchsize: unknown key; did you mean train.batch_size?"),
    (["+optim.lrr=0.1"], "optim.lrr=0.1: unknown key; did you mean optim.lr?"),
    (["train.device=cpu"], "train.device: unknown key; did you mean device?"),  # a key of another section
    (["data=synthetic", "+train.seed=1"], "train.seed=1: unknown key; did you mean seed?"),  # not data.seed
    (["train.lr=0.05"], "train.lr: unknown key; did you mean optim.lr?"),
    (["train.epochs=abc"], "train.epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    (["norm=mbm"], "norm=mbm: no such option; did you mean mbn?"),
    (["train.epochs=[1"], "cannot read the override"),
    (["schedule.milestones=[]", "norm=mbn"], "norm.lam_milestones has 0 ([], from schedule.milestones)"),
    (["data=cifar10", "data.num_classes=100"], "must be 10 with data.name=cifar10"),
    (["perf.precision=fp16"], "perf.precision=fp16: autocast precision must be one of auto, fp32, bf16"),
    (["logger.name=tensorboard"], "logger.name=tensorboard: "),
    (["device=gpu"], "device=gpu: the device must be auto, cpu, cuda or cuda:N"),
    (["seed=1", "-m", "seed=0,1"], "unrecognized arguments: seed=0,1 hydra.run.dir="),  # Hydra's argparse
])
def test_mistakes_in_the_command_end_in_one_line_before_torch(tmp_path, args, says):
    """Hydra's errors and the declared constraints alike: one line, exit 2, no run dir, and the
    process never imported torch (python -X importtime lists every import)."""
    r = run_cli("-X", "importtime", "train.py", *args, f"hydra.run.dir={tmp_path / 'run'}")
    imports = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert imports and not [line for line in imports if line.rstrip().endswith("| torch")]
    r.stderr = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    assert says in one_line_error(r)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("var,value,says", [
    ("MBN_DATA_ROOT", "", "data.root=, from $MBN_DATA_ROOT: "),                 # set, but empty
    ("MBN_COMPILE_CACHE", __file__, f"perf.compile_cache={__file__}, from $MBN_COMPILE_CACHE: "),  # a file
])
def test_a_folder_from_an_environment_variable_is_checked_and_named(tmp_path, monkeypatch, var, value, says):
    """A key whose default comes from the environment is checked like one given on the command
    line, and the line names the variable: nothing is created."""
    monkeypatch.setenv(var, value)
    r = run_cli("train.py", "data=cifar10", "logger=none", f"hydra.run.dir={tmp_path / 'run'}")
    assert says in one_line_error(r) and "must be" in r.stderr and "a folder" in r.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_is_taken_only_while_main_runs():
    """guarded turns SIGTERM into its one line while main runs, and gives the process its own
    handling back after (a test or a joblib worker that calls it in passing)."""
    import signal

    from mbn import cli

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        seen = []
        assert cli.guarded(lambda: seen.append(signal.getsignal(signal.SIGTERM)) or 7) == 7
        assert seen == [cli._terminated] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with pytest.raises(SystemExit):
            cli.guarded(lambda: (_ for _ in ()).throw(UserError("no")))
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        mine = lambda signum, frame: None  # noqa: E731  (someone else's handler is left alone)
        signal.signal(signal.SIGTERM, mine)
        seen.clear()
        cli.guarded(lambda: seen.append(signal.getsignal(signal.SIGTERM)))
        assert seen == [mine] and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_output_folders_are_all_checked_before_any_is_made(tmp_path, monkeypatch):
    """cli.writable_dirs: a file on one path, or a folder this user cannot write, refuses the
    command before any of its folders exists; otherwise all are made."""
    from mbn.cli import writable_dirs

    afile = tmp_path / "a-file"
    afile.write_text("")
    first = tmp_path / "runs" / "e30"
    with pytest.raises(UserError, match=f"--compile-cache {afile / 'cache'}: {afile} is a file, not a folder"):
        writable_dirs(("--runs", str(first)), ("--compile-cache", str(afile / "cache")))
    assert not (tmp_path / "runs").exists() and afile.read_text() == ""
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path / "locked"))
    (tmp_path / "locked").mkdir()
    with pytest.raises(EnvironmentFault, match="is not writable by this user"):
        writable_dirs(("--runs", str(first)), ("--out", str(tmp_path / "locked" / "out")))
    assert not (tmp_path / "runs").exists()
    assert writable_dirs(("--runs", str(first)), make=False) == [str(first)] and not first.exists()  # a dry run
    assert writable_dirs(("--runs", str(first)), ("--out", str(tmp_path / "out"))) == [str(first), str(tmp_path / "out")]
    assert first.is_dir() and (tmp_path / "out").is_dir()


def test_a_folder_made_where_a_file_is_says_so(tmp_path):
    """os.makedirs on a path that is a file raises EEXIST: the line says a file is where a folder
    belongs (bench.py --out table.md/x said 'it exists already'); EEXIST on anything else keeps
    its own fix."""
    from mbn.cli import environment_fault

    afile = tmp_path / "table.md"
    afile.write_text("")
    with pytest.raises(FileExistsError) as caught:
        os.makedirs(afile, exist_ok=True)
    err = environment_fault(caught.value)
    assert str(err) == f"{afile}: a file is where a folder belongs; choose another path" and err.exit_code == 2
    assert str(environment_fault(FileExistsError(17, "File exists", str(tmp_path)))).endswith("it exists already; "
                                                                                                "choose another path")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # hydra.run.dir=<a link to a removed folder>
    with pytest.raises(FileExistsError) as caught:
        os.makedirs(tmp_path / "dangling", exist_ok=True)
    assert str(environment_fault(caught.value)).endswith(f"a link to {tmp_path / 'gone'}, which does not exist; "
                                                         "make that folder or choose another path")


def test_help_of_both_entry_points_needs_no_torch():
    for script, names in (("train.py", ["gn", "mabn", "cbn", "rbn", "vgg16_imagenet", "train.precise_batches="]),
                          ("eval.py", ["run_dir=", "ckpt=", "eval_stats=all", "precise_batches=200", "data.root="])):
        r = run_cli("-X", "importtime", script, "--help")
        assert r.returncode == 0 and all(n in r.stdout for n in names), r.stdout
        assert not [line for line in r.stderr.splitlines() if line.rstrip().endswith("| torch")], script
        assert "Exit statuses" in r.stdout


@pytest.mark.parametrize("args,says", [
    ([], "give run_dir=<dir> or ckpt=<file>"),
    (["ckpt=x", "precise_batch=3"], "precise_batch: unknown key; did you mean precise_batches?"),
    (["ckpt=x", "root=/data"], "root: unknown key; did you mean data.root?"),
    (["ckpt=x", "eval_stats=best"], "eval_stats=best: "),
    (["ckpt=x", "precise_batches=-1"], "precise_batches=-1: "),
    (["ckpt"], "arguments are key=value"),
])
def test_eval_py_checks_its_declared_keys(args, says):
    assert says in one_line_error(run_cli("eval.py", *args))


def test_eval_py_on_a_finished_run_without_checkpoint_says_where_its_results_are(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    assert "its test errors are in its metrics.json" in one_line_error(run_cli("eval.py", f"run_dir={tmp_path}"))


def test_a_run_dir_on_a_read_only_filesystem_is_one_line(tmp_path, monkeypatch, capsys):
    """Case 8 (in-process: the preflight check train.py's Hydra runs; a real read-only mount needs root)."""
    from mbn.validate import Preflight

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(os, "makedirs", read_only)
    from omegaconf import open_dict

    cfg = make_cfg(TINY)
    with open_dict(cfg):
        cfg.hydra = {"run": {"dir": str(tmp_path / "ro" / "run")}}
    with pytest.raises(SystemExit) as e:
        Preflight().on_run_start(config=cfg)
    err = capsys.readouterr().err.strip()
    assert e.value.code == EXIT_ENVIRONMENT and err.count("\n") == 0
    assert "hydra.run.dir" in err and "read-only; choose a writable location" in err


# ------------------------------------------------------------------ data
def test_an_unreadable_data_root_is_not_reported_missing(tmp_path, monkeypatch):
    """Case 4 (root can read anything, so the permission error is simulated)."""
    from tests.test_data import write_fake_cifar

    write_fake_cifar(str(tmp_path), "cifar10")
    real_stat = os.stat

    def stat(path, *a, **k):
        if str(path) == str(tmp_path / "cifar-10-batches-py"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(EnvironmentFault) as e:
        load_cifar("cifar10", str(tmp_path))
    assert "permission denied" in str(e.value) and "not found" not in str(e.value) and "data.root" in str(e.value)
    monkeypatch.setattr(os, "stat", real_stat)
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", a[0])))
    with pytest.raises(EnvironmentFault, match="permission denied") as e:
        load_cifar("cifar10", str(tmp_path))
    assert "rebuild" not in str(e.value)


def test_a_data_root_that_is_a_file_or_does_not_exist(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(UserError, match=f"data.root={f} is a file, not a folder"):
        load_cifar("cifar10", str(f), download=True)
    deep = tmp_path / "nonexistent" / "deep" / "path"  # MBN_DATA_ROOT=... used to be created by torchvision
    with pytest.raises(UserError, match="does not exist, nor does"):
        load_cifar("cifar10", str(deep), download=True)
    assert not (tmp_path / "nonexistent").exists()


# ------------------------------------------------------------------ Ctrl-C, logger=none
@pytest.mark.parametrize("signum, said", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "interrupted (SIGTERM)")])
def test_ctrl_c_is_one_line_with_the_command_that_continues(tmp_path, signum, said):
    """SIGTERM (kill, timeout) too: it ended the run silently with 143 and left its .lock."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.Popen([sys.executable, "train.py", *TINY, "train.epochs=50", "logger=none",
                          f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()  # "training ... run dir <dir>": the run has started
    assert "run dir" in first, first + p.stderr.read()
    time.sleep(1)
    p.send_signal(signum)
    out, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED and "Traceback" not in err, err
    assert err.strip().splitlines() == [f"{said}; continue with: python train.py {' '.join(TINY)} "
                                        f"train.epochs=50 logger=none hydra.run.dir={tmp_path}"]
    assert not (tmp_path / ".lock").exists()


def test_logger_none_still_reports_where_the_run_goes_and_each_epoch(tmp_path, capsys):
    fit(make_cfg(TINY + ["logger=none", "train.precise_batches=0"]), str(tmp_path))
    out = capsys.readouterr().out
    assert f"run dir {tmp_path}" in out.splitlines()[0]
    assert "epoch 1/2  train loss" in out and "epoch 2/2  train loss" in out


# ------------------------------------------------------------------ W&B
def test_an_unreachable_wandb_server_falls_back_to_offline_within_seconds(tmp_path, monkeypatch, capsys):
    """Case 14: an API key but no server; an explicit logger.mode=online ends in one line."""
    import wandb

    from mbn.tracking import WandbTracker

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE", raising=False)
    modes = []

    class FakeRun:
        id, summary = "fake", {}

        def define_metric(self, *a, **k):
            pass

    monkeypatch.setattr(wandb, "init", lambda **k: modes.append(k["mode"]) or FakeRun())
    cfg = make_cfg(TINY + ["logger=wandb"])
    t0 = time.perf_counter()
    WandbTracker(cfg, {}, {}, str(tmp_path), [])
    assert modes == ["offline"] and time.perf_counter() - t0 < 10
    assert "127.0.0.1:9 does not answer" in capsys.readouterr().out
    with pytest.raises(EnvironmentFault, match="logger.mode=online; log offline with logger.mode=offline"):
        WandbTracker(make_cfg(TINY + ["logger=wandb", "logger.mode=online"]), {}, {}, str(tmp_path), [])


def test_wandb_gets_per_step_curves_read_once_per_epoch(tmp_path, monkeypatch):
    """Case 18.5: every step's training loss and error at its global step, equal to a plain loop's."""
    from mbn import tracking

    logged = []

    class FakeRun:
        id, summary = "fake", {}

        def define_metric(self, *a, **k):
            pass

        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            pass

    def init(self, cfg, cfg_dict, record, run_dir, overrides, resume_id=None, mode=None):
        self.run, self.id = FakeRun(), "fake"

    monkeypatch.setattr(tracking.WandbTracker, "__init__", init)
    summary = fit(make_cfg(TINY + ["logger=wandb", "train.precise_batches=0"]), str(tmp_path))
    steps = [(s, v) for s, v in logged if "step/train_loss" in v]
    per_epoch = summary["total_steps"] // 2
    assert [s for s, _ in steps] == list(range(1, summary["total_steps"] + 1))
    assert all(v["global_step"] == s for s, v in steps)
    epochs = [v for _, v in logged if "train/loss" in v]
    for e, line in enumerate(epochs):  # the per-step values average to the epoch's (equal batches)
        chunk = [v for s, v in steps if e * per_epoch < s <= (e + 1) * per_epoch]
        assert sum(v["step/train_loss"] for v in chunk) / per_epoch == pytest.approx(line["train/loss"], rel=1e-12)
        assert sum(v["step/train_err"] for v in chunk) / per_epoch == pytest.approx(line["train/err"], rel=1e-12)


def test_step_curves_equal_a_plain_loop():
    """The device buffer holds each step's loss and error, exactly as a plain loop computes them
    (the same float32 ops in the same order)."""
    import copy

    import torch.nn.functional as F

    from mbn.data import Batches, synthetic
    from mbn.step import TrainStep

    train, _ = synthetic(10, 96, 8, seed=3)
    batches = Batches(train, 32, torch.zeros(3), torch.ones(3), "cpu", True, False, seed=1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    twin = copy.deepcopy(model)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01), batches, False)
    opt = torch.optim.SGD(twin.parameters(), lr=0.01)
    step.reset()
    batches.start_epoch(0)
    for _ in range(len(batches)):
        step()
    losses, errs = step.step_curves(len(batches))
    assert not step.step_loss.requires_grad and not step.step_err.requires_grad  # detached accumulators
    for i, (x, y) in enumerate(batches.epoch(0)):
        opt.zero_grad()
        out = twin(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        assert losses[i] == loss.item()
        assert errs[i] == pytest.approx(100.0 * (out.argmax(1) != y).double().mean().item(), rel=1e-15)


def test_readme_lists_the_exit_statuses_of_mbn_cli():
    from mbn.cli import EXIT_STATUSES

    table = "\n".join(["| status | meaning |", "|---|---|"] + [f"| {c} | {w} |" for c, w in EXIT_STATUSES.items()])
    assert table in open(os.path.join(REPO, "README.md")).read()


def test_eval_py_takes_run_dir_or_ckpt_not_both(tmp_path):
    """Both given, one would silently win: refused like neither (in process: parse() needs no torch)."""
    import eval as eval_script

    with pytest.raises(UserError, match=r"give run_dir=<dir> or ckpt=<file> \(one of them\)"):
        eval_script.parse([f"run_dir={tmp_path}", f"ckpt={tmp_path / 'checkpoint.pt'}"])
    assert eval_script.parse([f"ckpt={tmp_path / 'checkpoint.pt'}"]).run_dir is None


def test_a_run_refused_for_an_unreachable_wandb_server_writes_nothing(tmp_path, monkeypatch):
    """logger.mode=online without a server is refused before the run writes its record, its
    metrics.jsonl or Hydra's files (on_start): the run dir stays as it was."""
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE", raising=False)
    started = []
    with pytest.raises(EnvironmentFault, match="127.0.0.1:9 does not answer"):
        fit(make_cfg(ONE + ["logger=wandb", "logger.mode=online"]), str(tmp_path / "run"),
            on_start=lambda: started.append(True))
    assert not started and os.listdir(tmp_path / "run") == []  # fit made it for its lock; train.py removes it
