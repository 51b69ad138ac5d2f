"""Every number the training loop and the evaluation report, against a value computed here by
other means: losses and top-1/top-5 errors counted by hand (in Python, from the logits the model
gave or from a model whose logits are known), λ, the lr and BRN's r_max/d_max from their formulas,
the running-average and PreciseBN test errors from reference models built here, and the epoch
time and images/s inside stopwatch bounds taken around the loop's own phases."""
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbn import engine
from mbn.build import make_model
from mbn.checkpoint import load_checkpoint
from mbn.data import Batches, make_loaders
from mbn.norms import normalizers
from mbn.step import Evaluator, TrainStep
from tests.conftest import make_cfg


# ------------------------------------------------------------------ counting by hand
def hand_counts(rows):
    """(summed cross-entropy, top-1 wrong, top-5 wrong) of [(logits as floats, label)], in
    Python: a sample is top-k wrong when k or more classes score above its label."""
    loss = wrong1 = wrong5 = 0
    for z, y in rows:
        top = max(z)
        loss += top + math.log(sum(math.exp(v - top) for v in z)) - z[y]
        above = sum(v > z[y] for v in z)
        wrong1 += above >= 1
        wrong5 += above >= 5
    return loss, wrong1, wrong5


def rows_of(out, y, valid=None):
    keep = range(len(y)) if valid is None else [i for i in range(len(y)) if bool(valid[i])]
    return [(out[i].double().tolist(), int(y[i])) for i in keep]


