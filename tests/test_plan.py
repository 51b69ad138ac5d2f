"""The suite as a plan (mbn/plan.py): time estimates from bench.md, run status found by recorded
config, priority order, and `next`'s scheduler under a budget (a fake clock: timing is not the point)."""
import json
import math
import os
import signal

import pytest
from omegaconf import OmegaConf

from mbn import plan as planner
from mbn.naming import identity
from mbn.results import compose

EXTRA = ["data=synthetic", "data.train_size=64", "data.test_size=32", "train.batch_size=32",
         "train.eval_batch_size=32", "train.precise_batches=2", "device=cpu"]

BENCH = """# Training throughput
- device: Test GPU 80GB

| model | config | batch | img/s | ms/step | vs (a) | vs (b) | precision | channels_last | compile | graph |
|---|---|---|---|---|---|---|---|---|---|---|
| resnet56 | (a) reference eager fp32, nn.BatchNorm2d | 128 | 4000 | 32.00 | 1.00 | 0.20 | fp32 | False | False | False |
| resnet56 | (b) ours BN-1 | 128 | 20000 | 6.40 | 5.00 | 1.00 | bf16 | True | True | True |
| resnet56 | (d) ours MBN-2 | 128 | 16000 | 8.00 | 4.00 | 0.80 | bf16 | True | True | True |
| resnet56 | (f) ours BN-1, no CUDA graph | 128 | 5000 | 25.60 | 1.25 | 0.25 | bf16 | True | True | False |
| resnet56 | (b) ours BN-1 | 8 | 2000 | 4.00 | 9.00 | 1.00 | bf16 | True | True | True |
| resnet20 | (b) ours BN-1 | 32 | 9000 | 3.56 | 4.00 | 1.00 | bf16 | True | True | True |
| resnet20 | (g) ours BN-1, 8 seeds stacked in one process | 32 | 50000 | 5.12 | — | 5.56 | bf16 | True | True | True |

- packed:8-processes: aggregate_images_per_s=1.12e+05, mps=True, vs_one_process=3.1
"""


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "bench.md"
    path.write_text(BENCH)
    return planner.Bench(str(path))


def test_bench_reads_default_path_rows_and_the_packed_ratio(bench):
    assert bench.device == "Test GPU 80GB"
    assert bench.images_per_s("resnet56", "bn", False, 128) == 20000  # (b), not (a) or (f)
    assert bench.images_per_s("resnet56", "mbn", True, 128) == 16000
    # between measured batch sizes: on log-log axes, by hand
    w = math.log(32 / 8) / math.log(128 / 8)
    assert bench.images_per_s("resnet56", "bn", False, 32) == pytest.approx(2000 ** (1 - w) * 20000 ** w, rel=1e-12)
    assert bench.images_per_s("resnet56", "bn", False, 256) is None      # outside what was measured
    assert bench.images_per_s("resnet56", "mbn", False, 128) is None     # MBN-1: the bench lacks the pair
    assert bench.images_per_s("resnet20", "bn", False, 32) == 9000      # the stacked row (g) is not a run's
    assert bench.speedup(1) == 1.0 and bench.speedup(8) == 3.1 and bench.speedup(16) == 3.1
    assert bench.speedup(4) == pytest.approx(1 + 2.1 * 3 / 7, rel=1e-12)
    assert planner.Bench("/nonexistent/bench.md").images_per_s("resnet56", "bn", False, 128) is None


