"""Faults: a full disk while checkpointing, and SIGKILL at chosen points of a run (the MBN_FAULT
hook of mbn.tracking.fault_point), then resume: the result equals an uninterrupted run's, bit
for bit (CPU)."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from mbn import UserError
from mbn.cli import EXIT_ENVIRONMENT
from mbn.checkpoint import load_checkpoint
from mbn.engine import fit
from mbn.tracking import atomic_write_text
from tests.conftest import REPO, TINY, make_cfg

RUN = TINY + ["norm=mbn", "train.epochs=3"]  # 4 steps an epoch


def train(run_dir, fault=None):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("MBN_FAULT", None)
    if fault:
        env["MBN_FAULT"] = fault
    return subprocess.run([sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def killed(r):
    return r.returncode == -signal.SIGKILL


def assert_same_run(a_dir, b_dir):
    a, b = load_checkpoint(a_dir / "checkpoint.pt"), load_checkpoint(b_dir / "checkpoint.pt")
    assert a["step"] == b["step"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    timing = ("epoch_time", "images_per_s", "wall_time")
    drop = lambda h: {k: v for k, v in h.items() if k not in timing}  # noqa: E731
    lines = lambda d: [drop(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(a_dir) == lines(b_dir)
    summary = lambda d: drop(json.loads((d / "metrics.json").read_text()))  # noqa: E731
    assert summary(a_dir) == summary(b_dir)
    assert not [f for f in os.listdir(b_dir) if ".tmp" in f]  # no temporary file left behind


def test_killed_while_writing_the_checkpoint_resumes_to_the_identical_result(tmp_path):
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    assert train(straight).returncode == 0
    assert killed(train(faulty, "checkpoint:2"))  # epoch 2's checkpoint is in its temporary file
    assert load_checkpoint(faulty / "checkpoint.pt")["epoch"] == 1
    assert [f for f in os.listdir(faulty) if f.startswith("checkpoint.pt.tmp")]
    r = train(faulty)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr
    assert_same_run(straight, faulty)


@pytest.mark.slow
def test_killed_three_times_in_a_row_resumes_to_the_identical_result(tmp_path):
    """While writing epoch 2's checkpoint; halfway through writing epoch 3's metrics line (after
    its evaluation); then at a random moment of the next run (startup, a step, evaluation or a
    write, whichever it hits). Each rerun continues from the last checkpoint."""
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    t0 = time.perf_counter()
    assert train(straight).returncode == 0
    wall = time.perf_counter() - t0
    assert killed(train(faulty, "checkpoint:2")) and load_checkpoint(faulty / "checkpoint.pt")["epoch"] == 1
    assert killed(train(faulty, "metrics:2")) and load_checkpoint(faulty / "checkpoint.pt")["epoch"] == 2
    assert not (faulty / "metrics.jsonl").read_text().endswith("\n")  # a half line
    delay = random.Random(os.getpid()).uniform(0.2, 0.8) * wall
    proc = subprocess.Popen([sys.executable, "train.py", *RUN, f"hydra.run.dir={faulty}"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = train(faulty)
    assert r.returncode == 0, f"killed after {delay:.2f} s: {r.stderr}"
    assert_same_run(straight, faulty)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """A full disk: the second checkpoint write fails midway (torch reports it as an OSError or,
    writing through a file object, as a RuntimeError)."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial checkpoint bytes")
        raise failure

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError) as e:
        fit(make_cfg(TINY + ["train.epochs=3"]), str(tmp_path))
    message = str(e.value)
    assert f"could not write the checkpoint {tmp_path / 'checkpoint.pt'}" in message and "\n" not in message
    assert "the previous checkpoint is kept" in message and "rerun the same command" in message
    assert e.value.exit_code == EXIT_ENVIRONMENT  # the machine's fault (README), not a mistake in the command
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f] and not (tmp_path / "metrics.json").exists()



def test_a_failed_write_of_any_run_file_is_the_environments_fault(tmp_path, monkeypatch):
    """metrics.json, the run record, metrics.jsonl: a full disk is exit status 4, like the checkpoint's."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as e:
        atomic_write_text(str(tmp_path / "metrics.json"), "{}")
    assert e.value.exit_code == EXIT_ENVIRONMENT and "metrics.json" in str(e.value)
    assert os.listdir(tmp_path) == []
