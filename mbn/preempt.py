"""SLURM's time limit: stop at an epoch boundary with a checkpoint, then requeue the job.

The signal. submitit (Hydra's `hydra/launcher=slurm`, configs/hydra/launcher/slurm.yaml) submits
with `#SBATCH --signal=USR2@<signal_delay_s>`: SLURM sends SIGUSR2 (submitit's
$SUBMITIT_PREEMPT_SIGNAL, USR2 unless set) to the job's tasks that many seconds before the time
limit. submitit's own handler for it would call the launcher's `checkpoint()` (a resubmission of
the same Hydra job: same overrides, same run dir), `scontrol requeue` the job and raise
SystemExit(-1) wherever the main thread happens to be: mid-epoch, so the epoch in progress would
be thrown away. In a plain sbatch job (`--signal=B:USR2@<s>` and `exec python train.py ...`, or
`srun python train.py ...` with `--signal=USR2@<s>`) nothing handles SIGUSR2 and its default
action kills the process.

What we do instead. train.py calls `install` first thing: our handler takes the signal's place
(keeping the handler it displaced: submitit's) and only notes that the signal came.
`mbn.engine.stop_reason` turns that into a stop at the next epoch boundary, after the epoch's
checkpoint, exactly like train.time_limit, and `agreed` gives every DDP rank rank 0's decision.
Then `requeue_and_exit` (rank 0; other ranks just exit):
- under submitit, the displaced submitit handler is called now that the checkpoint is written: it
  requeues through submitit's own mechanism (the launcher's `checkpoint`, counted against
  `max_num_timeout`) and exits as it always does (SystemExit(-1));
- in any other SLURM job ($SLURM_JOB_ID): `scontrol requeue $SLURM_JOB_ID`, which reruns the same
  batch script, then exit EXIT_PREEMPTED;
- outside SLURM: nothing requeues; the message gives the command that continues, exit EXIT_PREEMPTED.
A run the signal finds in its last epoch finishes and is not requeued. A rerun continues only if
it finds the run dir again: a sweep's run dirs are named by their config, a single run's only with
`hydra.run.dir=` on its command line; without it, requeueing would start over from scratch in a
new timestamped dir, again and again, so we print the command and do not requeue.

An epoch longer than the grace period. The only resumable state is an epoch's checkpoint, and a
job still running at its time limit is killed without being requeued. So waiting for the boundary
is right only while it can still come in time: a watchdog thread (rank 0, in a SLURM job) waits
for it up to the grace period ($MBN_SIGNAL_DELAY_S, which slurm.yaml sets to its signal_delay_s;
120 s, hydra-submitit-launcher's default, when unset) less a margin for the requeue itself, then
requeues from the last checkpoint and exits at once. Only the unfinished epoch is lost: it was
lost anyway. Checkpoints are written atomically, so even a requeue during a checkpoint write
leaves the previous one intact.

torchrun. Every rank handles the signal and rank 0's decision is everyone's, so the signal has
to reach rank 0's process. torchrun itself does not handle SIGUSR2 (its default action would end
it): it must run with the signal ignored (a disposition its workers inherit and replace with our
handler, e.g. `trap '' USR2` in the shell that execs it) while SLURM signals every process of the
step. The repository ships no such batch script; tests/test_preempt.py signals rank 0 directly.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped before the end, run the same command again
REASON = "preempted"  # how a stop reason for the signal begins (metrics.json status "preempted")
DEFAULT_DELAY_S = 120.0


class _State:
    def __init__(self):
        self.signum = None        # the signal we handle, once installed
        self.previous = None      # the handler ours displaced (submitit's), called after the checkpoint
        self.received_at = None   # time.monotonic() when the signal came
        self.received = threading.Event()
        self.lock = threading.Lock()
        self.claimed = False      # the current run's ending is decided: requeued, or no requeue needed
        self.stopped = False      # the current run stopped at an epoch boundary because of the signal
        self.run_dir = None
        self.resumable = True     # a rerun of the same command finds this run dir again


_state = _State()


def preempt_signal():
    """submitit's choice of signal (None where the platform has no such signal, e.g. Windows)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def lead() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def in_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def install(run_dir: str, resumable: bool = True) -> None:
    """Handle the time-limit signal for the run about to start in run_dir (called again for each
    run of a multirun in one process: the state of the previous run is reset, the signal kept)."""
    _state.run_dir, _state.resumable = run_dir, resumable
    _state.claimed = _state.stopped = False
    if _state.signum is None:
        signum = preempt_signal()
        if signum is None or threading.current_thread() is not threading.main_thread():
            return
        _state.previous = signal.signal(signum, _handler)
        _state.signum = signum
    elif not requested():
        return  # the watchdog of an earlier run of this process (a multirun) still waits
    # else the signal came during an earlier run: the time left is short and that run's watchdog
    # may be gone, so this run's watchdog requeues at once
    if lead() and (in_slurm() or _submitit_handler()):
        threading.Thread(target=_watchdog, name="mbn-preempt-watchdog", daemon=True).start()


