"""The fast path (compile, channels_last, bf16) against the exact one, and the benchmark script."""
import json

import pytest
import torch

from mbn.checkpoint import load_checkpoint
from mbn.build import resolve_perf
from mbn.engine import fit
from tests.conftest import TINY, make_cfg, run_cli

FEW_STEPS = TINY + ["train.steps=3", "train.epochs=1", "norm=mbn", "logger=none"]


def run(tmp_path, name, extra):
    fit(make_cfg(FEW_STEPS + extra), str(tmp_path / name))
    return load_checkpoint(tmp_path / name / "checkpoint.pt")


def assert_same_training(a, b, rtol, atol):
    """Float32 round-off only: a different memory layout or kernel order moves the weights by ~1e-5
    after 3 SGD steps at lr 0.1; a semantic difference moves them by orders of magnitude more."""
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], rel=rtol)
    assert a["history"][0]["test_loss"] == pytest.approx(b["history"][0]["test_loss"], rel=rtol)
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=rtol, atol=atol, msg=k)


def test_auto_perf_is_exact_on_cpu_and_fast_on_gpu():
    cfg = make_cfg([])
    assert resolve_perf(cfg.perf, torch.device("cpu")) == {"precision": "fp32", "channels_last": False,
                                                           "compile": False, "compile_mode": "default"}
    fast = resolve_perf(cfg.perf, torch.device("cuda"))
    assert fast["precision"] == "bf16" and fast["channels_last"] and fast["compile"]


def test_channels_last_gives_the_same_training(tmp_path):
    exact = run(tmp_path, "exact", [])
    fast = run(tmp_path, "cl", ["perf.channels_last=true"])
    assert_same_training(exact, fast, 1e-3, 2e-4)


@pytest.mark.parametrize("double_forward", [False, True])
def test_compiled_train_step_equals_eager_in_float64(double_forward):
    """The compiled step computes the same function: two MBN steps of ResNet-20 (memory pushes,
    λ buffer, double forward) agree with eager to float64 round-off. (In float32 the two differ
    by ordinary round-off, amplified by BN's backward, ~1e-2 of a gradient's scale.)"""
    import copy

    from mbn.build import make_model
    from mbn.step import train_step

    torch.manual_seed(0)
    eager = make_model(make_cfg(TINY + ["norm=mbn"])).double().train()
    compiled = copy.deepcopy(eager)
    forward = torch.compile(compiled)
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    for model, fwd in ((eager, eager), (compiled, forward)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for p in (0.0, 0.5):
            for m in model.modules():
                if hasattr(m, "set_progress"):
                    m.set_progress(p)
            loss, _ = train_step(model, opt, x, y, double_forward, forward=fwd)
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.slow
def test_compiled_training_runs_end_to_end(tmp_path):
    exact = run(tmp_path, "exact", [])
    compiled = run(tmp_path, "compiled", ["perf.compile=true"])
    assert compiled["history"][0]["train_loss"] == pytest.approx(exact["history"][0]["train_loss"], rel=1e-3)


def test_bf16_autocast_keeps_statistics_in_fp32(tmp_path):
    exact = run(tmp_path, "exact", [])
    bf16 = run(tmp_path, "bf16", ["perf.precision=bf16"])
    assert all(v.dtype in (torch.float32, torch.long) for k, v in bf16["model"].items() if "memory." in k or "running" in k)
    assert bf16["history"][0]["train_loss"] == pytest.approx(exact["history"][0]["train_loss"], rel=0.05)


def test_bench_runs_on_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "bench.md"
    r = run_cli("scripts/bench.py", "--tiny", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for key in "abcde":
        assert text.count(f"| ({key}) ") == 2  # two batch sizes
    assert "torch " + torch.__version__ in text and "commit" in text
    r = run_cli("scripts/bench.py", "--tiny", "--device", "cpu", "--only", "a", "b", "--json")
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [row["key"] for row in rows] == ["a", "b", "a", "b"] and all(row["images_per_s"] > 0 for row in rows)
