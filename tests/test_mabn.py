"""MABN (mbn/norms/mabn.py) against the official code's equations (spec §2.3, tests §2.10), in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbn.build import make_model
from mbn.norms import recording
from mbn.norms.mabn import CentredConv2d, MovingAverageBatchNorm2d
from mbn.step import train_step
from tests.conftest import make_cfg
from tests.norm_helpers import assert_fit_and_eval, assert_models_train

C, EPS = 5, 1e-5
NEVER = 10**9  # a step count never reached: warm-up or renormalization off


pytestmark = pytest.mark.usefixtures("float64")  # every test here runs in float64


def mabn(S=4, warmup=0, renorm=NEVER, momentum=0.9, **kw):
    m = MovingAverageBatchNorm2d(C, buffer_size=S, momentum=momentum, warmup_iters=warmup, renorm_start=renorm, **kw)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 2.0, C))
        m.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return m.double().train()


def batch(seed, n=4, scale=1.0, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, 3, 3, generator=g) * scale + shift


def chan(v):
    return v.view(1, -1, 1, 1)


def sq(x):
    return x.square().mean((0, 2, 3))


def step(m, x, gout):
    """One training step of the layer alone: forward, backward with ∂L/∂out = gout."""
    x = x.clone().requires_grad_()
    m.weight.grad = m.bias.grad = None
    out = m(x)
    out.backward(gout)
    return out.detach(), x.grad, m.weight.grad.clone(), m.bias.grad.clone()


def rms_norm(x, w, b):
    return chan(w) * x / torch.sqrt(chan(sq(x)) + EPS) + chan(b)


# ------------------------------------------------------------------ forward and backward formulas
@pytest.mark.parametrize("momentum", [0.0, 0.98])
def test_buffer_one_with_r_pinned_is_rms_norm_with_autograds_gradients(momentum):
    m = mabn(S=1, warmup=0, momentum=momentum)
    for t in range(1, 4):
        x, gout = batch(t, scale=t, shift=0.5 * t), batch(10 + t)
        out, gx, gw, gb = step(m, x, gout)
        x2 = x.clone().requires_grad_()
        w2, b2 = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
        ref = rms_norm(x2, w2, b2)
        for a, e in zip((out, gx, gw, gb), (ref, *torch.autograd.grad(ref, (x2, w2, b2), gout))):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert int(m.step) == 3


def test_buffer_one_momentum_zero_eval_equals_training_output():
    m = mabn(S=1, momentum=0.0)
    x = batch(1, scale=2.0)
    out = step(m, x, batch(2))[0]
    torch.testing.assert_close(m.eval()(x), out, rtol=1e-12, atol=1e-12)


def sma_run(S=4, warmup=0, steps=6, renorm=NEVER, momentum=0.9):
    """Six distinct batches through a layer with a backward each step; returns the layer and the
    per-step (x, gout, out, ∂L/∂x, ∂L/∂γ)."""
    m = mabn(S=S, warmup=warmup, renorm=renorm, momentum=momentum)
    runs = []
    for t in range(1, steps + 1):
        x, gout = batch(t, scale=0.5 + 0.3 * t), batch(20 + t)
        out, gx, gw, _ = step(m, x, gout)
        runs.append((x, gout, out, gx, gw))
    return m, runs


def test_sma_forward_and_backward():
    """S = 4, no warm-up: batch statistics while t <= 4, then the SMAs of ⟨x²⟩ (forward) and of
    Ψ = ⟨g·z⟩ (backward) over the last 4 steps, the current one included."""
    m, runs = sma_run()
    w, b = m.weight.detach(), m.bias.detach()
    s = [None] * 7
    psi = [None] * 7
    for t, (x, gout, out, gx, gw) in enumerate(runs, start=1):
        v = sq(x) if t <= 4 else torch.stack([sq(r[0]) for r in runs[t - 4:t]]).mean(0)
        s[t] = torch.sqrt(v + EPS)
        z = x / chan(s[t])
        torch.testing.assert_close(out, chan(w) * z + chan(b), rtol=1e-12, atol=1e-12)
        g = gout * chan(w)
        psi[t] = (g * z).mean((0, 2, 3))
        psi_bar = psi[t] if t <= 4 else torch.stack(psi[t - 3:t + 1]).mean(0)
        torch.testing.assert_close(gx, (g - z * chan(psi_bar)) / chan(s[t]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gw, (gout * z).sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    # the rings hold exactly the last four steps' statistics
    assert sorted(m.sq_ring.sum(1).tolist()) == pytest.approx(sorted(sq(r[0]).sum().item() for r in runs[2:]))


def test_warmup_uses_batch_statistics_until_warmup_iters():
    """warmup_iters = 6 > S: steps 1..5 normalize with their own batch, step 6 with the SMA."""
    m, runs = sma_run(S=2, warmup=6)
    w, b = m.weight.detach(), m.bias.detach()
    for t, (x, _, out, _, _) in enumerate(runs, start=1):
        v = sq(x) if t < 6 else (sq(x) + sq(runs[t - 2][0])) / 2
        torch.testing.assert_close(out, chan(w) * x / torch.sqrt(chan(v) + EPS) + chan(b), rtol=1e-12, atol=1e-12)


def test_ema_of_second_moment_and_eval():
    """Constant input, S = 1: after T steps R = α^T + (1 − α^T)·⟨x²⟩; eval uses R, no centering."""
    alpha, T = 0.8, 5
    m = mabn(S=1, momentum=alpha)
    x = batch(3, scale=2.0, shift=1.0)
    for _ in range(T):
        step(m, x, batch(4))
    torch.testing.assert_close(m.running_sq, alpha**T + (1 - alpha**T) * sq(x), rtol=1e-12, atol=1e-12)
    w, b = m.weight.detach(), m.bias.detach()
    expected = chan(w) * x / torch.sqrt(chan(m.running_sq) + EPS) + chan(b)
    torch.testing.assert_close(m.eval()(x), expected, rtol=1e-12, atol=1e-12)


def test_renormalization_factor_and_its_constant_gradient():
    """After renorm_start: out = γ·r·z + β with r = clip(s/sqrt(R_old + ε), 1/5, 5) from R before
    this step's update, and ∂L/∂x uses g = ∂L/∂out·γ·r with r a constant (the formula, not
    finite differences: by design this is not the derivative of the forward)."""
    m = mabn(S=1, renorm=2, momentum=0.5)
    for t in (1, 2):
        out, *_ = step(m, batch(t), batch(10 + t))
        torch.testing.assert_close(out, rms_norm(batch(t), m.weight.detach(), m.bias.detach()))  # r = 1
    scales = torch.tensor([0.01, 0.5, 1.0, 3.0, 100.0])  # clipped below, inside, clipped above
    x = batch(3) * chan(scales)
    gout = batch(13)
    r_old = m.running_sq.clone()
    out, gx, gw, gb = step(m, x, gout)
    s = torch.sqrt(sq(x) + EPS)
    r = (s / torch.sqrt(r_old + EPS)).clamp(0.2, 5.0)
    assert r[0] == 0.2 and r[-1] == 5.0 and 0.2 < r[2] < 5.0
    z = x / chan(s)
    w = m.weight.detach()
    torch.testing.assert_close(out, chan(w * r) * z + chan(m.bias.detach()), rtol=1e-12, atol=1e-12)
    g = gout * chan(w * r)
    psi = (g * z).mean((0, 2, 3))
    torch.testing.assert_close(gx, (g - z * chan(psi)) / chan(s), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, (gout * z).sum((0, 2, 3)) * r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, gout.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_sq, 0.5 * r_old + 0.5 * sq(x), rtol=1e-12, atol=1e-12)


def test_gradcheck_where_the_gradient_is_autograds():
    """Batch RMS-norm (S = 1, r = 1): ∂/∂x, ∂/∂γ, ∂/∂β all true derivatives. With the SMAs and
    renormalization on, ∂/∂γ and ∂/∂β still are (out = γ·r·z + β, r and z constants in γ, β)."""
    m = mabn(S=1, warmup=NEVER)
    x = batch(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _with_params(m, x, w, b), (x, m.weight, m.bias))
    m = mabn(S=2, renorm=0, momentum=1.0)  # R stays 1, so r = clip(s) is the same at every call
    x = batch(2, scale=3.0)
    for _ in range(3):
        step(m, x, batch(3))  # fill the ring with this batch: the SMA equals its ⟨x²⟩ from now on
    assert torch.autograd.gradcheck(lambda w, b: _with_params(m, x, w, b), (m.weight, m.bias))


def _with_params(m, x, w, b):
    return torch.func.functional_call(m, {"weight": w, "bias": b}, (x,))


def test_no_gradient_into_state():
    m, _ = sma_run(steps=5)
    assert not any(buf.requires_grad for buf in m.buffers())


# ------------------------------------------------------------------ steps, record pass, double forward
def test_step_counter_advances_in_training_steps_only():
    m = mabn()
    step(m, batch(1), batch(2))
    with torch.no_grad(), recording(m, True):  # double forward's record pass
        m(batch(3))
    m.eval()(batch(4))
    assert int(m.step) == 1


def double_forward_step(m, x, x_after, gout):
    """Main pass (records nothing) + backward, then the record pass on the 'updated' input."""
    with recording(m, False):
        out = step(m, x, gout)
    with torch.no_grad(), recording(m, True):
        m(x_after)
    return out


def test_record_pass_recomputes_the_steps_slot_and_the_ema():
    """Spec §2.9: the record pass overwrites the step's Q slot with ⟨x²⟩ at the updated weights,
    recomputes v by the same rule and sets R ← α·R_prev + (1 − α)·v; t and P are untouched."""
    alpha = 0.7
    m = mabn(S=2, momentum=alpha)
    xs = [batch(t) for t in range(1, 5)]
    after = [x * 1.5 + 0.2 for x in xs]
    R = torch.ones(C)
    for t, (x, xa) in enumerate(zip(xs, after), start=1):
        R_prev, psi_before = m.running_sq.clone(), None
        with recording(m, False):
            step(m, x, batch(30 + t))
        torch.testing.assert_close(m.running_sq, R_prev)  # the main pass leaves R alone
        psi_before, step_before = m.psi_ring.clone(), int(m.step)
        with torch.no_grad(), recording(m, True):
            m(xa)
        v = sq(xa) if t <= 2 else (sq(xa) + sq(after[t - 2])) / 2  # ring: recorded ⟨x²⟩ only
        R = alpha * R + (1 - alpha) * v
        torch.testing.assert_close(m.running_sq, R, rtol=1e-12, atol=1e-12)
        assert int(m.step) == step_before == t
        assert torch.equal(m.psi_ring, psi_before)


def test_record_noop_updates_r_in_the_main_pass_and_nothing_after():
    m = mabn(S=2, momentum=0.7, record="noop")
    x = batch(1)
    with recording(m, False):
        step(m, x, batch(2))
    torch.testing.assert_close(m.running_sq, 0.7 + 0.3 * sq(x), rtol=1e-12, atol=1e-12)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad(), recording(m, True):
        m(x * 3)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_single_forward_is_double_forward_with_the_same_input():
    """The record pass on the unchanged input reproduces what a single-forward step records."""
    a, b = mabn(S=2), mabn(S=2)
    for t in range(1, 5):
        x, gout = batch(t), batch(10 + t)
        step(a, x, gout)
        double_forward_step(b, x, x, gout)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-12, atol=1e-14, msg=k)


def test_ddp_statistics_are_per_process(monkeypatch):
    """Documented: MABN never synchronises — with several processes each normalizes with its own
    batch and rings. Even when the process group claims several ranks, the layer computes
    exactly the single-process result (BN would gather)."""
    import mbn.norms.base as base

    ref, runs = sma_run(steps=3)
    monkeypatch.setattr(base, "distributed", lambda: True)
    m, runs2 = sma_run(steps=3)
    for r1, r2 in zip(runs, runs2):
        for a, b in zip(r1, r2):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ PreciseBN, checkpoints, compile
def test_precise_statistics_write_the_population_second_moment():
    from mbn.norms import precise_statistics

    m, _ = sma_run(steps=5)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    xs = [batch(40 + i, n=2 + i, scale=1 + i) for i in range(3)]
    net = nn.Sequential(m)
    assert precise_statistics(net, [(x, None) for x in xs])
    pooled = torch.cat([x.transpose(0, 1).reshape(C, -1) for x in xs], 1)
    torch.testing.assert_close(m.running_sq, pooled.square().mean(1), rtol=1e-12, atol=1e-12)
    for k, v in m.state_dict().items():  # t, rings and parameters untouched
        if k != "running_sq":
            assert torch.equal(v, state[k]), k
    again = m.running_sq.clone()
    precise_statistics(net, [(x, None) for x in xs])
    assert torch.equal(m.running_sq, again)


def test_state_dict_round_trip_continues_training_identically():
    m, _ = sma_run(steps=5, renorm=3)
    clone = mabn(S=4, renorm=3)
    clone.load_state_dict(copy.deepcopy(m.state_dict()))
    assert set(m.state_dict()) == {"weight", "bias", "running_sq", "step", "sq_ring", "psi_ring"}
    x, gout = batch(50), batch(51)
    for a, b in zip(step(m, x, gout), step(clone, x, gout)):
        assert torch.equal(a, b)
    assert torch.equal(m.eval()(x), clone.eval()(x))


class TinyNet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.conv = CentredConv2d(3, C, 3, padding=1, bias=False)
        self.norm = MovingAverageBatchNorm2d(C, **kw)
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("double_forward,record", [(False, "recompute"), (True, "recompute"), (True, "noop")])
def test_compiles_to_one_graph_and_matches_eager(double_forward, record):
    """fullgraph=True: no graph break (no host read, the warm-up and renorm switches are tensor
    `where`s over t), the backward's ring write included; four steps cross both switches."""
    torch.manual_seed(0)
    eager = TinyNet(buffer_size=2, warmup_iters=2, renorm_start=2, record=record).double()
    compiled = copy.deepcopy(eager)
    forward = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    for model, fwd in ((eager, eager), (compiled, forward)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(4):
            train_step(model, opt, x, y, double_forward, forward=fwd)
    assert int(compiled.norm.step) == 4
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=k)


