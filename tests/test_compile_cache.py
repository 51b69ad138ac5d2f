"""perf.compile_cache (mbn/compile_cache.py): torch.compile's caches in a folder that a second
process finds, and the wiring from the config, the sweeps and the scripts to it."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mbn import UserError, compile_cache
from tests.conftest import REPO, TINY, make_cfg


@pytest.fixture
def env(monkeypatch):
    """Whatever a test points the caches at is undone afterwards."""
    for name in (compile_cache.ENV, compile_cache.TORCH_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_use_points_inductor_at_the_folder(tmp_path, env):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    before = os.environ.get(compile_cache.TORCH_ENV)  # importing Inductor may set torch's default already
    assert compile_cache.use(None) is None and os.environ.get(compile_cache.TORCH_ENV) == before  # torch's own
    path = compile_cache.use(str(tmp_path / "cache"))
    assert path == str(tmp_path / "cache") and os.path.isdir(path)
    assert cache_dir() == path and os.environ[compile_cache.ENV] == path  # processes started now inherit it
    env.setenv(compile_cache.ENV, str(tmp_path / "from-env"))
    assert compile_cache.use(None) == str(tmp_path / "from-env")  # perf.compile_cache=null: $MBN_COMPILE_CACHE


def test_a_folder_that_cannot_be_made_is_one_line_naming_the_key(tmp_path, env):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match=r"^perf.compile_cache: .*a-file/cache: a part of the path is a file"):
        compile_cache.use(str(tmp_path / "a-file" / "cache"))


def test_train_uses_perf_compile_cache_before_compiling(tmp_path, env):
    from mbn.engine import Run

    folder = tmp_path / "cache"
    Run(make_cfg(TINY + ["perf.compile=true", f"perf.compile_cache={folder}"]), torch.device("cpu"))
    assert os.environ[compile_cache.TORCH_ENV] == str(folder) and folder.is_dir()


CHILD = """
import json, sys, time
import torch
from mbn import compile_cache
compile_cache.use(sys.argv[1])
from torch._dynamo.utils import counters
torch.manual_seed(0)
f = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()))
t0 = time.perf_counter()
f(torch.randn(4, 8))
print(json.dumps({"compile_s": time.perf_counter() - t0, **counters["inductor"]}))
"""


@pytest.mark.slow  # two interpreters and a C++ compile: 12-20 s on two idle cores
def test_a_second_process_hits_the_cache_and_compiles_faster(tmp_path):
    """Two fresh processes compile the same module into one folder: the first misses and writes
    it, the second finds it (Inductor's FX-graph cache counters) and compiles in a fraction of the
    time. The second runs from another directory: the entries do not depend on where the code is."""
    env = dict(os.environ, PYTHONPATH=REPO, TORCHINDUCTOR_COMPILE_THREADS="1")
    for name in (compile_cache.ENV, compile_cache.TORCH_ENV):
        env.pop(name, None)
    cache, rows = str(tmp_path / "cache"), []
    for cwd in (REPO, str(tmp_path)):
        r = subprocess.run([sys.executable, "-c", CHILD, cache], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first, second = rows
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("fxgraph_cache_hit", 0) == 0
    assert second.get("fxgraph_cache_hit", 0) >= 1 and second.get("fxgraph_cache_miss", 0) == 0
    assert second["compile_s"] < 0.75 * first["compile_s"], rows
