"""The fast path (compile, channels_last, bf16) against the exact one, and the benchmark script."""
import json
import os
import re

import pytest
import torch

from mbn import UserError

from mbn.checkpoint import load_checkpoint
from mbn.build import resolve_perf
from mbn.engine import fit
from tests.conftest import REPO, TINY, make_cfg, run_cli

FEW_STEPS = TINY + ["train.steps=3", "train.epochs=1", "norm=mbn", "logger=none"]


def run(tmp_path, name, extra):
    fit(make_cfg(FEW_STEPS + extra), str(tmp_path / name))
    return load_checkpoint(tmp_path / name / "checkpoint.pt")


def test_auto_perf_is_exact_on_cpu_and_fast_on_gpu():
    cfg = make_cfg([])
    assert resolve_perf(cfg.perf, torch.device("cpu")) == {"precision": "fp32", "channels_last": False,
                                                           "compile": False, "compile_mode": "default",
                                                           "cuda_graph": False}
    fast = resolve_perf(cfg.perf, torch.device("cuda"))
    assert fast["precision"] == "bf16" and fast["channels_last"] and fast["compile"] and fast["cuda_graph"]
    with pytest.raises(UserError, match="cuda_graph"):
        resolve_perf(make_cfg(["perf.cuda_graph=true"]).perf, torch.device("cpu"))
    with pytest.raises(UserError, match="reduce-overhead"):  # Inductor's graphs inside ours
        resolve_perf(make_cfg(["perf.compile_mode=reduce-overhead"]).perf, torch.device("cuda"))
    assert not resolve_perf(make_cfg(["perf.compile_mode=reduce-overhead", "perf.cuda_graph=false"]).perf,
                            torch.device("cuda"))["cuda_graph"]