def test_float32_layer_keeps_fp32_state_under_bf16_input():
    m = MovingAverageBatchNorm2d(C).float()
    x = torch.randn(4, C, 3, 3, dtype=torch.float32).bfloat16().requires_grad_()
    out = m(x)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16
    assert all(b.dtype in (torch.float32, torch.long) for b in m.buffers())


# ------------------------------------------------------------------ weight centralisation, models
def test_weight_centralised_conv():
    conv = CentredConv2d(3, 4, 3, bias=False).double()
    w = conv.weight.detach()
    effective = w - w.mean((1, 2, 3), keepdim=True)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, effective))
    torch.testing.assert_close(effective.sum((1, 2, 3)), torch.zeros(4), atol=1e-14, rtol=0)
    y = conv(x)
    with torch.no_grad():  # a per-filter constant added to W changes nothing
        conv.weight.add_(torch.arange(4.0).view(4, 1, 1, 1))
    torch.testing.assert_close(conv(x), y)
    torch.testing.assert_close(conv(torch.full((1, 3, 5, 5), 2.5)), torch.zeros(1, 4, 3, 3), atol=1e-13, rtol=0)
    # the gradient flows through the centring: it is the projection of the plain conv's gradient
    g = torch.randn(2, 4, 3, 3)
    grad = torch.autograd.grad(conv(x), conv.weight, g)[0]
    w2 = effective.clone().requires_grad_()
    plain = torch.autograd.grad(F.conv2d(x, w2), w2, g)[0]
    torch.testing.assert_close(grad, plain - plain.mean((1, 2, 3), keepdim=True))


@pytest.mark.parametrize("wc", [True, False])
def test_models_use_centred_convs_and_the_ablation_turns_them_off(wc):
    net = make_model(make_cfg(["model=resnet20", "norm=mabn", f"norm.weight_centralization={str(wc).lower()}"]))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(c, CentredConv2d) and c.centre == wc for c in convs)


@pytest.mark.parametrize("model", ["resnet20", "vgg16", "nin"])
def test_works_on_the_cifar_models(model):
    assert_models_train("mabn", MovingAverageBatchNorm2d, [model])


@pytest.mark.parametrize("double_forward", [False, True])
def test_tiny_training_and_eval_end_to_end(tmp_path, double_forward):
    """The second step already normalizes with the SMA and renormalizes."""
    assert_fit_and_eval(tmp_path, ["norm=mabn", "norm.buffer_size=1", "norm.warmup_iters=1", "norm.renorm_start=1"],
                        double_forward)  # in this process: test_gn's runs eval.py's command line
