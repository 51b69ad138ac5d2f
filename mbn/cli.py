"""The one error boundary of every entry point (train.py, eval.py, scripts/*.py).

A user's mistake or a fault of the environment ends in one line on stderr that names the key or
the file and the fix, with one of the exit statuses below; a programming error keeps its
traceback. Entry points call `run(main)` (or `guarded(main)` inside Hydra's task function, which
must not `sys.exit` on its own errors) and raise `UserError`/`EnvironmentFault` with the message.
This module imports nothing heavy: it is loaded before torch.

Exit statuses (README, "Exit statuses"):"""
import argparse
import errno
import os
import re
import signal
import sys
import threading

from mbn import UserError

EXIT_OK = 0
EXIT_FAILED = 1        # the command ran, but part of its work failed (a sweep block, a GPU check)
EXIT_USAGE = 2         # a mistake in the command or its inputs: key, value, missing or damaged file
EXIT_DIVERGED = 3      # a training run diverged (a non-finite loss)
EXIT_ENVIRONMENT = 4   # the machine: permissions, read-only or full disk, unreachable network
EXIT_PREEMPTED = 75    # stopped early on purpose (SLURM's time limit); the same command continues
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); the same command continues from the last checkpoint

EXIT_STATUSES = {EXIT_OK: "success", EXIT_FAILED: "some of the work failed (the lines above say which)",
                 EXIT_USAGE: "a mistake in the command or its inputs (key, value, missing or damaged file)",
                 EXIT_DIVERGED: "a training run diverged", EXIT_ENVIRONMENT:
                 "the environment: permissions, read-only or full disk, unreachable network",
                 EXIT_PREEMPTED: "stopped early on purpose (time limit); rerun the same command to continue",
                 EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); rerun the same command to continue"}
__doc__ += "".join(f"\n- {code}: {what}" for code, what in EXIT_STATUSES.items()) + "\n"


class EnvironmentFault(UserError):
    """Not the user's input but the machine: a file they cannot read or write, a full or
    read-only disk, a network that does not answer."""
    exit_code = EXIT_ENVIRONMENT


_FIXES = {
    errno.EACCES: "permission denied; make it accessible to this user (ls -l, chmod) or choose another path",
    errno.EPERM: "operation not permitted; make it accessible to this user or choose another path",
    errno.EROFS: "the filesystem is read-only; choose a writable location",
    errno.ENOSPC: "no space left on the device; free space, then rerun the same command",
    errno.EDQUOT: "disk quota exceeded; free space, then rerun the same command",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder where a file was expected; check the path",
    errno.EEXIST: "it exists already; choose another path",
}


def describe_os_error(e: OSError, doing: str = "") -> str:
    """One line for an OSError: what was being done, the file, and the fix for its errno."""
    where = e.filename if e.filename is not None else ""
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    fix = _FIXES.get(e.errno) or (e.strerror or str(e) or type(e).__name__).strip().splitlines()[0]
    if e.errno == errno.EEXIST and isinstance(e.filename, str) and os.path.isfile(e.filename):
        fix = "a file is where a folder belongs; choose another path"  # --out some.md/table.md
    elif e.errno == errno.EEXIST and isinstance(e.filename, str) and os.path.islink(e.filename) \
            and not os.path.exists(e.filename):
        fix = f"a link to {os.readlink(e.filename)}, which does not exist; make that folder or choose another path"
    head = f"{doing} " if doing else ""
    return f"{head}{where}: {fix}" if where else f"{head}{fix}".strip()


def environment_fault(e: OSError, doing: str = "") -> UserError:
    """The UserError for an OSError: a path that is missing, or a file where a folder belongs (or
    the reverse), is the user's input (exit 2); the rest is the machine's (exit 4)."""
    cls = UserError if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST) else EnvironmentFault
    return cls(describe_os_error(e, doing))


