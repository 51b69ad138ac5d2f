import copy
import functools
import os
import subprocess
import sys

# One intra-op thread, here and in every process a test starts (inherited): the tests' tensors are
# tiny, and on a loaded two-core machine two threads wait for each other (a test training run
# measured 4x slower with two). MBN_TEST_THREADS=<n> gives n.
os.environ["OMP_NUM_THREADS"] = os.environ.get("MBN_TEST_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from mbn.config import register_configs  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
register_configs()

# a few seconds on a CPU: ResNet-20 on 128 synthetic images, batch 32
TINY = ["experiment=smoke", "data.train_size=128", "data.test_size=64", "train.batch_size=32",
        "train.eval_batch_size=64", "train.epochs=2", "train.progress=false"]


@pytest.fixture
def float64():
    """Tensors default to float64 within the test (numerics against closed forms)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_cfg(overrides=()):
    """The train config composed with `overrides`, the caller's own copy (tests may change it)."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.lru_cache(maxsize=None)
def _composed(overrides):
    """Hydra composes each distinct override list once per session (~0.2 s a compose)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def resnet8(monkeypatch):
    """Within the test, model=resnet20 builds the CIFAR ResNet at depth 8: one block a stage, so
    every kind of block ResNet-20 has (identity and option-A shortcuts), in 7 layers instead of 19."""
    import models
    from models.resnet_cifar import CifarResNet

    monkeypatch.setitem(models.MODELS, "resnet20", functools.partial(CifarResNet, 8))


@pytest.fixture
def cfg_factory():
    return make_cfg


def run_cli(*args, cwd=REPO, timeout=300):
    env = dict(os.environ, HYDRA_FULL_ERROR="", PYTHONPATH=REPO)
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
