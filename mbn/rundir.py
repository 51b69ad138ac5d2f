"""A run directory belongs to one run at a time and a finished run is never trained again.

- `RunLock`: `<run dir>/.lock` names the process using the directory (host, pid, the process's
  start time). A second run into the same directory is refused while that process lives; a lock
  left by a killed process (no such pid on this host, or the pid now belongs to a younger process)
  is taken over. Written whole to a temporary file and then hard-linked into place (which fails
  if a lock exists), so two runs starting at once cannot both get it and no run ever reads a
  lock that is still being written: an empty or garbled one was cut short by a crash.
- `finished_run`: a run is finished when its metrics.json says so; the checkpoint is not needed
  (sweeps delete the checkpoints of finished runs, committed runs in results/ have none), and the
  config it was trained with is read from its run record (keys added since take the values the
  tables give them: mbn.results.configs.filled_identity).
"""
import contextlib
import json
import os
import socket
import tempfile
import time

from mbn import UserError
from mbn.cli import environment_fault

LOCK = ".lock"


def _start_time(pid: int):
    """The kernel's start time of a process (Linux /proc), None where unknown: with the pid it
    identifies the process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` — the run dir is this process's until the block ends."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.mine = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder(self):
        """The lock file's content, None if there is none or it is unreadable."""
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def stale(self, holder: dict) -> bool:
        """True when the process that wrote the lock is gone (this host only: another host's
        process cannot be seen from here)."""
        if holder.get("host") != self.mine["host"] or not isinstance(holder.get("pid"), int):
            return not holder  # an empty or garbled lock is a write that was cut short
        if not _alive(holder["pid"]):
            return True
        start = _start_time(holder["pid"])
        return holder.get("start") is not None and start is not None and start != holder["start"]

    def _create(self) -> None:
        """The lock file with its content, in one step: FileExistsError if there is one."""
        text = json.dumps(self.mine)
        fd, tmp = tempfile.mkstemp(prefix=LOCK + ".", dir=os.path.dirname(self.path))
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # readable by whoever looks (mkstemp makes it 0600)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: create exclusively, then write
                with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                    try:
                        f.write(text)
                        f.flush()
                    except OSError:
                        os.remove(self.path)
                        raise
        finally:
            os.remove(tmp)

    def acquire(self) -> None:
        for _ in range(3):
            try:
                self._create()
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile: try again
                if not self.stale(holder):
                    raise UserError(
                        f"{os.path.dirname(self.path)} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or choose "
                        f"another hydra.run.dir (if no run is using it, delete {self.path})")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)  # taken over from a killed process
                continue
            except OSError as e:  # a full or read-only disk: say which file (a write's error names none)
                e.filename = e.filename or self.path
                raise environment_fault(e, "cannot lock the run dir:") from None
            return
        raise UserError(f"could not lock {os.path.dirname(self.path)}: another run keeps taking it; "
                        "choose another hydra.run.dir")

    def release(self) -> None:
        """Remove the lock; where that fails (the disk turned read-only) the error that ended the
        run is the one to report, and the lock, naming this process, is stale once it exits."""
        if self.holder() == self.mine:
            with contextlib.suppress(OSError):
                os.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); move it away to train this run "
                        "again") from None


def finished_run(run_dir: str):
    """(summary, run record or None) of a finished run in run_dir, else None."""
    summary = _read_json(os.path.join(run_dir, "metrics.json"))
    if not isinstance(summary, dict) or not (summary.get("status") == "finished" or summary.get("finished") is True):
        return None
    record = _read_json(os.path.join(run_dir, "run_record.json"))
    return summary, record if isinstance(record, dict) else None
