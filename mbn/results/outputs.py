"""Writing outputs: a committed table or figure is never replaced by one made from other runs
(without `force`), and every output is written atomically (a reader never sees half a file)."""
import os
import subprocess
import tempfile
from typing import List, Optional

from mbn import UserError


def write_atomic(path: str, data) -> None:
    """Write `data` — text, or a function that writes to a binary file (a figure's savefig) — to a
    temporary file in the same folder, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb" if callable(data) else "w", encoding=None if callable(data) else "utf-8") as f:
            data(f) if callable(data) else f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared results folder from its readers
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def copy_atomic(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        data = f.read()
    write_atomic(dst, lambda out: out.write(data))


def tracked(path: str) -> bool:
    """Whether git tracks this file (it is committed, or staged to be)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return False
    try:
        r = subprocess.run(["git", "-C", folder, "ls-files", "--error-unmatch", os.path.basename(path)],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


PNG_RUNS_KEY = "mbn runs"


def recorded_runs(path: str) -> Optional[set]:
    """The run names an output says it was made from (a table's `## Runs` list, a figure's PNG
    text chunk); None when it does not say."""
    if path.endswith(".png"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                text = getattr(im, "text", {}).get(PNG_RUNS_KEY)
        except OSError:
            return None
        return set(text.split()) if text is not None else None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if "## Runs" not in lines:
        return None
    return {ln[3:-1] for ln in lines[lines.index("## Runs") + 1:] if ln.startswith("- `") and ln.endswith("`")}


def check_replace(path: str, runs: List[dict], force: bool, made_from: Optional[str] = None) -> None:
    """Refuse (UserError) to replace a committed output made from other runs than `runs`, unless
    `force`. `made_from`: the file that records the runs (a table's .md for its .csv)."""
    if force or not os.path.exists(path) or not tracked(path):
        return
    source = made_from or path
    before = recorded_runs(source) if os.path.exists(source) else None
    now = {r["name"] for r in runs}
    if before == now:
        return
    why = "does not list the runs it was made from" if before is None else (
        f"was made from {len(before)} runs, {len(before - now)} of them not among the {len(now)} found now")
    raise UserError(f"{os.path.relpath(path)} is committed and {why}; pass --force to replace it, "
                    "or write elsewhere with --out")
