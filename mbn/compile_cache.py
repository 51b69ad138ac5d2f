"""A warm start for torch.compile: its on-disk caches in one folder that travels (perf.compile_cache).

Inductor writes what it compiles for a graph (the FX-graph cache: generated kernels keyed by the
graph, its input shapes, the compile config, the torch and Triton versions and the device),
AOTAutograd's joint graphs and its autotuning choices under TORCHINDUCTOR_CACHE_DIR (PyTorch's
"Compile Time Caching Configuration" recipe). Its default is a per-user folder in /tmp, which a
fresh machine, a new SLURM job or the next GPU slice does not have, so every configuration
compiles again (about a minute each on an H100). Pointed at a folder that is carried from one job
to the next, a second process with the same graphs loads them instead
(torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]). Entries are checked against the
versions and the device, so a stale or foreign folder costs misses, never wrong kernels; Inductor
writes them atomically, so concurrent runs may share a folder."""
import os
import sys
from typing import Optional

from mbn.cli import EnvironmentFault, environment_fault

ENV = "MBN_COMPILE_CACHE"      # the folder when perf.compile_cache is null (sweeps set it for every job)
TORCH_ENV = "TORCHINDUCTOR_CACHE_DIR"


def resolve(folder: Optional[str] = None) -> Optional[str]:
    """The folder to use: `folder`, else $MBN_COMPILE_CACHE, else None (torch's own default)."""
    folder = folder or os.environ.get(ENV) or None
    return os.path.abspath(os.path.expanduser(folder)) if folder else None


def use(folder: Optional[str] = None, key: str = "perf.compile_cache") -> Optional[str]:
    """Point this process's torch.compile caches, and those of the processes it starts, at
    `folder` (None: $MBN_COMPILE_CACHE; neither: torch's default, and None is returned). Call it
    before the first compilation. `key` names the setting in the error for a folder that cannot
    be written."""
    path = resolve(folder)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise environment_fault(e, f"{key}:") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise EnvironmentFault(f"{key}: {path} is not writable by this user; choose a writable folder "
                               f"(or leave {key} unset for torch's own cache)")
    changed = os.environ.get(TORCH_ENV) != path
    os.environ[TORCH_ENV] = os.environ[ENV] = path
    if changed and "torch._inductor.utils" in sys.modules:
        # a process that compiled before keeps in-memory handles on the old folder (as torch's own
        # temporary_cache_dir does, forget them)
        clear = getattr(sys.modules["torch._inductor.utils"], "clear_caches", None)
        if clear is not None:
            clear()
    return path

