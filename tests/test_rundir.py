"""Nothing lost or overwritten (issue 18.3, 18.4): a run dir is locked while a run uses it (a stale
lock of a killed process is taken over), a finished run is recognised by its metrics.json without
a checkpoint and never trained again, a refused command rewrites nothing (Hydra's .hydra/
included), the printed way to continue works, and a run whose test loss is not finite is
"diverged", never "finished"."""
import json
import os
import subprocess
import sys

import pytest

from mbn import UserError
from mbn.engine import fit
from mbn.rundir import LOCK, RunLock
from tests.conftest import REPO, TINY, make_cfg, run_cli
from tests.test_constraints import tree_digest
from tests.test_errors import one_line_error, strict_json

ONE = TINY + ["train.epochs=1", "train.precise_batches=0"]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def finished_dir(tmp_path_factory):
    """A finished one-epoch run with Hydra's files (trained once for the module by train.py)."""
    run_dir = tmp_path_factory.mktemp("finished")
    r = run_cli("train.py", *ONE, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0 and (run_dir / ".hydra" / "overrides.yaml").exists(), r.stderr
    return run_dir


def test_a_second_run_into_a_locked_run_dir_is_refused(tmp_path):
    with RunLock(str(tmp_path)):  # this (live) process holds it
        with pytest.raises(UserError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} on"):
            fit(make_cfg(ONE), str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == [LOCK]  # nothing written by the refused run
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("lock", [
    lambda: {"host": os.uname().nodename, "pid": dead_pid(), "start": 1, "since": "then"},  # process gone
    lambda: {"host": os.uname().nodename, "pid": os.getpid(), "start": -5, "since": "then"},  # pid reused
    lambda: "",                                                                               # cut-short write
])
def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path, lock):
    content = lock()
    (tmp_path / LOCK).write_text(json.dumps(content) if content else "")
    with RunLock(str(tmp_path)) as held:
        assert json.loads((tmp_path / LOCK).read_text()) == held.mine
    assert not (tmp_path / LOCK).exists()


def test_a_finished_run_without_checkpoint_is_never_trained_again(finished_dir, capsys):
    os.remove(finished_dir / "checkpoint.pt")  # as sweep.py does, and as committed runs are
    before = tree_digest(finished_dir)
    summary = fit(make_cfg(ONE), str(finished_dir))
    assert summary["status"] == "finished" and "already finished" in capsys.readouterr().out
    with pytest.raises(UserError, match="holds a finished run of a different config, which is kept.*optim.lr"):
        fit(make_cfg(ONE + ["optim.lr=0.05"]), str(finished_dir))
    with pytest.raises(UserError, match="resume=false needs a fresh directory"):
        fit(make_cfg(ONE + ["resume=false"]), str(finished_dir))
    assert tree_digest(finished_dir) == before and not (finished_dir / LOCK).exists()


def test_a_refused_command_into_a_finished_run_rewrites_nothing_not_even_hydra_files(finished_dir):
    """Case 7: Hydra used to rewrite .hydra/config.yaml and overrides.yaml before the refusal (they
    are now written by train.py once a run has passed its checks: the fixture's run has them)."""
    assert {p.name for p in (finished_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    before = tree_digest(finished_dir)
    line = one_line_error(run_cli("train.py", *ONE, "norm=gn", "optim.lr=0.05", f"hydra.run.dir={finished_dir}"))
    assert "different config" in line and "norm.name: finished run 'bn' vs now 'gn'" in line
    assert tree_digest(finished_dir) == before


def test_the_printed_command_continues_a_run_without_hydra_run_dir(tmp_path):
    """Case 12: `train.stop_after=1` without hydra.run.dir printed `resume=true`, which started over
    in a new timestamped dir; the printed command names the dir."""
    train = os.path.join(REPO, "train.py")
    r = run_cli(train, *TINY, "train.precise_batches=0", "train.stop_after=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    command = r.stdout.split("continue with: ")[1].splitlines()[0]
    assert "hydra.run.dir=" in command
    args = command.split()[2:]  # after "python <train.py>"
    r2 = run_cli(train, *args, "train.stop_after=null", cwd=tmp_path)
    assert r2.returncode == 0 and "resuming" in r2.stdout and "final test error" in r2.stdout, r2.stderr
    runs = [d for d, _, files in os.walk(tmp_path) if "metrics.jsonl" in files]
    assert len(runs) == 1 and strict_json(open(os.path.join(runs[0], "metrics.json")).read())["status"] == "finished"


def test_a_non_finite_test_loss_is_a_divergence_not_a_finished_run(tmp_path):
    """Case 23: weight decay 1e6 keeps the training loss finite (1.6e10) but the test loss is NaN."""
    with pytest.raises(UserError) as e:
        fit(make_cfg(ONE + ["optim.weight_decay=1e6"]), str(tmp_path))
    assert e.value.exit_code == 3 and "the test loss of epoch 1" in str(e.value)
    summary = strict_json((tmp_path / "metrics.json").read_text())
    assert summary["status"] == "diverged" and summary["finished"] is False and summary["test_loss"] is None
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / LOCK).exists()


def test_a_committed_run_from_older_code_is_recognised_as_finished(tmp_path, capsys):
    """results/runs/e3 holds runs whose records predate keys added since (data.input_norm,
    train.precise_batches, ...): rerunning their command into them finds them finished, as the tables
    do (keys added since take their defaults), and a real difference is still refused."""
    import shutil

    name = "cifar10-resnet20-bn-bs128-e3-df0-seed0-802df12f"
    run_dir = tmp_path / name
    shutil.copytree(os.path.join(REPO, "results", "runs", "e3", name), run_dir)
    before = tree_digest(run_dir)
    summary = fit(make_cfg(["model=resnet20", "norm=bn", "train.epochs=3"]), str(run_dir))
    assert summary["finished"] is True and "already finished" in capsys.readouterr().out
    with pytest.raises(UserError, match="different config.*train.epochs: finished run 3 vs now 4"):
        fit(make_cfg(["model=resnet20", "norm=bn", "train.epochs=4"]), str(run_dir))
    assert tree_digest(run_dir) == before


def test_two_runs_locking_at_once_cannot_both_hold_the_dir(tmp_path, monkeypatch):
    """The lock is written whole before it exists under its name: a second run that looks while the
    first is writing it sees either no lock or a whole one, never an empty file it would take for
    the remains of a crash (and take over)."""
    import threading

    import mbn.rundir

    writing, looked = threading.Event(), threading.Event()

    def slow(write):
        def wrapped(*args, **kwargs):  # the first run is slow to write its lock
            if threading.current_thread().name == "first":
                writing.set()
                looked.wait(5)
            return write(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(mbn.rundir.json, "dump", slow(json.dump))
    monkeypatch.setattr(mbn.rundir.json, "dumps", slow(json.dumps))
    outcome = {}

    def take(name):
        try:
            RunLock(str(tmp_path)).acquire()
            outcome[name] = "held"
        except UserError:
            outcome[name] = "refused"

    first = threading.Thread(target=take, args=("first",), name="first")
    first.start()
    writing.wait(5)
    take("second")  # while the first is writing
    looked.set()
    first.join(10)
    assert sorted(outcome.values()) == ["held", "refused"], outcome
    assert [f for f in os.listdir(tmp_path) if f != LOCK] == []  # no temporary file left


def test_a_lock_that_cannot_be_removed_does_not_hide_the_error_that_ended_the_run(tmp_path, monkeypatch):
    """The disk turned read-only mid-run: the run's own error (its metrics or checkpoint could not
    be written) is reported, not the lock's removal; the lock is readable by every user."""
    import errno

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", path)

    with pytest.raises(UserError, match="could not write the checkpoint"):
        with RunLock(str(tmp_path)):
            assert oct((tmp_path / LOCK).stat().st_mode & 0o777) == "0o644"
            monkeypatch.setattr(os, "remove", read_only)
            raise UserError("could not write the checkpoint (the disk turned read-only)")


def test_a_full_disk_when_locking_names_the_lock_and_leaves_nothing(tmp_path, monkeypatch):
    """No space for the lock: one line naming it (exit 4), no empty .lock or temporary file left;
    and on a filesystem without hard links the lock is still written whole."""
    import errno
    import io

    from mbn.cli import EXIT_ENVIRONMENT

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen, real_link = os.fdopen, os.link
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: (os.close(fd), Full())[1])
    with pytest.raises(UserError, match=rf"cannot lock the run dir: {tmp_path / LOCK}: no space left") as e:
        RunLock(str(tmp_path)).acquire()
    assert e.value.exit_code == EXIT_ENVIRONMENT and os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "fdopen", real_fdopen)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_links)
    with RunLock(str(tmp_path)) as held:
        assert json.loads((tmp_path / LOCK).read_text()) == held.mine and os.listdir(tmp_path) == [LOCK]
    monkeypatch.setattr(os, "link", real_link)