def logits_with_label_at(ranks, classes, seed=0):
    """One row per rank r (1 = the label scores highest): distinct logits, the label's r-th from the top."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for r in ranks:
        jitter = torch.rand(classes, generator=g, dtype=torch.float64) * 0.1
        scores = torch.randperm(classes, generator=g).double() * 0.7 + jitter  # distinct
        order = scores.argsort(descending=True)
        label = int(order[r - 1])
        rows.append(scores)
        labels.append(label)
    return torch.stack(rows), torch.tensor(labels)


class Served:
    """An evaluation source over fixed inputs in batches of `size`, the last one padded with
    copies of the first sample and masked, as mbn.data.Batches serves the test set."""

    capturable = True

    def __init__(self, x, y, size):
        self.x, self.y, self.size, self.device = x, y, size, x.device
        self.num_samples = len(y)
        self.i = 0

    def __len__(self):
        return math.ceil(self.num_samples / self.size)

    def start_epoch(self, epoch=0):
        self.i = 0

    def next_batch(self):
        idx = torch.arange(self.i * self.size, (self.i + 1) * self.size)
        valid = idx < self.num_samples
        idx = torch.where(valid, idx, torch.zeros_like(idx))  # padding: sample 0 again
        self.i += 1
        return self.x[idx], self.y[idx], valid


@pytest.mark.parametrize("classes", [10, 3])
def test_evaluator_loss_top1_and_top5_equal_a_hand_count(classes):
    """Logits served as the model's output: labels placed at every rank from 1 to 10 (ranks 2-5
    are top-1 wrong but top-5 right), 13 samples in batches of 5 (the last padded with a sample
    that is wrong at both). With 3 classes the top five hold every class: no top-5 error."""
    ranks = [1, 2, 3, 4, 5, 6, 7, 10, 1, 5, 6, 2, 9] if classes == 10 else [1, 2, 3, 1, 3, 2, 2, 1, 3, 3, 1, 2, 3]
    x, y = logits_with_label_at(ranks, classes)
    got = Evaluator(nn.Identity(), Served(x, y, 5))()
    loss, wrong1, wrong5 = hand_counts(rows_of(x, y))
    assert wrong1 == sum(r > 1 for r in ranks) and wrong5 == sum(r > 5 for r in ranks)
    assert got["loss"] == pytest.approx(loss / 13, rel=1e-6)
    assert got["err"] == pytest.approx(100.0 * wrong1 / 13, abs=1e-9)
    assert got["err5"] == pytest.approx(100.0 * wrong5 / 13, abs=1e-9)


@pytest.mark.parametrize("double_forward", [False, True])
def test_train_step_loss_and_error_sums_equal_hand_sgd(double_forward):
    """A linear classifier W x + b (W = I, b = 0 at first) trained with plain SGD by TrainStep,
    and the same SGD written out here in Python (∂loss/∂W = Σ (softmax − onehot) xᵀ / n): the
    step's summed loss and error count are those of each update's forward, before the update
    (the double forward's record pass after it must not count), over 3 steps of 4 samples."""
    classes, n, lr = 4, 4, 2.0
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, classes, generator=g, dtype=torch.float64) * 2,
                torch.randint(0, classes, (n,), generator=g)) for _ in range(3)]
    model = nn.Linear(classes, classes).double()
    with torch.no_grad():
        model.weight.copy_(torch.eye(classes))
        model.bias.zero_()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=lr), Served(*map(torch.cat, zip(*batches)), n),
                     double_forward)
    W = [[float(i == j) for j in range(classes)] for i in range(classes)]
    b = [0.0] * classes
    loss_sum, errors = 0.0, 0
    for xb, yb in batches:
        step()
        rows = [([sum(W[c][k] * xi[k] for k in range(classes)) + b[c] for c in range(classes)], int(yi))
                for xi, yi in zip(xb.tolist(), yb)]
        loss, wrong1, _ = hand_counts(rows)
        loss_sum, errors = loss_sum + loss, errors + wrong1
        for (z, y), xi in zip(rows, xb.tolist()):
            top = max(z)
            p = [math.exp(v - top) for v in z]
            p = [v / sum(p) for v in p]
            for c in range(classes):
                d = (p[c] - (c == y)) / n
                b[c] -= lr * d
                for k in range(classes):
                    W[c][k] -= lr * d * xi[k]
    assert step.loss_sum.item() == pytest.approx(loss_sum, rel=1e-12)
    assert int(step.errors) == errors
    torch.testing.assert_close(model.weight, torch.tensor(W, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    step.reset()
    assert step.loss_sum.item() == 0 and int(step.errors) == 0


# ------------------------------------------------------------------ the loop's reports, end to end
class Spy:
    """Watches a `fit` through mbn.step and mbn.data alone: every batch the loop draws, every output
    its model gives (training forwards, and one list per evaluation), and stopwatch marks around
    every training step and every evaluation."""

    def __init__(self, mp):
        self.batches, self.train, self.evaluations = {}, [], []
        self.steps, self.evaluated = [], []  # (start, end) of each step() and each evaluation
        next_batch, evaluate, step = Batches.next_batch, Evaluator.__call__, TrainStep.__call__

        def spy_next_batch(batches):
            x, y, valid = next_batch(batches)
            self.batches[id(x)] = (x, y, valid)  # x is kept: its id stays unique
            return x, y, valid

        def timed(call, marks):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                out = call(*args, **kwargs)
                marks.append((t0, time.perf_counter()))
                return out
            return wrapper

        timed_evaluate = timed(evaluate, self.evaluated)

        def spy_evaluate(*args, **kwargs):
            self.evaluations.append([])  # the outputs of this evaluation go here
            return timed_evaluate(*args, **kwargs)

        def spy_make_model(cfg):
            model = make_model(cfg)
            model.register_forward_hook(lambda *a: self.hook(*a))  # a function: deepcopy (PreciseBN) keeps it
            return model

        mp.setattr(Batches, "next_batch", spy_next_batch)
        mp.setattr(Evaluator, "__call__", spy_evaluate)
        mp.setattr(TrainStep, "__call__", timed(step, self.steps))
        mp.setattr(engine, "make_model", spy_make_model)

    def hook(self, module, args, out):
        _, y, valid = self.batches[id(args[0])]
        if not module.training:
            self.evaluations[-1].extend(rows_of(out.detach(), y, valid))
        elif torch.is_grad_enabled():  # the training forward (not a record pass, not PreciseBN's)
            self.train.append(rows_of(out.detach(), y))


def percent(count, n):
    return 100.0 * count / n


# MBN (memory, running averages and PreciseBN at the end), 2 steps an epoch, 3 epochs: the last
# steps of the epochs fall in each of the schedule's three stages
MBN_RUN = ["data=synthetic", "data.train_size=64", "data.test_size=40", "data.augment=false", "model=resnet20",
           "norm=mbn", "train.batch_size=32", "train.eval_batch_size=16", "train.epochs=3", "train.precise_batches=5",
           "train.progress=false", "logger=none", "device=cpu", "seed=3"]


@pytest.fixture(scope="module")
def mbn_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("values")
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        spy.started = time.perf_counter()
        summary = engine.fit(make_cfg(MBN_RUN), str(run_dir))
    history = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return summary, history, spy, run_dir


def test_reported_training_loss_and_error_are_the_epochs_hand_counts(mbn_run):
    summary, history, spy, _ = mbn_run
    assert len(spy.train) == 6 and len(history) == 3
    for epoch, h in enumerate(history):
        rows = [r for batch in spy.train[2 * epoch:2 * epoch + 2] for r in batch]
        loss, wrong1, _ = hand_counts(rows)
        assert h["train_loss"] == pytest.approx(loss / 64, rel=1e-5)
        assert h["train_err"] == pytest.approx(percent(wrong1, 64), abs=1e-9)
        assert h["step"] == 2 * (epoch + 1)
    assert summary["train_loss"] == history[-1]["train_loss"] and summary["train_err"] == history[-1]["train_err"]


def test_reported_test_loss_top1_and_top5_are_hand_counts_over_every_test_sample(mbn_run):
    summary, history, spy, _ = mbn_run
    for h, rows in zip(history, spy.evaluations):
        assert len(rows) == 40  # every sample once, the padding of the last batch left out
        loss, wrong1, wrong5 = hand_counts(rows)
        assert h["test_loss"] == pytest.approx(loss / 40, rel=1e-5)
        assert h["test_err"] == pytest.approx(percent(wrong1, 40), abs=1e-9)
        assert h["test_err5"] == pytest.approx(percent(wrong5, 40), abs=1e-9)
    assert (summary["test_err"], summary["test_err5"]) == (history[-1]["test_err"], history[-1]["test_err5"])


def test_lr_and_lambda_are_the_schedule_at_each_epochs_last_step(mbn_run):
    """lr = 0.1·0.1^(milestones passed), λ = (0.1, 0.5, 0.9)[milestones passed], milestones 0.4
    and 0.6 of the 6 steps, at the epoch's last step s (progress s/6)."""
    _, history, _, _ = mbn_run
    for h in history:
        passed = sum((h["step"] - 1) / 6 >= m for m in (0.4, 0.6))
        assert h["lr"] == pytest.approx(0.1 * 0.1 ** passed, rel=1e-12)
        assert h["lam"] == pytest.approx((0.1, 0.5, 0.9)[passed], rel=1e-12)


def reference_outputs(state, overrides, x, precise_x=None):
    """The trained weights in a model built here for `overrides`, evaluated on x. With precise_x,
    every statistics layer first gets the mean and biased variance of its input over precise_x
    (a train-mode pass normalizing with those batch statistics: PreciseBN over one batch)."""
    model = make_model(make_cfg(overrides))
    missing, _ = model.load_state_dict(state, strict=False)
    assert not missing
    if precise_x is not None:
        inputs = {}
        hooks = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].detach()))
                 for m in normalizers(model)]
        model.train()
        with torch.no_grad():
            model(precise_x)
        for h in hooks:
            h.remove()
        for m, seen in inputs.items():
            m.running_mean.copy_(seen.mean((0, 2, 3)))
            m.running_var.copy_(seen.var((0, 2, 3), correction=0))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def references(mbn_run):
    """Hand counts (summed loss, top-1 wrong, top-5 wrong) over the whole test set, in one batch, of
    the final checkpoint: as MBN infers (""), as BN (built here) with MBN's running averages
    ("_running"), and as BN with each layer's statistics over the unaugmented training set ("_precise")."""
    run_dir = mbn_run[3]
    state = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    train, test = make_loaders(make_cfg(MBN_RUN), torch.device("cpu"))
    x = (test.images.float() / 255 - test.mean) / test.std
    train_x = (train.images.float() / 255 - train.mean) / train.std
    bn = [o.replace("norm=mbn", "norm=bn") for o in MBN_RUN]
    outputs = {"": reference_outputs(state, MBN_RUN, x), "_running": reference_outputs(state, bn, x),
               "_precise": reference_outputs(state, bn, x, train_x)}
    return {suffix: hand_counts(rows_of(out, test.labels)) for suffix, out in outputs.items()}


