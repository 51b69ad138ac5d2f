"""The training step and the evaluation pass, written once in the form a CUDA graph can capture.

Each is a body of device ops over static state: the batch comes from the device-side plan of
`mbn.data.Batches` (a cursor advanced inside the body), the loss sum and error counts accumulate
into device tensors, and nothing is read back to the host. On a CPU (and wherever
`perf.cuda_graph` is off) the body simply runs eagerly, so the CPU tests prove the very code that
a GPU replays. On CUDA, `Replay` runs the first calls eagerly on a side stream (compilation,
cuDNN autotuning, optimizer state), then captures the body once and replays it; a change of the
host-side constants baked into the capture (the learning rate) captures it again.
"""
import contextlib

import torch
import torch.nn.functional as F

from mbn.norms import recording


class Replay:
    """Calls `body()` once per call: eagerly, or — with `graph` — as a CUDA graph captured per
    `key` (the host-side constants the body bakes in, e.g. the lr). Before a capture the body runs
    eagerly on a side stream: `warmup` calls for the first key (compilation, cuDNN autotuning,
    optimizer state), one after every change of key (a new constant may mean a recompilation)."""

    def __init__(self, body, graph: bool = False, warmup: int = 3):
        self.body, self.graph_on, self.warmup = body, graph, warmup
        self.key, self.graph, self.captures, self.eager_left = None, None, 0, None

    def __call__(self, key=None) -> None:
        if not self.graph_on:
            self.body()
            return
        if self.eager_left is None or key != self.key:
            self.key, self.graph = key, None  # free the old capture before making a new one
            self.eager_left = self.warmup if self.eager_left is None else 1
        if self.eager_left > 0:
            self.eager_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body()
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.body()
            self.graph = graph
            self.captures += 1
        self.graph.replay()


class TrainStep:
    """One SGD update on the next training batch. Single forward: the training forward records
    statistics. Double forward (Algorithm 1): train without recording, step, then record with a
    second no-grad forward of the same batch, so stored statistics come from the updated weights.
    `loss_sum` and `errors` accumulate on the device until `reset()`; so does the per-step curve
    (`step_loss`, `step_errors`: one row per step of the epoch, written at the device counter
    `index` — static shapes, no host read — and read once, by `step_curves`, at the epoch's end).

    `loss_fn(out, y)` is the mean loss; several models trained as one (mbn.stacked) give a loss
    per model, shape `per_model`, and train on their sum; the sums are then per model too."""

    def __init__(self, model, optimizer, batches, double_forward: bool, autocast=contextlib.nullcontext,
                 forward=None, graph: bool = False, loss_fn=F.cross_entropy, per_model=()):
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.forward = model if forward is None else forward
        self.double_forward, self.autocast, self.loss_fn = double_forward, autocast, loss_fn
        device = batches.device
        self.loss_sum = torch.zeros(per_model, device=device, dtype=torch.float64)
        self.errors = torch.zeros(per_model, device=device, dtype=torch.long)
        steps = len(batches) if hasattr(batches, "__len__") else 1  # a row per step of an epoch
        self.step_loss = torch.zeros(steps, *per_model, device=device, dtype=torch.float64)
        self.step_err = torch.zeros(steps, *per_model, device=device, dtype=torch.float64)
        self.index = torch.zeros((), device=device, dtype=torch.long)
        self.replay = Replay(self.body, graph and batches.capturable)

    def body(self) -> None:
        x, y, _ = self.batches.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        with recording(self.model, not self.double_forward), self.autocast():
            out = self.forward(x)
            loss = self.loss_fn(out, y)
        loss.sum().backward()
        self.optimizer.step()
        # read the outputs before the second forward, which may reuse their memory
        mean_loss = loss.detach().double()
        errors = (out.detach().argmax(-1) != y).sum(0)
        self.loss_sum += mean_loss * y.size(0)
        self.errors += errors
        row = self.index.remainder(len(self.step_loss)).view(1)  # wraps instead of writing out of bounds
        self.step_loss.index_copy_(0, row, mean_loss.unsqueeze(0))
        self.step_err.index_copy_(0, row, (errors.double() / y.size(0)).unsqueeze(0))
        self.index += 1
        if self.double_forward:
            with torch.no_grad(), recording(self.model, True), self.autocast():
                self.forward(x)

    def __call__(self) -> None:
        self.replay(key=tuple(g["lr"] for g in self.optimizer.param_groups))

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.errors.zero_()
        self.step_loss.zero_()
        self.step_err.zero_()
        self.index.zero_()

    def step_curves(self, steps: int):
        """The training loss and error (%) of each of the first `steps` steps since `reset()` (each
        the mean over the step's batch; under DDP over this process's share of it), as host lists:
        the one read of the buffers, at the epoch's end."""
        rows = torch.stack([self.step_loss[:steps], 100.0 * self.step_err[:steps]]).cpu()
        return rows[0].tolist(), rows[1].tolist()


class Evaluator:
    """Test loss, top-1 and top-5 error (%) in eval mode over every sample of `batches` (the last
    batch padded and masked)."""

    def __init__(self, model, batches, autocast=contextlib.nullcontext, forward=None, graph: bool = False):
        self.model, self.batches, self.autocast = model, batches, autocast
        self.forward = model if forward is None else forward
        self.sums = torch.zeros(3, device=batches.device, dtype=torch.float64)  # loss, top-1, top-5 errors
        self.replay = Replay(self.body, graph and batches.capturable, warmup=2)

    @torch.no_grad()
    def body(self) -> None:
        x, y, valid = self.batches.next_batch()
        with self.autocast():
            out = self.forward(x)
        loss = F.cross_entropy(out.float(), y, reduction="none")
        top = out.topk(min(5, out.size(1)), dim=1).indices
        wrong1 = top[:, 0] != y
        wrong5 = (top != y[:, None]).all(1)
        v = valid.double()
        self.sums += torch.stack([(loss.double() * v).sum(), (wrong1.double() * v).sum(), (wrong5.double() * v).sum()])

    def __call__(self, key=None) -> dict:
        was_training = self.model.training
        self.model.eval()
        self.sums.zero_()
        self.batches.start_epoch()
        for _ in range(len(self.batches)):
            self.replay(key)
        self.model.train(was_training)
        loss, e1, e5 = self.sums.tolist()  # the one host read
        n = self.batches.num_samples
        return {"loss": loss / n, "err": 100.0 * e1 / n, "err5": 100.0 * e5 / n}


def precise_data(train_batches, batch_size: int, num_batches: int):
    """The training batches PreciseBN averages over: augmented as in training, in batches of at
    least 128 (statistics of tiny batches would be biased toward them), from a plan of their own."""
    batches = train_batches.resized(min(max(batch_size, 128), train_batches.num_samples))
    batches.start_epoch(10**6)
    return (batches.next_batch()[:2] for _ in range(min(num_batches, len(batches))))


def train_step(model, optimizer, x, y, double_forward: bool, autocast=contextlib.nullcontext, forward=None):
    """One step on a given batch (tests and the benchmark): returns (summed loss, errors) tensors."""
    step = TrainStep(model, optimizer, _Fixed(x, y), double_forward, autocast, forward)
    step()
    return step.loss_sum, step.errors


class _Fixed:
    """A batch source that always serves one batch."""

    capturable = True

    def __init__(self, x, y):
        self.x, self.y, self.device = x, y, x.device
        self.valid = torch.ones_like(y, dtype=torch.bool)

    def next_batch(self):
        return self.x, self.y, self.valid