def _handler(signum, frame):
    """Only note it (a time and an Event, no I/O): the loop looks at the next epoch boundary."""
    if _state.received_at is None:
        _state.received_at = time.monotonic()
    _state.received.set()


def requested() -> bool:
    return _state.received.is_set()


def reason() -> str:
    return f"{REASON}: {signal.Signals(_state.signum or preempt_signal()).name}, the SLURM job's time limit is near"


def stopping(why) -> bool:
    """fit calls this when it stops early (on every rank, with the agreed reason): True when the
    reason is the signal; requeue_and_exit then follows."""
    _state.stopped = bool(why) and str(why).startswith(REASON)
    return _state.stopped


def stopped() -> bool:
    return _state.stopped


def disarm() -> None:
    """The run ended without needing a requeue (finished, diverged, refused): the watchdog leaves it."""
    _claim()


def grace_s() -> float:
    return float(os.environ.get("MBN_SIGNAL_DELAY_S") or DEFAULT_DELAY_S)


def give_up_after_s() -> float:
    """How long after the signal the watchdog waits for the epoch boundary: the grace period less
    a margin for `scontrol requeue` (a quarter of it, at most 30 s)."""
    grace = grace_s()
    return grace - min(30.0, grace / 4)


def same_command() -> str:
    args = list(sys.argv)
    if _state.run_dir and not _state.resumable:
        args.append(f"hydra.run.dir={_state.run_dir}")
    return "python " + shlex.join(args)


def requeue_and_exit():
    """After fit stopped at an epoch boundary because of the signal: requeue the job (rank 0) and
    exit in the way the job's manager reads as 'not done, run me again'."""
    if not lead():
        # exit 0: torchrun ends every worker as soon as one exits non-zero, which would kill
        # rank 0 before it requeues; rank 0's status is the job's
        sys.exit(0)
    if not _claim():  # the watchdog is requeueing already and ends the process
        while True:
            time.sleep(60)
    sys.exit(_requeue())


def _claim() -> bool:
    with _state.lock:
        if _state.claimed:
            return False
        _state.claimed = True
        return True


def _submitit_handler():
    """The handler we displaced when it is submitit's (a bound method of its SignalHandler)."""
    owner = getattr(_state.previous, "__self__", None)
    return _state.previous if type(owner).__module__.split(".")[0] == "submitit" else None


def _requeue() -> int:
    """Requeue the job; returns the exit status (submitit's handler exits by itself)."""
    handler = _submitit_handler()
    if handler is not None:
        print("handing the job to submitit, which requeues it; the same job continues from the checkpoint", flush=True)
        handler(_state.signum, None)  # requeues and raises SystemExit; raises UncompletedJobError if it may not
        return EXIT_PREEMPTED
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print(f"not a SLURM job, so nothing requeues it; continue with the same command: {same_command()}", flush=True)
        return EXIT_PREEMPTED
    if not _state.resumable:
        print(f"not requeueing SLURM job {job}: its command does not name the run dir, so a rerun would start "
              f"over; continue with: {same_command()}", flush=True)
        return EXIT_PREEMPTED
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        failed = ((r.stderr or r.stdout).strip() or f"exit {r.returncode}") if r.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        failed = str(e)
    if failed:
        print(f"could not requeue SLURM job {job} ({failed}); continue with the same command: {same_command()}",
              file=sys.stderr, flush=True)
    else:
        print(f"requeued SLURM job {job}: it reruns the same command, which continues from the checkpoint", flush=True)
    return EXIT_PREEMPTED


def _finished() -> bool:
    try:
        with open(os.path.join(_state.run_dir, "metrics.json")) as f:
            return json.load(f).get("finished") is True
    except (OSError, ValueError, TypeError):
        return False


def _watchdog():
    """Requeue from the last checkpoint when the epoch boundary does not come in time."""
    _state.received.wait()
    time.sleep(max(0.0, _state.received_at + give_up_after_s() - time.monotonic()))
    if _finished() or not _claim():
        return
    print(f"the epoch in progress did not end within {give_up_after_s():g} s of the signal (grace "
          f"{grace_s():g} s): requeueing from the last checkpoint; that epoch is trained again", flush=True)
    try:
        code = _requeue()
    except SystemExit as e:  # submitit's way out, raised in this thread: take it for the process
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 -- e.g. submitit's "timed-out too many times"
        print(f"not requeued: {e}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