def test_final_and_running_and_precise_test_errors_equal_reference_models(mbn_run, references):
    summary, _, spy, _ = mbn_run
    for suffix, (_, wrong1, _) in references.items():
        assert summary[f"test_err{suffix}"] == pytest.approx(percent(wrong1, 40), abs=1e-9), suffix
    # the evaluations after training, in order: running averages, then PreciseBN
    assert len(spy.evaluations) == 5
    for suffix, rows in (("_running", spy.evaluations[3]), ("_precise", spy.evaluations[4])):
        assert hand_counts(rows)[1] == references[suffix][1], suffix


def test_eval_py_reports_the_reference_models_loss_top1_and_top5(mbn_run, references):
    from eval import evaluate_checkpoint

    report = evaluate_checkpoint(str(mbn_run[3] / "checkpoint.pt"), precise_batches=5)
    for suffix, (loss, wrong1, wrong5) in references.items():
        assert report[f"test_loss{suffix}"] == pytest.approx(loss / 40, rel=1e-5), suffix
        assert report[f"test_err{suffix}"] == pytest.approx(percent(wrong1, 40), abs=1e-9), suffix
        assert report[f"test_err5{suffix}"] == pytest.approx(percent(wrong5, 40), abs=1e-9), suffix


def test_epoch_time_and_images_per_second_lie_within_stopwatch_bounds(mbn_run):
    """An epoch's time covers its two training steps (at least the stopwatch around them) and lies
    between the previous evaluation's end (or the start of fit) and its own evaluation's start;
    images/s is the epoch's 64 images over that time; wall_time is the sum."""
    summary, history, spy, _ = mbn_run
    for e, h in enumerate(history):
        steps = spy.steps[2 * e:2 * e + 2]
        began = spy.evaluated[e - 1][1] if e else spy.started
        assert sum(end - start for start, end in steps) <= h["epoch_time"] <= spy.evaluated[e][0] - began
        assert h["images_per_s"] == pytest.approx(64 / h["epoch_time"], rel=1e-9)
    assert summary["wall_time"] == pytest.approx(sum(h["epoch_time"] for h in history), rel=1e-12)


def test_brn_reports_r_max_and_d_max_of_its_linear_ramp(tmp_path):
    """r_max rises linearly from 1 to 3 and d_max from 0 to 5 between progress 0.2 and 0.6 (d_max:
    0.8); the logged values are those of the epoch's last step s of 4 (progress s/4)."""
    overrides = ["data=synthetic", "data.train_size=32", "data.test_size=16", "model=resnet20", "norm=brn",
                 "norm.relax_start=0.2", "norm.r_max_end=0.6", "norm.d_max_end=0.8", "train.batch_size=16",
                 "train.eval_batch_size=16", "train.epochs=2", "train.precise_batches=0", "train.progress=false",
                 "logger=none", "device=cpu"]
    engine.fit(make_cfg(overrides), str(tmp_path))
    history = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for h in history:
        p = (h["step"] - 1) / 4
        assert h["r_max"] == pytest.approx(1 + 2 * min(max((p - 0.2) / 0.4, 0), 1), rel=1e-12)
        assert h["d_max"] == pytest.approx(5 * min(max((p - 0.2) / 0.6, 0), 1), rel=1e-12)
    assert [h["step"] for h in history] == [2, 4]
