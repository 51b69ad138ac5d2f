"""The graph-capturable training step, proven on a CPU: it equals the plain step in float64, its
compiled model has no graph break and never recompiles after warm-up, and a run stopped by the
clock resumes to the identical result."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mbn import norms
from mbn.build import make_model, make_optimizer, set_lr
from mbn.checkpoint import load_checkpoint
from mbn.data import make_loaders
from mbn.engine import fit
from mbn.norms import recording
from mbn.schedules import step_lr
from mbn.step import Evaluator, TrainStep
from tests.conftest import TINY, make_cfg

CASES = [("bn", False), ("bn", True), ("brn", True), ("mbn", False), ("mbn", True), ("normprop", False)]


def reference_step(model, optimizer, x, y, double_forward):
    """The eager step as it was before the graph-style rewrite (commit 30966b2)."""
    with recording(model, not double_forward):
        out = model(x)
        loss = F.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if double_forward:
        with torch.no_grad(), recording(model, True):
            model(x)
    return loss.detach() * len(y), (out.detach().argmax(1) != y).sum()


class Float64:
    """The device-side batch plan, in float64."""

    def __init__(self, batches):
        self.batches, self.device, self.capturable = batches, batches.device, True

    def next_batch(self):
        x, y, valid = self.batches.next_batch()
        return x.double(), y, valid


def tiny_cfg(norm, extra=()):
    model = "nin" if norm == "normprop" else "resnet20"
    return make_cfg(["data=synthetic", "data.train_size=12", "data.test_size=16", f"model={model}", f"norm={norm}",
                     "train.batch_size=4", "train.eval_batch_size=8", "optim.lr=0.02", "device=cpu",
                     "seed=0", *extra])


def scheduled(cfg, model, optimizer, step, total):
    progress = step / total
    set_lr(optimizer, step_lr(cfg.optim.lr, cfg.schedule.milestones, cfg.schedule.gamma, progress))
    norms.set_progress(norms.normalizers(model), progress)


@pytest.mark.parametrize("norm,double_forward", CASES)
def test_graph_style_step_equals_the_plain_step_in_float64(norm, double_forward):
    """6 steps over two epochs, across both lr milestones and λ / r_max changes: parameters,
    momentum, every buffer (MBN memory, running statistics), loss and error sums agree."""
    extra = ["norm.relax_start=0.1", "norm.r_max_end=0.9", "norm.d_max_end=0.9"] if norm == "brn" else []
    cfg = tiny_cfg(norm, extra)
    torch.manual_seed(0)
    model = make_model(cfg).double()
    ref_model = copy.deepcopy(model)
    norms.bind_convs(ref_model)  # the copy's normalizers must see the copy's convolutions
    opt, ref_opt = make_optimizer(cfg, model), make_optimizer(cfg, ref_model)
    train, _ = make_loaders(cfg, torch.device("cpu"))
    step = TrainStep(model, opt, Float64(train), double_forward)
    ref_train, _ = make_loaders(cfg, torch.device("cpu"))
    total, ref_loss, ref_err = 6, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.long)
    for epoch in range(2):
        train.start_epoch(epoch)
        ref_batches = ref_train.epoch(epoch)
        for i in range(len(train)):
            s = epoch * len(train) + i
            scheduled(cfg, model, opt, s, total)
            scheduled(cfg, ref_model, ref_opt, s, total)
            step()
            x, y = next(ref_batches)
            loss, err = reference_step(ref_model, ref_opt, x.double(), y, double_forward)
            ref_loss += loss
            ref_err += err
    assert len(train) * 2 == total
    torch.testing.assert_close(step.loss_sum, ref_loss, rtol=1e-12, atol=0)
    assert int(step.errors) == int(ref_err)
    for (k, a), b in zip(model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=k)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-14)
    if norm == "mbn":
        assert norms.scheduled_values(model)["lam"] == 0.9
    if norm == "brn":
        assert norms.scheduled_values(model)["r_max"] > 1


def test_evaluator_masks_the_padded_last_batch():
    """Every test sample counts once: 16 samples in batches of 6 (the last one padded)."""
    cfg = tiny_cfg("bn", ["train.eval_batch_size=6"])
    torch.manual_seed(0)
    model = make_model(cfg)
    _, test = make_loaders(cfg, torch.device("cpu"))
    got = Evaluator(model, test)()
    model.eval()
    with torch.no_grad():
        out = model(((test.images.float() / 255 - test.mean) / test.std))
    assert got["loss"] == pytest.approx(F.cross_entropy(out, test.labels).item(), rel=1e-5)
    assert got["err"] == pytest.approx(100.0 * (out.argmax(1) != test.labels).float().mean().item())


def test_replay_recaptures_when_the_lr_changes(monkeypatch):
    """The capture logic, with CUDA's graph calls replaced by fakes that remember the lr a capture
    saw: every call trains with the lr set for it (a replay never keeps a stale one), warm-up runs
    eagerly, and there is one capture per lr value."""
    import contextlib

    from mbn.step import Replay

    capturing, done = [], []

    class FakeGraph:
        def replay(self):
            done.append(("replay", self.lr))

    class FakeStream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def fake_capture(graph):
        capturing.append(graph)
        yield
        capturing.pop()

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    cfg = tiny_cfg("bn")
    model = make_model(cfg)
    opt = make_optimizer(cfg, model)
    train, _ = make_loaders(cfg, torch.device("cpu"))
    step = TrainStep(model, opt, train, False, graph=True)

    def body():
        lr = opt.param_groups[0]["lr"]
        if capturing:
            capturing[-1].lr = lr
        else:
            done.append(("eager", lr))

    step.replay.body = body
    assert isinstance(step.replay, Replay) and step.replay.graph_on
    lrs = [0.1] * 5 + [0.01] * 3 + [0.001] * 4
    for lr in lrs:
        set_lr(opt, lr)
        step()
    assert [lr for _, lr in done] == lrs
    assert [kind for kind, _ in done] == ["eager"] * 3 + ["replay"] * 2 + ["eager", "replay", "replay"] + \
        ["eager"] + ["replay"] * 3
    assert step.replay.captures == 3


def compile_counters(norm):
    """Train 2 epochs with the model compiled (fullgraph) through the dynamo 'eager' backend — each
    epoch some steps with single forward (record on), some with double forward (record off, then
    on without grad), then an evaluation — across lr / λ / r_max changes. Returns (graphs after
    the first epoch, graphs at the end, graph breaks)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    extra = ["norm.relax_start=0.0", "norm.r_max_end=0.5", "norm.d_max_end=0.5"] if norm == "brn" else []
    cfg = tiny_cfg(norm, extra)
    torch.manual_seed(0)
    model = make_model(cfg)
    opt = make_optimizer(cfg, model)
    forward = torch.compile(model, backend="eager", fullgraph=True)
    train, test = make_loaders(cfg, torch.device("cpu"))
    steps = [TrainStep(model, opt, train, df, forward=forward) for df in (False, True)]
    evaluate = Evaluator(model, test, forward=forward)
    total, warm = 2 * len(train), None
    for epoch in range(2):
        train.start_epoch(epoch)
        for i in range(len(train)):
            scheduled(cfg, model, opt, epoch * len(train) + i, total)
            steps[i % 2]()
        evaluate()
        if warm is None:
            warm = counters["stats"]["unique_graphs"]
    return warm, counters["stats"]["unique_graphs"], dict(counters["graph_break"])


