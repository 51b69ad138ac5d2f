"""SLURM's time limit (mbn/preempt.py): the signal SLURM sends ahead of it (SIGUSR2) reaches a real
`python train.py`; the run stops at an epoch boundary with a checkpoint, says it was preempted,
requeues the job (a fake `scontrol` on PATH records its arguments) and, rerun, ends bitwise where
an uninterrupted run ends (CPU)."""
import contextlib
import glob
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbn import preempt
from mbn.checkpoint import load_checkpoint
from tests.conftest import REPO, TINY
from tests.test_faults import assert_same_run

RUN = TINY + ["norm=mbn", "train.epochs=3"]  # 4 steps an epoch
JOB = "4242"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run, in this process (the same numbers as train.py's: the same thread count)."""
    from mbn.engine import fit
    from tests.conftest import make_cfg

    run_dir = tmp_path_factory.mktemp("straight")
    fit(make_cfg(RUN), str(run_dir))
    return run_dir


def clean_env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, **extra)
    for key in ("SLURM_JOB_ID", "MBN_SIGNAL_DELAY_S", "MBN_FAULT", "MBN_DEADLINE", "RANK", "WORLD_SIZE",
                "SUBMITIT_PREEMPT_SIGNAL"):
        if key not in extra:
            env.pop(key, None)
    return env


