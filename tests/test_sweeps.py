"""Sweeps, tables and figures end to end on synthetic data (two seeds, two epochs)."""
import csv
import os
import re
import json
import statistics

import pytest

from mbn.sweeps import expand, grids, multirun_overrides
from tests.conftest import run_cli

TINY = ["data=synthetic", "data.train_size=64", "data.test_size=32", "train.batch_size=32",
        "train.eval_batch_size=32"]


def test_grids_cover_every_cell_the_methods_define():
    g = grids(200)
    runs = [tuple(o) for b in g["table1"].blocks for o in expand(b)]
    assert len(runs) == 4 * 3 + 2  # BN/BRN/MBN on every model (NIN included), NormProp on NIN and VGG
    assert not any("norm=normprop" in r and ("model=resnet20" in r or "model=resnet56" in r) for r in runs)
    t4 = g["table4"].blocks[0]
    assert t4["train.steps"] == [200 * 390] and t4["train.batch_size"] == [8, 16, 32, 64, 128]
    # λ = {0} is BN-1: single forward; the other schedules are MBN-2
    assert multirun_overrides(g["table5"].blocks[0])[-2:] == ["norm.lam=[0.0]", "train.double_forward=false"]
    assert multirun_overrides(g["table5"].blocks[1])[-1] == "norm.lam=choice([0.1],[0.5],[0.9],[0.1,0.5,0.9])"


def read_md_rows(path):
    rows = {}
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 4 and cells[3].isdigit():
            rows[cells[0]] = cells
    return rows