@pytest.mark.parametrize("norm", sorted(norms.NORMS))
def test_compiled_model_has_no_graph_break_and_no_recompile_after_warmup(norm, resnet8):
    """ResNet-8 has every kind of block and normalizer mode ResNet-20 has, traced in a third of the time."""
    warm, end, breaks = compile_counters(norm)
    assert not breaks
    assert warm >= 3 and end == warm  # train with and without recording, record pass, eval: compiled once


def test_time_limit_stops_at_an_epoch_boundary_and_resumes_bitwise(tmp_path, resnet8):
    overrides = TINY + ["norm=mbn", "train.epochs=3", "data.train_size=64", "train.precise_batches=0"]
    straight, clocked = tmp_path / "straight", tmp_path / "clocked"
    fit(make_cfg(overrides), str(straight))
    first = fit(make_cfg(overrides + ["train.time_limit=0.001"]), str(clocked))  # no second epoch fits
    assert not first["finished"] and first["epoch"] == 1 and not (clocked / "metrics.json").exists()
    fit(make_cfg(overrides), str(clocked))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(clocked / "checkpoint.pt")
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


class HostTraffic:
    """Records every op that reads a tensor back to the host (.item(), bool(), .tolist()), makes a
    tensor from host data, or copies across devices."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func)
                if "_local_scalar_dense" in name or "lift_fresh" in name:
                    seen.append(name)
                if "_to_copy" in name and kwargs.get("device") not in (None, args[0].device):
                    seen.append(f"{name} to {kwargs['device']}")
                return func(*args, **kwargs)

        self.mode = Mode()


@pytest.mark.parametrize("norm", sorted(norms.NORMS))
def test_step_and_evaluation_never_touch_the_host(norm):
    """What a captured CUDA graph needs, checked on a CPU: inside a training step (single and double
    forward) and an evaluation batch no op reads a value back, makes a tensor from host data, or
    copies across devices."""
    cfg = tiny_cfg(norm)
    torch.manual_seed(0)
    model = make_model(cfg)
    opt = make_optimizer(cfg, model)
    train, test = make_loaders(cfg, torch.device("cpu"))
    steps = [TrainStep(model, opt, train, df) for df in (False, True)]
    evaluate = Evaluator(model, test)
    train.start_epoch(0)
    scheduled(cfg, model, opt, 0, 10)
    for step in steps:
        step()  # first calls may create optimizer state
    train.start_epoch(1)
    traffic = HostTraffic()
    with traffic.mode:
        for step in steps:
            step.body()
        model.eval()
        test.start_epoch()
        evaluate.body()
    assert traffic.seen == []