def out_of_memory(e: BaseException):
    """The EnvironmentFault for memory that could not be had (MemoryError; torch's CPU allocator and
    CUDA raise RuntimeErrors saying so), None for any other error. The sizes of the command
    (data, batch, model) are the usual cause, and the fix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not isinstance(e, MemoryError) and not (isinstance(e, RuntimeError) and (
            "out of memory" in text.lower() or "can't allocate memory" in text)):
        return None
    size = re.search(r"(?:tried to allocate|Tried to allocate) ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    need = f" (it asked for {size.group(1)})" if size else ""
    return EnvironmentFault(f"out of memory{need}; choose smaller sizes (data.train_size, data.test_size, "
                            "train.batch_size, the model) or free memory, then rerun the same command")


def report(message: str, exit_code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler stopping a job) ends a command as Ctrl-C does: one
    line saying how to continue, instead of a silent death with exit 143 and a stale run-dir lock."""


def _terminated(signum, frame):
    raise Terminated()


def guarded(main, *args, on_interrupt: str = "", **kwargs):
    """Call main(*args, **kwargs); a user mistake, an environment fault, Ctrl-C or SIGTERM ends the
    process with its one line and exit status (SystemExit). `on_interrupt`: what to tell after
    Ctrl-C (e.g. the command that continues). SIGTERM is taken only where nothing else handles it
    (mbn.preempt's SLURM signal keeps its own handler), and only while main runs: a process that
    calls guarded in passing (a test, a joblib worker) gets its own handling back."""
    took = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if took:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return _call(main, args, kwargs, on_interrupt)
    finally:
        if took and signal.getsignal(signal.SIGTERM) is _terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _call(main, args, kwargs, on_interrupt):
    try:
        return main(*args, **kwargs)
    except UserError as e:
        code = report(str(e), e.exit_code)
    except OSError as e:  # a file or the network failed where no code turned it into a UserError
        err = environment_fault(e)
        code = report(str(err), err.exit_code)
    except (MemoryError, RuntimeError) as e:  # memory is the machine's; any other error is a programming one
        err = out_of_memory(e)
        if err is None:
            raise
        code = report(str(err), err.exit_code)
    except KeyboardInterrupt as e:
        what = "interrupted (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\n{what}" + (f"; {on_interrupt}" if on_interrupt else ""), file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)


def run(main, *args, **kwargs) -> None:
    """The last line of a script: `run(main)`. main's return value is the exit status."""
    status = guarded(main, *args, **kwargs)
    sys.exit(status if isinstance(status, int) else EXIT_OK)


def nearest_existing(path: str) -> str:
    """`path` itself if it exists, else its nearest ancestor that does (what makedirs would build on)."""
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def writable_dirs(*named, make: bool = True) -> list:
    """The folders a command writes into, (what, path) pairs: all checked before any is made, so a
    refusal (a file on the path, a folder this user cannot write) leaves nothing behind; then
    made (`make=False`, a dry run: only checked). Returns the absolute paths."""
    for what, path in named:
        base = nearest_existing(path)
        if not os.path.isdir(base):
            raise UserError(f"{what} {path}: {base} is a file, not a folder; choose another path")
        if not os.access(base, os.W_OK | os.X_OK):
            raise EnvironmentFault(f"{what} {path}: {base} is not writable by this user (or its disk is "
                                   "read-only); choose another folder")
    out = []
    for what, path in named:
        try:
            if make:
                os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise environment_fault(e, f"{what}:") from None
        out.append(os.path.abspath(path))
    return out


def existing_dir(path: str, what: str = "--runs") -> str:
    """An input folder that must exist (scripts never create folders for inputs)."""
    if not os.path.isdir(path):
        raise UserError(f"{what} {path}: no such folder" + ("" if not os.path.exists(path) else " (it is a file)"))
    return path


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (UserError, exit 2) instead of the usage and a
    message; --help is unchanged."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def whole_number(minimum: int = 1):
    """An argparse type: an integer >= minimum (counts of seeds, jobs, epochs, steps)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def seconds(text):
    """An argparse type: a positive number of seconds (budgets, time limits)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a time in seconds must be positive, got {text}")
    return value