@pytest.mark.parametrize("norm", ["bn", "mbn"])
def test_channels_last_gives_the_same_training_in_float64(norm):
    """The channels_last model and batches take the same steps as the contiguous ones: in float64
    only the kernels' summation order differs (in float32 BN's backward amplifies that to ~1e-4)."""
    from mbn.build import make_model, make_optimizer
    from mbn.data import make_loaders
    from mbn.step import TrainStep
    from tests.test_step import Float64, tiny_cfg

    states = []
    for channels_last in (False, True):
        cfg = tiny_cfg(norm)
        torch.manual_seed(0)
        model = make_model(cfg).double()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer(cfg, model)
        train, _ = make_loaders(cfg, torch.device("cpu"), channels_last=channels_last)
        step = TrainStep(model, opt, Float64(train), double_forward=norm == "mbn")
        train.start_epoch(0)
        for _ in range(3):
            step()
        train.start_epoch(1)
        assert train.next_batch()[0].is_contiguous(memory_format=torch.channels_last) == channels_last
        states.append((model.state_dict(), step.loss_sum))
    (a, la), (b, lb) = states
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("double_forward", [False, True])
def test_compiled_train_step_equals_eager_in_float64(double_forward, resnet8):
    """The compiled step computes the same function: two MBN steps of ResNet-8 (memory pushes,
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


def test_bf16_autocast_keeps_statistics_in_fp32(tmp_path, resnet8):
    exact = run(tmp_path, "exact", [])
    bf16 = run(tmp_path, "bf16", ["perf.precision=bf16"])
    assert all(v.dtype in (torch.float32, torch.long) for k, v in bf16["model"].items() if "memory." in k or "running" in k)
    assert bf16["history"][0]["train_loss"] == pytest.approx(exact["history"][0]["train_loss"], rel=0.05)


def test_bench_runs_on_cpu_and_writes_its_table(tmp_path, capsys):
    import importlib.util  # in this process: a subprocess would cost seconds of imports

    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "scripts", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    for key in "abcde":
        assert text.count(f"| ({key}) ") == 2  # two batch sizes
    assert "torch " + torch.__version__ in text and "commit" in text
    capsys.readouterr()
    assert bench.main(["--tiny", "--device", "cpu", "--only", "a", "b", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row["key"] for row in rows] == ["a", "b", "a", "b"] and all(row["images_per_s"] > 0 for row in rows)


def test_bench_on_a_cpu_never_replaces_the_gpu_table(tmp_path, capsys, monkeypatch):
    """results/bench.md holds GPU measurements (sweep.py plan's estimates): bench.py without a GPU
    refuses to measure (exit 4), and a CPU run without --out prints its table and writes nothing."""
    import importlib.util

    from mbn.cli import EnvironmentFault

    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "scripts", "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    written = []
    monkeypatch.setattr(bench, "BENCH_MD", str(tmp_path / "bench.md"))  # were it written, here
    monkeypatch.setattr(bench, "measure", lambda k, *a, **kw: written.append(k) or {
        "key": k, "label": k, "model": "resnet20", "batch": 4, "images_per_s": 1.0, "perf": {}})
    monkeypatch.setattr(bench, "table", lambda rows, title: f"# {title}\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EnvironmentFault, match="no CUDA device is visible"):
        bench.main([])
    assert written == []
    assert bench.main(["--tiny", "--device", "cpu", "--only", "a", "--batch-sizes", "4"]) == 0
    assert written == ["a"] and "not written to" in capsys.readouterr().out
    assert not (tmp_path / "bench.md").exists()


@pytest.mark.slow  # ~40 s of processes; Check.run itself: the crash test below
def test_gpu_check_help_and_dry_rehearsal(tmp_path):
    """The GPU check's orchestration on a CPU: bench configurations and the train.py run, each in its
    own process, a JSON line each, bench.md written beside them, exit 0 — and results/bench.md, which
    holds GPU measurements, left as it was."""
    r = run_cli("scripts/gpu_check.py", "--help")
    assert r.returncode == 0 and "--dry" in r.stdout
    md = tmp_path / "out" / "bench.md"
    kept = open(os.path.join(REPO, "results", "bench.md"), "rb").read()
    r = run_cli("scripts/gpu_check.py", "--dry", "--phases", "bench", "train", "--out", str(tmp_path / "out"),
                timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert open(os.path.join(REPO, "results", "bench.md"), "rb").read() == kept
    rows = [json.loads(line) for line in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    names = {row["name"] for row in rows}
    assert {"env", "bench:resnet20-bs8-a", "bench:resnet20-bs8-d", "bench:resnet20-bs8-g", "bench:resnet20-bs8-h",
            "train:resnet20-mbn2-3ep-synthetic"} <= names
    assert all(row["ok"] for row in rows) and "| resnet20 | (d) ours MBN-2 | 8 |" in md.read_text()
    assert (tmp_path / "out" / "compile_cache").is_dir()  # every process's compile cache (a rehearsal: its own)
    assert "| resnet20 | (g) ours BN-1, 2 seeds stacked in one process | 8 |" in md.read_text()
    ratio = next(row for row in rows if row["name"] == "ratio:resnet20-bs8")
    assert ratio["bn1_stacked_vs_bn1"] > 0 and ratio["mbn2_stacked_vs_mbn2"] > 0


@pytest.mark.slow
def test_gpu_check_full_dry_rehearsal(tmp_path):
    r = run_cli("scripts/gpu_check.py", "--dry", "--out", str(tmp_path), "--bench-md", str(tmp_path / "b.md"),
                timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_gpu_check_reports_a_crash_by_name_with_its_traceback(tmp_path, monkeypatch):
    """One configuration that crashes is named, with its traceback's tail, and the others still run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "scripts", "gpu_check.py"))
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    check = gc.Check(str(tmp_path), True, 120)
    rows = check.run([{"kind": "nonsense", "name": "broken"},
                      {"kind": "correct", "name": "fine", "norm": "bn", "double": False, "dry": True}], 300,
                     dict(os.environ, PYTHONPATH=REPO), parallel=2)
    by = {r["name"]: r for r in rows}
    assert not by["broken"]["ok"] and any("ValueError" in line for line in by["broken"]["traceback_tail"])
    assert by["fine"]["ok"] and [f["name"] for f in check.failures] == ["broken"]


def load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, says", [
    ("bench", ["--seeds", "0"], "--seeds: must be at least 1"),
    ("bench", ["--steps", "0"], "--steps: must be at least 1"),
    ("bench", ["--batch-sizes", "8", "-4"], "--batch-sizes: must be at least 1"),
    ("bench", ["--model", "resnet21"], "invalid choice: 'resnet21'"),
    ("bench", ["--only", "z"], "invalid choice: 'z'"),
    ("bench", ["--tiny", "--only"], "--only: expected at least one argument"),  # an empty table, exit 0
    ("gpu_check", ["--budget", "0"], "--budget: a time in seconds must be positive"),
    ("gpu_check", ["--phases", "timing"], "invalid choice: 'timing'"),
    ("gpu_check", ["--dry", "--phases"], "--phases: expected at least one argument"),  # checked nothing, 'passed'
    ("gpu_check", ["--dry", "--data-root", "/nonexistent"], "--data-root /nonexistent: no cifar-10-batches-py/"),
])
def test_bench_and_gpu_check_refuse_bad_arguments_with_one_line(script, argv, says):
    with pytest.raises(UserError, match=re.escape(says)) as e:
        load_script(script).main(argv)
    assert "\n" not in str(e.value)


def test_gpu_check_boundary_missing_log_and_no_gpu(tmp_path):
    """The scripts end through mbn.cli's boundary: one line and an exit status, no traceback."""
    r = run_cli("scripts/gpu_check.py", "--report", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.jsonl" in r.stderr
    if not torch.cuda.is_available():
        from mbn.cli import EnvironmentFault

        with pytest.raises(EnvironmentFault, match="no CUDA device is visible; run with --dry"):
            load_script("gpu_check").main(["--out", str(tmp_path / "out")])