def test_sweep_make_tables_and_plots(tmp_path):
    root = tmp_path / "runs"
    r = run_cli("scripts/sweep.py", "table6", "--epochs", "2", "--seeds", "2", "--root", str(root), *TINY)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs_dir = root / "e2-synthetic"  # the sweep's name says what it ran
    run_dirs = [d for d in runs_dir.iterdir() if d.is_dir()]
    assert len(run_dirs) == 6 and all((d / "metrics.json").exists() for d in run_dirs)

    # run the same sweep again: everything is already finished and skipped
    r = run_cli("scripts/sweep.py", "table6", "--epochs", "2", "--seeds", "2", "--root", str(root), *TINY)
    assert r.returncode == 0 and r.stdout.count("already finished") == 6

    # the committed copy (metrics and configs only) regenerates the same table
    collected = tmp_path / "collected"
    r = run_cli("scripts/collect_runs.py", "--runs", str(runs_dir), "--out", str(collected))
    assert r.returncode == 0, r.stderr
    assert not list(collected.rglob("*.pt")) and len(list(collected.glob("*/metrics.jsonl"))) == 6
    out = tmp_path / "results"
    r = run_cli("scripts/make_tables.py", "--runs", str(collected), "--out", str(out), "--tables", "table6")
    assert r.returncode == 0, r.stderr
    expected = {}
    for d in run_dirs:
        cfg = json.loads((d / "run_record.json").read_text())["config"]
        expected.setdefault(str(cfg["norm"]["memory_size"]), []).append(
            json.loads((d / "metrics.json").read_text())["test_err"])
    rows = read_md_rows(out / "table6.md")
    assert set(rows) == {"10", "20", "40"}
    for k, errs in expected.items():
        assert len(errs) == 2
        assert rows[k][2] == f"{statistics.fmean(errs):.2f} ± {statistics.stdev(errs):.2f}"
        assert rows[k][3] == "2"
    assert rows["10"][4] == "reference" and rows["20"][4].endswith("(n = 2)")
    with open(out / "table6.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[0]["mean"]) == pytest.approx(statistics.fmean(expected["10"]))
    assert "paper" not in csv_rows[0] and "verdict" not in csv_rows[0]
    md = (out / "table6.md").read_text()
    assert "2 epochs (shortened; the paper: 200)" in md and "cpu" in md and "commits" in md
    assert md.startswith("# SYNTHETIC DATA") and "| paper |" not in md  # never compared with the paper
    assert {f"- `{d.name}`" for d in run_dirs} <= set(md.splitlines())  # the runs it was made from


def test_missing_runs_are_missing_not_zero(tmp_path):
    runs_dir = tmp_path / "e2"
    runs_dir.mkdir()
    (runs_dir / "sweep_table1.json").write_text(json.dumps({"table": "table1", "epochs": 2, "seeds": [0, 1],
                                                            "extra": TINY}))
    out = tmp_path / "out"
    r = run_cli("scripts/make_tables.py", "--runs", str(runs_dir), "--out", str(out), "--tables", "table1")
    assert r.returncode == 0, r.stderr
    rows = [line for line in (out / "table1.md").read_text().splitlines() if line.startswith("| ") and "missing" in line]
    assert len(rows) == 14 and all("| 0 |" in line for line in rows)
    assert not any(line.startswith("| bn | resnet20 | 0.00") for line in rows)


def test_figures_from_a_sweep(tmp_path):
    root = tmp_path / "runs"
    r = run_cli("scripts/sweep.py", "figure1", "--epochs", "2", "--seeds", "2", "--norms", "mbn", "--root", str(root),
                *TINY, "model=resnet20")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "results"
    r = run_cli("scripts/plot_curves.py", "--runs", str(root / "e2-synthetic"), "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    png = (out / "figure1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.slow  # 30 s of processes; Table 2's grid and rendering have fast tests (test_results, test_tables)
def test_table2_sweep_on_synthetic_cifar100_shapes(tmp_path):
    """CIFAR-100 cannot be downloaded here: its sweep runs on synthetic 100-class data (NIN column
    only, one seed) and the table shows those cells, the rest missing, says why, and is titled
    synthetic."""
    root = tmp_path / "runs"
    r = run_cli("scripts/sweep.py", "table2", "--epochs", "1", "--seeds", "1", "--models", "nin", "--root", str(root),
                *TINY, "data.num_classes=100")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "results"
    r = run_cli("scripts/make_tables.py", "--runs", str(root / "e1-synthetic"), "--out", str(out), "--tables", "table2")
    assert r.returncode == 0, r.stderr
    md = (out / "table2.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    found = {tuple(c.strip().split(" (")[0] for c in line.strip("|").split("|")[:2]): line for line in lines}
    assert len(found) == 14
    for norm in ("normprop", "bn", "brn", "mbn"):
        assert "missing" not in found[(norm, "nin")] and "| 1 |" in found[(norm, "nin")]
    assert "missing" in found[("mbn", "resnet56")] and "29.27" not in md  # synthetic: no paper numbers
    assert md.startswith("# SYNTHETIC DATA") and "CIFAR-100 is downloaded by torchvision" in md


# ------------------------------------------------------------------------------ sweep.py plan / next / errors
def sweep_script():
    import importlib.util
    import os

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("sweep_script", os.path.join(REPO, "scripts", "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def own_compile_cache(tmp_path, monkeypatch):
    """`next` points this process's torch.compile cache at its folder: restore it afterwards."""
    monkeypatch.setenv("MBN_COMPILE_CACHE", str(tmp_path / "compile_cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile_cache"))
    return tmp_path / "compile_cache"


@pytest.mark.parametrize("argv, says", [
    (["table1", "--seeds", "0"], "--seeds: must be at least 1"),            # issue 18 #17
    (["table1", "--jobs", "0"], "--jobs: must be at least 1"),
    (["table6", "--epochs", "-2"], "--epochs: must be at least 1"),
    (["plan", "--seeds", "-1"], "--seeds: must be at least 1"),
    (["next", "--budget", "0"], "--budget: a time in seconds must be positive"),
    (["next", "--jobs", "2"], "required: --budget"),
    (["table1", "--models", "resnet21"], "invalid choice: 'resnet21'"),
    (["plan", "--norms", "mbn2"], "invalid choice: 'mbn2'"),
    (["plan", "--tables", "table7"], "invalid choice: 'table7'"),
    (["plan", "--profile", "30"], "a profile is e<epochs>"),
    (["tabel1"], "unknown table 'tabel1'"),
    (["table1", "--", "train.batchsize=32"], "did you mean train.batch_size"),
    (["plan", "--", "norm=mbm"], "did you mean mbn"),
    (["table1", "--", "norm=null"], "norm=null: norm takes one option by name"),  # Hydra's ValueError
    (["plan", "--", "model=[nin,vgg16]"], "model=[nin,vgg16]: model takes one option by name"),
    (["table1", "--", "norm='"], "cannot read the override"),
    (["table6", "--", "optim.lr=0"], "optim.lr"),
    (["table1", "--", "seeds"], "'seeds' is not a key=value override"),
    (["plan", "--runs", __file__], "is a file, not a runs folder"),
    (["plan", "--bench", "/nonexistent/bench.md"], "--bench /nonexistent/bench.md: no such file"),
    (["next", "--budget", "600", "--tables", "table6", "--compile-cache", __file__],
     f"{__file__} is a file, not a folder"),
    (["table1", "--compile-cache", os.path.join(__file__, "cache")], "is a file, not a folder"),  # the runs dir
    (["table1", "--dry-run", "--compile-cache", __file__], "is a file, not a folder"),  # what the run would refuse
    (["table1", "--norms", "gn"], "--models/--norms leave no run of table1, whose cells have models nin, resnet20"),
    (["plan", "--tables", "table6", "--models", "vgg16"], "leave no run of table6, whose cells have models resnet20"),
])
def test_sweep_refuses_bad_arguments_with_one_line(argv, says, tmp_path):
    from mbn import UserError

    with pytest.raises(UserError, match=re.escape(says)) as e:
        sweep_script().main(argv[:1] + ["--root", str(tmp_path / "runs")] + argv[1:])
    assert "\n" not in str(e.value) and not (tmp_path / "runs").exists()


def test_sweep_unwritable_root_and_the_boundary(tmp_path):
    """One line on stderr, exit 2, no traceback, nothing created; a --root that cannot be made too."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = run_cli("scripts/sweep.py", "table6", "--epochs", "1", "--root", str(blocker / "runs"), *TINY)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--root" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("scripts/sweep.py", "table1", "--seeds", "0", "--root", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr.startswith("error: argument --seeds") and r.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_restricting_models_and_norms_and_the_dry_run_estimates(tmp_path, capsys):
    """Issue 18 #15 (--models with --norms), and --dry-run: every block's command, run count and
    GPU time, nothing written."""
    sweep = sweep_script()
    root = tmp_path / "runs"
    assert sweep.main(["table1", "--models", "resnet20", "--norms", "bn", "mbn", "--dry-run", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "model=resnet20 norm=bn,mbn seed=0,1,2" in out and "6 runs; GPU time" in out and "normprop" not in out
    assert sweep.main(["mbn_ablation", "--epochs", "30", "--dry-run", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    blocks = grids(30)["mbn_ablation"].blocks
    assert out.count("[sweep] ") == len(blocks) + 1 and out.count("runs; GPU time") == len(blocks)
    assert "norm.lam=[0.0]" in out and "perf.compile_cache=" in out
    assert sweep.main(["small_batch", "--dry-run", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "train.batch_size=2,4,8,16,32,64,128" in out and "no estimate" in out
    assert not root.exists()


class InProcessJob:
    """sweep.Job's stand-in for the default suite: the same train.py command line, trained in this
    process (an interpreter start-up costs more than the tiny training)."""

    def __init__(self, cmd, log_path, env):
        import contextlib
        import os

        from mbn.engine import fit
        from tests.conftest import make_cfg

        args = cmd[2:]  # after: python train.py
        run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir="))
        overrides = [a for a in args if not a.startswith("hydra.")]
        os.environ["MBN_DEADLINE"] = env["MBN_DEADLINE"]
        try:
            with open(log_path, "a") as log, contextlib.redirect_stdout(log):
                fit(make_cfg(overrides), run_dir, overrides)
        finally:
            del os.environ["MBN_DEADLINE"]

    def poll(self):
        return 0

    def stop(self, sig):
        pass


@pytest.mark.parametrize("launch", ["in process", pytest.param("train.py", marks=pytest.mark.slow)])
def test_next_runs_resumes_bitwise_and_keeps_checkpoints_only_while_unfinished(launch, tmp_path, capsys,
                                                                                own_compile_cache, monkeypatch):
    """`next` twice on one run: the first call stops it after an epoch (train.stop_after, as a
    budget would), the second continues it to the result of an uninterrupted run, bit for bit,
    deletes its checkpoint, and a third call finds nothing to do."""
    from mbn.engine import fit
    from tests.conftest import make_cfg

    sweep = sweep_script()
    if launch == "in process":
        monkeypatch.setattr(sweep, "Job", InProcessJob)
    root = tmp_path / "runs"
    argv = ["next", "--budget", "600", "--margin", "1", "--profile", "e2", "--seeds", "1", "--tables", "table1",
            "--models", "resnet20", "--norms", "bn", "--root", str(root), "--", *TINY, "train.precise_batches=1"]
    assert sweep.main(argv + ["train.stop_after=1"]) == 0
    runs = root / "e2-synthetic"
    (run,) = [d for d in runs.iterdir() if d.is_dir() and d.name != "logs"]
    assert (run / "checkpoint.pt").exists() and not (run / "metrics.json").exists()
    assert "1 partial" in capsys.readouterr().out

    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 finished" in out and "resuming" in (runs / "logs" / f"{run.name}.log").read_text()
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    assert not (run / "checkpoint.pt").exists()  # finished: the run dir travels without it
    record = json.loads((run / "run_record.json").read_text())
    fit(make_cfg([o for o in record["overrides"] if not o.startswith("train.stop_after")]), str(tmp_path / "ref"))
    keys = ("epoch", "step", "lr", "train_loss", "train_err", "test_loss", "test_err")
    ours = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [[h[k] for k in keys] for h in ours] == [[h[k] for k in keys] for h in ref]
    sweep_file = json.loads((runs / "sweep_table1.json").read_text())
    assert sweep_file["epochs"] == 2 and sweep_file["seeds"] == [0] and "train.stop_after=1" not in sweep_file["extra"]

    assert sweep.main(argv) == 0  # nothing left: the finished run is not started again
    out = capsys.readouterr().out
    assert "nothing to run" in out and "| 1 | 0 | 0 | 0 | done |" in out


def test_a_dry_run_of_next_writes_and_deletes_nothing(tmp_path, capsys, own_compile_cache, monkeypatch):
    """`next --dry-run` prints the queue only: it creates no folder and keeps the checkpoint of a
    finished run (a real `next` deletes it); a --margin that leaves no budget is refused."""
    from mbn import UserError

    sweep = sweep_script()
    monkeypatch.setattr(sweep, "Job", InProcessJob)
    root = tmp_path / "runs"
    options = ["--budget", "600", "--margin", "1", "--profile", "e1", "--seeds", "1", "--tables", "table1",
               "--models", "resnet20", "--norms", "bn", "--root"]
    extra = ["--", *TINY, "train.precise_batches=0"]
    assert sweep.main(["next", *options, str(tmp_path / "fresh"), "--dry-run", *extra]) == 0
    assert not (tmp_path / "fresh").exists()
    assert sweep.main(["next", *options, str(root), *extra]) == 0
    (run,) = [d for d in (root / "e1-synthetic").iterdir() if d.is_dir() and d.name != "logs"]
    (run / "checkpoint.pt").write_bytes(b"kept by a run made outside next")
    before = sorted((p.relative_to(root), p.read_bytes()) for p in root.rglob("*") if p.is_file())
    assert sweep.main(["next", *options, str(root), "--dry-run", *extra]) == 0
    assert sorted((p.relative_to(root), p.read_bytes()) for p in root.rglob("*") if p.is_file()) == before
    assert "deleted the checkpoints" not in capsys.readouterr().out
    with pytest.raises(UserError, match="--margin 60 leaves nothing of --budget 60"):
        sweep.main(["next", "--budget", "60", "--root", str(root), *extra])