@pytest.fixture
def scontrol(tmp_path):
    """A fake scontrol first on PATH; returns (PATH value, log file of its calls)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", log


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


@contextlib.contextmanager
def started(cmd, env):
    """A process in a session of its own, killed with all it started when the test ends (the
    launchers' children included, should an assertion fail midway)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def wait_for(pattern, proc, timeout=300):
    """The first path matching the glob pattern, waiting while proc runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = glob.glob(str(pattern))
        if found:
            return Path(found[0])
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern}: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"no {pattern} after {timeout} s")


def preempted(run_dir, env, args=RUN, when="checkpoint.pt"):
    """Start train.py, send SIGUSR2 once run_dir/`when` exists; returns (returncode, stdout, stderr)."""
    with started([sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"], env) as proc:
        wait_for(run_dir / when, proc)
        proc.send_signal(signal.SIGUSR2)
        out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def stopped_epoch(out):
    m = re.search(r"stopping after epoch (\d+) \(preempted: SIGUSR2", out)
    assert m, out
    return int(m.group(1))


# ------------------------------------------------------------------ the pieces, in this process (first: fast)
@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(preempt, "_state", preempt._State())
    for key in ("RANK", "MBN_SIGNAL_DELAY_S", "SUBMITIT_PREEMPT_SIGNAL"):
        monkeypatch.delenv(key, raising=False)
    return preempt._state


def test_signal_stops_fit_after_the_epoch_with_its_checkpoint(tmp_path, fresh_state, monkeypatch):
    """The loop's side, without a process to signal: with the signal noted, fit ends at the first
    epoch boundary, after that epoch's checkpoint, and says it was preempted."""
    from mbn.engine import fit
    from tests.conftest import make_cfg

    fresh_state.signum = signal.SIGUSR2
    preempt._handler(signal.SIGUSR2, None)
    summary = fit(make_cfg(RUN), str(tmp_path))
    assert summary["status"] == "preempted" and summary["epoch"] == 1 and not summary["finished"]
    assert summary["stop_reason"].startswith("preempted: SIGUSR2") and preempt.stopped()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "preempted"


@pytest.mark.parametrize("grace,gives_up", [(8, 6.0), (120, 90.0), (400, 370.0)])
def test_watchdog_gives_up_a_quarter_of_the_grace_early_at_most_30_s(grace, gives_up, monkeypatch):
    monkeypatch.setenv("MBN_SIGNAL_DELAY_S", str(grace))
    assert preempt.give_up_after_s() == pytest.approx(gives_up)


def test_the_grace_period_counts_from_the_first_signal(fresh_state, monkeypatch):
    clock = iter([100.0, 250.0])
    monkeypatch.setattr(preempt.time, "monotonic", lambda: next(clock))
    preempt._handler(signal.SIGUSR2, None)
    preempt._handler(signal.SIGUSR2, None)  # SLURM may signal again
    assert preempt.requested() and fresh_state.received_at == 100.0


def test_only_rank_0_requeues_the_others_exit_0(fresh_state, scontrol, monkeypatch):
    path, log = scontrol
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        preempt.requeue_and_exit()
    assert e.value.code == 0 and not calls(log)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        preempt.requeue_and_exit()
    assert e.value.code == preempt.EXIT_PREEMPTED and calls(log) == [f"requeue {JOB}"]


@pytest.mark.parametrize("finished", [True, False])
def test_watchdog_leaves_a_finished_run_alone(finished, fresh_state, tmp_path, monkeypatch):
    """The grace period is over: the watchdog requeues and ends the process, unless the run
    finished meanwhile (then nothing is left to continue)."""
    (tmp_path / "metrics.json").write_text(json.dumps({"finished": finished}))
    fresh_state.run_dir = str(tmp_path)
    fresh_state.received_at = time.monotonic() - 1000
    fresh_state.received.set()
    requeued = []

    class Exited(Exception):
        pass

    def exit_now(code):
        raise Exited(code)

    monkeypatch.setattr(preempt, "_requeue", lambda: requeued.append(True) or preempt.EXIT_PREEMPTED)
    monkeypatch.setattr(preempt.os, "_exit", exit_now)
    if finished:
        preempt._watchdog()
        assert not requeued
    else:
        with pytest.raises(Exited):
            preempt._watchdog()
        assert requeued


# ------------------------------------------------------------------ a real train.py, signalled
def test_signal_stops_at_an_epoch_boundary_requeues_and_resumes_bitwise(straight, tmp_path, scontrol):
    path, log = scontrol
    env = clean_env(SLURM_JOB_ID=JOB, PATH=path, MBN_SIGNAL_DELAY_S="600")  # every epoch ends in time
    run_dir = tmp_path / "run"
    rc, out, err = preempted(run_dir, env)  # signalled during epoch 1 or 2 of 3
    assert rc == preempt.EXIT_PREEMPTED, err
    epoch = stopped_epoch(out)
    assert epoch in (1, 2)
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == epoch
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == epoch
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["status"] == "preempted" and summary["finished"] is False and summary["epoch"] == epoch
    assert summary["stop_reason"].startswith("preempted: SIGUSR2")
    assert calls(log) == [f"requeue {JOB}"] and f"requeued SLURM job {JOB}" in out
    # the requeued job: the same command, the same environment, no signal this time
    r = subprocess.run([sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert calls(log) == [f"requeue {JOB}"]  # the finished run is not requeued
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert_same_run(straight, run_dir)


def test_epoch_longer_than_the_grace_is_requeued_at_once_from_the_last_checkpoint(straight, tmp_path, scontrol):
    """A grace of 10 ms: epoch 2 cannot end in it, so the watchdog requeues from epoch 1's
    checkpoint and ends the process mid-epoch (the job would be killed at its time limit)."""
    path, log = scontrol
    env = clean_env(SLURM_JOB_ID=JOB, PATH=path, MBN_SIGNAL_DELAY_S="0.01")
    run_dir = tmp_path / "run"
    rc, out, err = preempted(run_dir, env)  # signalled as epoch 2 starts
    assert rc == preempt.EXIT_PREEMPTED, err
    assert "did not end within" in out and "stopping after epoch" not in out
    assert calls(log) == [f"requeue {JOB}"]
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1 and not (run_dir / "metrics.json").exists()
    r = subprocess.run([sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert calls(log) == [f"requeue {JOB}"]
    assert_same_run(straight, run_dir)


def test_signal_outside_slurm_stops_without_requeue_and_prints_the_same_command(tmp_path, scontrol):
    path, log = scontrol
    run_dir = tmp_path / "run"
    rc, out, err = preempted(run_dir, clean_env(PATH=path))
    assert rc == preempt.EXIT_PREEMPTED, err
    epoch = stopped_epoch(out)
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == epoch
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "preempted"
    assert not calls(log)
    command = "python " + shlex.join(["train.py", *RUN, f"hydra.run.dir={run_dir}"])
    assert f"nothing requeues it; continue with the same command: {command}\n" in out


def test_signal_in_the_last_epoch_lets_the_run_finish_without_requeue(tmp_path, scontrol):
    path, log = scontrol
    run_dir = tmp_path / "run"
    args = TINY + ["norm=bn", "train.epochs=1"]
    rc, out, err = preempted(run_dir, clean_env(SLURM_JOB_ID=JOB, PATH=path, MBN_SIGNAL_DELAY_S="600"), args,
                             when="run_record.json")  # written just before the first (and last) epoch
    assert rc == 0, err
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert not calls(log) and "stopping" not in out


def test_a_requeue_that_would_start_over_is_refused(tmp_path, scontrol, monkeypatch, capsys):
    """A single run whose command does not name its run dir (a timestamped one): rerunning it
    would start a new run, every time the job is requeued."""
    path, log = scontrol
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    monkeypatch.setattr(sys, "argv", ["train.py", "norm=mbn"])
    monkeypatch.setattr(preempt, "_state", preempt._State())
    preempt._state.run_dir, preempt._state.resumable = str(tmp_path), False
    assert preempt._requeue() == preempt.EXIT_PREEMPTED
    assert not calls(log)
    assert f"continue with: python train.py norm=mbn hydra.run.dir={tmp_path}" in capsys.readouterr().out
    preempt._state.resumable = True
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/sh\necho 'Requeue of job is not allowed' >&2\nexit 1\n")
    assert preempt._requeue() == preempt.EXIT_PREEMPTED
    assert "could not requeue SLURM job 4242 (Requeue of job is not allowed)" in capsys.readouterr().err


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def descendants(pid):
    out = []
    for c in children(pid):
        out += [c, *descendants(c)]
    return out


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def environ(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)


@pytest.mark.slow
def test_under_submitit_the_job_is_requeued_by_submitit_and_ends_bitwise(straight, tmp_path):
    """hydra-submitit-launcher's local executor runs the job as SLURM would (its controller reruns
    a job that submitit requeued): SIGUSR2 to the job's process, the run stops at an epoch
    boundary, submitit's handler (called after the checkpoint) requeues the launcher's
    `checkpoint` — the same Hydra job — and the rerun resumes and finishes."""
    sweep = tmp_path / "sweep"
    with started([sys.executable, "train.py", "-m", *RUN, "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"],
                 clean_env(MBN_SIGNAL_DELAY_S="600")) as proc:
        ckpt = wait_for(sweep / "*" / "checkpoint.pt", proc)
        job = [p for p in descendants(proc.pid) if "submitit.core._submit" in cmdline(p)]
        assert len(job) == 1
        os.kill(job[0], signal.SIGUSR2)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(open(f).read() for f in sorted(glob.glob(str(sweep / ".submitit" / "*" / "*_log.*"))))
    assert re.search(r"stopping after epoch [12] \(preempted: SIGUSR2", logs), logs
    assert "handing the job to submitit" in logs and "Requeued job" in logs and "resuming" in logs, logs
    assert "not requeued" not in logs
    run_dir = ckpt.parent
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert_same_run(straight, run_dir)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_ranks_stop_at_rank_0s_boundary_and_rank_0_requeues(tmp_path, scontrol):
    """torchrun, 2 CPU processes; the signal reaches rank 0 only: rank 1 stops at the same epoch
    boundary all the same (rank 0's decision), only rank 0 requeues and exits EXIT_PREEMPTED; rank 1
    exits 0, so that torchrun does not end rank 0 before its requeue."""
    path, log = scontrol
    run_dir = tmp_path / "run"
    env = clean_env(SLURM_JOB_ID=JOB, PATH=path, MBN_SIGNAL_DELAY_S="600", OMP_NUM_THREADS="1",
                    MASTER_ADDR="127.0.0.1")
    with started([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                  f"--master_port={free_port()}", "train.py", *RUN, "device=cpu", f"hydra.run.dir={run_dir}"],
                 env) as proc:
        wait_for(run_dir / "checkpoint.pt", proc)
        ranks = {environ(p).get("RANK"): p for p in descendants(proc.pid) if "train.py" in cmdline(p)}
        os.kill(ranks["0"], signal.SIGUSR2)
        out, err = proc.communicate(timeout=300)  # a rank that went on would wait for the other
    assert proc.returncode != 0  # torchrun reports its workers' exits:
    assert err.count(f"exitcode  : {preempt.EXIT_PREEMPTED} ") == 1, err  # rank 0 stopped; neither hung or crashed
    assert "rank      : 0 " in err and "rank      : 1 " not in err, err
    epoch = stopped_epoch(out)
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == epoch
    assert calls(log) == [f"requeue {JOB}"]
