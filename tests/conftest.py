import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mbn.config import register_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
register_configs()

# a few seconds on a CPU: ResNet-20 on 128 synthetic images, batch 32
TINY = ["experiment=smoke", "data.train_size=128", "data.test_size=64", "train.batch_size=32",
        "train.eval_batch_size=64", "train.epochs=2", "train.progress=false"]


@pytest.fixture
def float64():
    """Tensors default to float64 within the test (numerics against closed forms)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_cfg(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def cfg_factory():
    return make_cfg


def run_cli(*args, cwd=REPO, timeout=300):
    env = dict(os.environ, HYDRA_FULL_ERROR="", PYTHONPATH=REPO)
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
