"""Leaks that change no number: the training step and the evaluation keep no autograd graph in
their accumulators or in any state they carry from call to call (model, optimizer, the
normalizers' buffers), the number of live tensors stays flat over steps, and no tensor a step
makes is still alive after the next one (which would also break a CUDA graph's replay)."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from mbn import norms
from mbn.build import make_model, make_optimizer
from mbn.data import make_loaders
from mbn.step import Evaluator, TrainStep
from tests.conftest import make_cfg


def graph_nodes(tensors) -> int:
    """Autograd nodes reachable from the tensors' grad_fn (0: they hold no graph)."""
    seen, todo = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


def live_tensors() -> int:
    """Tensors alive (the interpreter's objects from before the test are frozen: not walked)."""
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


@pytest.fixture
def frozen_gc():
    """Objects alive before the test move to gc's permanent generation for its duration, so
    counting live tensors walks only what the test made."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def carried_state(step, model, optimizer, *others):
    """Every tensor that lives from one call to the next."""
    out = [*others, *model.parameters(), *model.buffers(), *vars(step).values()]
    out += [v for s in optimizer.state.values() for v in s.values()]
    return [t for t in out if isinstance(t, torch.Tensor)]


def tiny(norm):
    cfg = make_cfg(["data=synthetic", "data.train_size=16", "data.test_size=10", "model=" +
                    ("nin" if norm == "normprop" else "resnet20"), f"norm={norm}", "train.batch_size=4",
                    "train.eval_batch_size=4", "device=cpu"])
    torch.manual_seed(0)
    model = make_model(cfg)
    optimizer = make_optimizer(cfg, model)
    train, test = make_loaders(cfg, torch.device("cpu"))
    norms.set_progress(norms.normalizers(model), 0.5)  # past CBN's burn-in, into BRN's relaxation
    return cfg, model, optimizer, train, test


@pytest.mark.parametrize("norm", sorted(norms.NORMS))
def test_training_steps_and_evaluations_hold_no_graph_and_leave_nothing_behind(norm, frozen_gc, resnet8):
    """8 steps (two epochs of 4) alternating single and double forward, an evaluation after each
    epoch: after every call no carried tensor holds a graph, the accumulators require no grad, the
    outputs and losses of the steps before are gone (freed, not merely unreachable), and the live
    tensor count after the second epoch equals the first's."""
    _, model, optimizer, train, test = tiny(norm)
    made = []  # weak references to the tensors each step makes

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        made.append([weakref.ref(out), weakref.ref(loss)])
        return loss

    steps = [TrainStep(model, optimizer, train, double_forward, loss_fn=loss_fn) for double_forward in (False, True)]
    evaluate = Evaluator(model, test)
    counts = []
    for epoch in range(2):
        train.start_epoch(epoch)
        for i in range(len(train)):
            step = steps[i % 2]
            step()
            for earlier in made[:-1]:
                assert all(ref() is None for ref in earlier), "a tensor of an earlier step is still alive"
            for s in steps:
                assert not s.loss_sum.requires_grad and not s.errors.requires_grad
                assert s.loss_sum.grad_fn is None and s.errors.grad_fn is None
            assert graph_nodes(carried_state(step, model, optimizer)) == 0
        evaluate()
        assert not evaluate.sums.requires_grad and evaluate.sums.grad_fn is None
        assert graph_nodes(carried_state(evaluate, model, optimizer)) == 0
        counts.append(live_tensors())
    assert counts[1] == counts[0], "live tensors grew from one epoch to the next"