def test_run_cost_by_hand(bench):
    cfg = planner.cell_config(["model=resnet56", "norm=bn", "train.epochs=30"])
    epoch_s, epochs = planner.run_cost(cfg, bench)
    steps = 50_000 // 128  # an epoch's steps: the last partial batch is dropped
    assert epochs == 30
    assert epoch_s == pytest.approx((steps * 128 + 10_000 * planner.EVAL_COST) / 20000, rel=1e-12)
    # a step budget (Table 4): epochs rounded up, the images of the budget
    cfg = planner.cell_config(["model=resnet56", "norm=bn", "train.batch_size=8", "train.steps=10000"])
    epoch_s, epochs = planner.run_cost(cfg, bench)
    assert epochs == math.ceil(10000 / (50_000 // 8))
    assert epoch_s * epochs == pytest.approx((10000 * 8 + epochs * 10_000 * planner.EVAL_COST) / 2000, rel=1e-12)
    # settings the bench did not measure: no estimate
    assert planner.run_cost(planner.cell_config(["model=resnet56", "norm=bn", "perf.precision=fp32"]), bench)[0] is None


@pytest.mark.parametrize("overrides", [
    ["model=resnet56", "norm=mbn", "norm.lam=[0.5]", "train.double_forward=false", "train.epochs=30"],
    ["norm=mbn", "model=resnet20", "norm.memory_size=20", "data=synthetic", "data.train_size=64", "train.epochs=2"],
    ["model=resnet20", "norm=bn", "train.batch_size=8", "train.steps=78000", "optim.lr=0.00625"],
    ["experiment=smoke", "norm=brn", "perf.precision=fp32", "data.test_size=32"],
])
def test_cell_config_builds_what_hydra_composes(overrides):
    assert identity(planner.cell_config(overrides)) == identity(compose(overrides))


def fake_run(runs_dir, overrides, seed, name=None, summary=None, checkpoint=False, epochs_logged=0):
    """A run directory as train.py leaves it: the record of its resolved config, metrics files."""
    cfg = planner.cell_config(overrides + [f"seed={seed}"])
    rid = planner.run_id(dict(identity(cfg), seed=seed))
    d = os.path.join(runs_dir, name or rid)
    os.makedirs(d)
    with open(os.path.join(d, "run_record.json"), "w") as f:
        json.dump({"config": OmegaConf.to_container(cfg, resolve=True), "overrides": overrides + [f"seed={seed}"],
                   "started": "2026-01-01T00:00:00"}, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for e in range(epochs_logged):
            f.write(json.dumps({"epoch": e + 1, "train_loss": 1.0, "test_err": 50.0}) + "\n")
    if summary is not None:
        with open(os.path.join(d, "metrics.json"), "w") as f:
            json.dump(summary, f)
    if checkpoint:
        open(os.path.join(d, "checkpoint.pt"), "wb").close()
    return d


FINISHED = {"status": "finished", "finished": True, "train_loss": 0.5, "test_loss": 0.6, "test_err": 40.0}


def test_plan_finds_every_status_by_recorded_config_and_drops_finished_checkpoints(tmp_path, bench):
    runs = str(tmp_path / "e2-synthetic")
    cell = ["model=resnet20", "norm=mbn"]
    asked = lambda k: cell + [f"norm.memory_size={k}", "train.epochs=2"] + EXTRA  # noqa: E731
    done = fake_run(runs, asked(10), 0, summary=FINISHED, checkpoint=True)
    old = fake_run(runs, asked(20), 0, name="an-older-run-id", summary=FINISHED)  # found by its record
    part = fake_run(runs, asked(40), 0, checkpoint=True, epochs_logged=1)
    fake_run(runs, asked(10), 1, summary={"status": "diverged", "finished": False, "train_loss": float("nan")})
    fake_run(runs, asked(20), 1, epochs_logged=1)  # started, killed before its first checkpoint: starts over

    plan = planner.build(runs, 2, [0, 1], EXTRA, tables={"table6"}, bench=bench)
    (block,) = plan.blocks
    status = {(r.overrides[2], r.seed): r for r in block.runs}
    assert status[("norm.memory_size=10", 0)].status == "finished"
    assert status[("norm.memory_size=20", 0)].status == "finished" and status[("norm.memory_size=20", 0)].dir == old
    assert status[("norm.memory_size=40", 0)].status == "partial"
    assert status[("norm.memory_size=40", 0)].epochs_done == 1
    assert status[("norm.memory_size=10", 1)].status == "diverged"
    assert status[("norm.memory_size=20", 1)].status == status[("norm.memory_size=40", 1)].status == "missing"
    assert plan.counts(block.runs) == {"finished": 2, "partial": 1, "diverged": 1, "missing": 2}
    text = planner.render(plan, 1)
    assert "| 1 | Table 6: MBN memory size | 6 | 2 | 1 | 1 | 2 | no estimate |" in text  # batch 32 MBN-2: not benched

    assert planner.drop_checkpoints(plan.unique(), runs) == [status[("norm.memory_size=10", 0)].run_id]
    assert not os.path.exists(os.path.join(done, "checkpoint.pt"))
    assert os.path.exists(os.path.join(done, "metrics.json"))
    assert os.path.exists(os.path.join(part, "checkpoint.pt"))  # something to continue


def test_plan_order_and_shared_runs(bench):
    """Blocks in the suite's priority order; a run two blocks need is planned in the first and
    only counted in the later one; estimates where the bench has the pair."""
    plan = planner.build("/nonexistent/e200", 200, [0], tables={"table1", "figure2", "table6", "mbn_ablation"},
                         models=["resnet20", "resnet56"], bench=bench)
    titles = [b.step.title for b in plan.blocks]
    assert titles == [planner.SUITE[i].title for i in (0, 1, 2, 6, 9)]  # NIN and VGG-16 left out: no block
    r20, r56, t6, f2, ablation = plan.blocks
    # two cells of one block can be one run (k = 10 and η = 0.9 are the paper's MBN-2): counted once
    assert len(ablation.runs) == len({r.run_id for r in ablation.runs})
    assert sum(r.run_id == r20.runs[2].run_id for r in ablation.runs) == 1 and r20.runs[2] not in ablation.new
    assert {(r.overrides[1], r.overrides[2]) for r in r20.runs} == {("model=resnet20", f"norm={n}") for n in
                                                                     ("bn", "brn", "mbn")}
    assert len(t6.runs) == 3 and len(t6.new) == 2  # memory size 10 is Table 1's MBN-2
    assert len(f2.runs) == 4 and not f2.new        # Figure 2's runs are Table 1's
    assert len(plan.unique()) == len({r.run_id for r in plan.unique()}) == 6 + 2 + len(ablation.new)
    # ResNet-56 BN-1 and MBN-2 at batch 128 are benched, BRN-2 is not
    seconds, unknown = planner.gpu_seconds(r56.new, 1, bench)
    expected = sum(planner.STARTUP_S + 200 * planner.run_cost(planner.cell_config(r.overrides), bench)[0]
                   for r in r56.new if r.overrides[2] != "norm=brn")
    assert unknown == 1 and seconds == pytest.approx(expected, rel=1e-12)
    assert planner.gpu_time_text(r56.new, 1, bench).endswith("+ 1 run with no estimate")
    # 8 runs sharing the GPU at the packed ratio: GPU time shrinks by 3.1, start-ups overlap
    seconds8, _ = planner.gpu_seconds(r56.new, 8, bench)
    assert seconds8 == pytest.approx(sum(planner.STARTUP_S / 8 + 200 * planner.run_cost(
        planner.cell_config(r.overrides), bench)[0] / 3.1 for r in r56.new if r.overrides[2] != "norm=brn"), rel=1e-12)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


class FakeJob:
    """A run that ends `duration` seconds after it starts, or when stopped."""

    def __init__(self, clock, duration, log):
        self.clock, self.end, self.log, self.rc = clock, clock() + duration, log, None

    def poll(self):
        if self.rc is None and self.clock() >= self.end:
            self.rc = 0
        return self.rc

    def stop(self, sig):
        self.log.append(("stop", sig))
        self.rc = -sig


def fake_runs(n):
    return [planner.PlannedRun("table1", [], 0, f"run{i}", f"/x/run{i}") for i in range(n)]


def test_next_starts_runs_in_priority_order_within_the_budget():
    clock, log = FakeClock(), []
    runs = fake_runs(6)
    duration = {"run0": 50, "run1": 30, "run2": 40, "run3": 500, "run4": 10, "run5": 10}
    first_epoch = {"run0": 10, "run1": 10, "run2": 10, "run3": 100, "run4": 5, "run5": 5}

    def start(run):
        log.append(("start", run.run_id, clock()))
        return FakeJob(clock, duration[run.run_id], log)

    out = planner.execute(runs, 2, deadline=90, hard_end=100, start=start,
                          first_epoch_s=lambda r: first_epoch[r.run_id], clock=clock, sleep=clock.sleep,
                          say=lambda s: None)
    started = [e[1] for e in log if e[0] == "start"]
    # two at a time in priority order; run3's first epoch (100 s) never fits before the deadline
    # (90 s), so it is passed over for the next run that fits
    assert started == ["run0", "run1", "run2", "run4", "run5"]
    assert all(t <= 90 for *_, t in [e for e in log if e[0] == "start"])
    by = {o.run.run_id: o for o in out}
    assert not by["run3"].started and all(by[r].returncode == 0 for r in started)
    assert clock() <= 100


def test_next_stops_what_runs_past_the_budget_and_starts_nothing_after_the_deadline():
    clock, log = FakeClock(), []
    runs = fake_runs(3)

    def start(run):
        log.append(("start", run.run_id, clock()))
        return FakeJob(clock, 1000, log)

    out = planner.execute(runs, 1, deadline=50, hard_end=60, start=start, first_epoch_s=lambda r: None,
                          clock=clock, sleep=clock.sleep, say=lambda s: None)
    assert [e[1] for e in log if e[0] == "start"] == ["run0"]  # no estimate: starts while time is left
    assert ("stop", signal.SIGTERM) in log and 60 <= clock() < 70
    by = {o.run.run_id: o for o in out}
    assert by["run0"].stopped and not by["run1"].started and not by["run2"].started


def test_next_starts_no_run_at_the_deadline_itself():
    """A run without an estimate starts while time is left; when a slot frees exactly at the
    deadline there is none (the fake clock steps 0.5 s: it reaches 50.0 exactly)."""
    clock, log = FakeClock(), []

    def start(run):
        log.append(("start", run.run_id, clock()))
        return FakeJob(clock, 50, log)

    out = planner.execute(fake_runs(2), 1, deadline=50, hard_end=100, start=start, first_epoch_s=lambda r: None,
                          clock=clock, sleep=clock.sleep, say=lambda s: None)
    assert log == [("start", "run0", 0.0)] and clock() == 50.0
    assert [(o.run.run_id, o.started, o.returncode) for o in out] == [("run0", True, 0), ("run1", False, None)]


def test_a_partial_runs_time_left_counts_only_its_epochs_still_to_run(bench):
    run = planner.PlannedRun("table1", [], 0, "run", "/x/run", status="partial", epochs=10, epochs_done=4,
                             epoch_s=30.0)
    assert run.seconds_left(1, bench) == planner.STARTUP_S + 6 * 30.0
    assert run.seconds_left(8, bench) == pytest.approx(planner.STARTUP_S + 6 * 30.0 * 8 / 3.1, rel=1e-12)
    run.status = "finished"
    assert run.seconds_left(1, bench) == 0.0


def test_a_run_without_an_estimate_needs_at_least_the_start_up_to_start(bench):
    """Priorities hold: where an estimated run was passed over because its start-up did not fit,
    a later run the bench lacks is not started either."""
    known, unknown = fake_runs(2)
    known.epoch_s = 10.0
    assert unknown.first_epoch_s(2, bench) == planner.STARTUP_S
    clock, log = FakeClock(), []
    out = planner.execute([known, unknown], 2, deadline=planner.STARTUP_S - 1, hard_end=100,
                          start=lambda r: log.append(r.run_id), first_epoch_s=lambda r: r.first_epoch_s(2, bench),
                          clock=clock, sleep=clock.sleep, say=lambda s: None)
    assert log == [] and [o.started for o in out] == [False, False]
