"""One training loop: train step (single or double forward), evaluation, checkpoints, resume."""
import contextlib
import json
import math
import os
import random

import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

import models
from mbn import UserError, norms
from mbn.checkpoint import (CHECKPOINT, config_differences, load_checkpoint, rng_state, save_checkpoint,
                            set_rng_state)
from mbn.data import make_loaders
from mbn.double_forward import recording
from mbn.schedules import step_lr
from mbn.tracking import JsonlTracker, Tracker, Trackers, WandbTracker, atomic_write_text, run_record



# ------------------------------------------------------------------------------ building
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def make_model(cfg) -> torch.nn.Module:
    """Model with the configured normalizer; weight-normalizing layers bound to their convs."""
    name = cfg.model.name
    if name not in models.MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {sorted(models.MODELS)} (model=<name>)")
    spec = norms.get_spec(cfg.norm.name)
    model = models.build_model(name, cfg.data.num_classes, norms.build_norm(cfg.norm), norms.build_act(cfg.norm))
    if getattr(model, "residual", False) and not spec.residual_ok:
        raise UserError(f"norm={cfg.norm.name} is defined for plain networks only and {name} is residual "
                        "(the paper leaves these cells empty); use model=nin or model=vgg16, or another norm")
    norms.bind_convs(model)
    return model


def make_optimizer(cfg, model):
    if cfg.optim.name != "sgd":
        raise UserError(f"unknown optimizer {cfg.optim.name!r}; only optim=sgd is provided")
    o = cfg.optim
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def resolve_perf(perf, device) -> dict:
    """Fill the `auto` (null) performance settings for the device: fast on GPU, exact on CPU."""
    gpu = device.type == "cuda"
    precision = perf.precision if perf.precision != "auto" else ("bf16" if gpu else "fp32")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"perf.precision must be auto, fp32 or bf16, got {perf.precision!r}")
    return {"precision": precision,
            "channels_last": gpu if perf.channels_last is None else perf.channels_last,
            "compile": gpu if perf.compile is None else perf.compile,
            "compile_mode": perf.compile_mode}


def autocast_for(perf: dict, device):
    if perf["precision"] == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ---------------------------------------------------------------------------- one step
def train_step(model, optimizer, x, y, double_forward: bool, autocast=contextlib.nullcontext, forward=None):
    """One SGD update. Single forward: the training forward records statistics. Double forward
    (Algorithm 1): train without recording, step, then record with a second no-grad forward on
    the same batch, so stored statistics come from the updated weights. Returns the summed loss
    and number of errors as device tensors (no host synchronisation)."""
    forward = model if forward is None else forward
    with recording(model, not double_forward), autocast():
        out = forward(x)
        loss = F.cross_entropy(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if double_forward:
        with torch.no_grad(), recording(model, True), autocast():
            forward(x)
    return loss.detach().float() * len(y), (out.detach().argmax(1) != y).sum()


@torch.no_grad()
def evaluate(model, batches, autocast=contextlib.nullcontext, forward=None) -> dict:
    """Test loss, top-1 and top-5 error (%) in eval mode."""
    forward = model if forward is None else forward
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=batches.device, dtype=torch.float64)
    errors = torch.zeros(2, device=batches.device, dtype=torch.long)
    n = 0
    for x, y in batches.epoch():
        with autocast():
            out = forward(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum")
        top = out.topk(min(5, out.size(1)), dim=1).indices
        errors[0] += (top[:, 0] != y).sum()
        errors[1] += (top != y[:, None]).all(1).sum()
        n += len(y)
    model.train(was_training)
    e = errors.tolist()
    return {"loss": loss.item() / n, "err": 100.0 * e[0] / n, "err5": 100.0 * e[1] / n}


def set_eval_stats(model, which: str) -> None:
    """MBN layers: evaluate with the memory (the paper's rule) or with running averages."""
    for m in model.modules():
        if hasattr(m, "eval_stats"):
            m.eval_stats = which


def scheduled_values(model) -> dict:
    """The current value of every scheduled normalizer hyper-parameter (λ, r_max, d_max)."""
    for m in norms.norm_layers(model):
        found = {k: getattr(m, k).item() for k in ("lam", "r_max", "d_max") if isinstance(getattr(m, k, None), torch.Tensor)}
        if found:
            return found
    return {}


# ------------------------------------------------------------------------------- the loop
def setup_distributed(device: torch.device):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (NCCL on GPUs, gloo on
    CPUs) and pick this rank's GPU. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device


def epoch_metrics(loss_sum, err_sum, seen, world):
    """Training loss/error of the epoch over all ranks (one host sync per epoch)."""
    t = torch.stack([loss_sum.double(), err_sum.double(), torch.tensor(float(seen), device=loss_sum.device).double()])
    if world > 1:
        dist.all_reduce(t)
    loss, err, n = t.tolist()
    return loss / n, 100.0 * err / n, int(n)


def fit(cfg, run_dir: str, overrides=()) -> dict:
    """Train as configured, writing everything into run_dir (rank 0 only). Returns the final
    summary, or the summary so far when train.stop_after ends this invocation early."""
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    rank, world, device = setup_distributed(resolve_device(cfg.device))
    if world > 1:  # every rank writes into rank 0's run dir
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    lead = rank == 0
    os.makedirs(run_dir, exist_ok=True)
    seed_everything(cfg.seed + rank, cfg.deterministic)  # data order is seeded separately, per epoch
    perf = resolve_perf(cfg.perf, device)
    autocast = autocast_for(perf, device)
    train_batches, test_batches = make_loaders(cfg, device, rank, world, perf["channels_last"])

    model = make_model(cfg).to(device)
    if perf["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    net = model
    if world > 1:  # statistics are synchronised inside the normalizers, buffers stay equal
        net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    forward = torch.compile(net, mode=perf["compile_mode"]) if perf["compile"] else net

    per_epoch = len(train_batches)
    total_steps = cfg.train.steps or cfg.train.epochs * per_epoch
    num_epochs = math.ceil(total_steps / per_epoch)

    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    done_path = os.path.join(run_dir, "metrics.json")
    have_ckpt = os.path.isfile(ckpt_path)
    if cfg.resume is False and have_ckpt:
        raise UserError(f"{run_dir} already holds a checkpoint; continue it with resume=true "
                        "(or leave resume unset) or choose another hydra.run.dir")
    if cfg.resume and not have_ckpt:
        raise UserError(f"resume=true but there is no {CHECKPOINT} in {run_dir}; "
                        "pass hydra.run.dir=<the run's directory>")
    start_epoch, step, history, wandb_id = 0, 0, [], None
    if have_ckpt:
        state = load_checkpoint(ckpt_path, device)
        diff = config_differences(state["config"], cfg_dict)
        if diff:
            raise UserError(f"the checkpoint in {run_dir} was written by a different config; "
                            "resume with the same settings or start a new run dir. Differences: "
                            + "; ".join(diff))
        if os.path.isfile(done_path) and state["step"] >= total_steps:
            print(f"{run_dir} already finished; nothing to do")
            with open(done_path) as f:
                return json.load(f)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        start_epoch, step, history, wandb_id = state["epoch"], state["step"], state["history"], state.get("wandb_id")
        if lead:
            print(f"resuming {run_dir} at epoch {start_epoch} (step {step})")

    tracker = Tracker()
    if lead:
        record = run_record(cfg_dict, overrides, device)
        record.update(steps_per_epoch=per_epoch, total_steps=total_steps, epochs=num_epochs, world_size=world,
                      perf=perf)
        name = "run_record.json" if not start_epoch else f"run_record.resume{start_epoch}.json"
        atomic_write_text(os.path.join(run_dir, name), json.dumps(record, indent=2, default=str))
        trackers = [JsonlTracker(run_dir, history)]
        if cfg.logger.name == "wandb":
            trackers.append(WandbTracker(cfg, cfg_dict, record, run_dir, overrides, wandb_id))
            wandb_id = trackers[-1].id
        tracker = Trackers(trackers)
    show = lead and cfg.train.progress and cfg.logger.name != "none"

    scheduled = norms.norm_layers(model)
    stopped_early = False
    for epoch in range(start_epoch, num_epochs):
        steps = min(per_epoch, total_steps - step)
        net.train()
        loss_sum = torch.zeros((), device=device)
        err_sum = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(train_batches.epoch(epoch, steps), total=steps, desc=f"epoch {epoch + 1}/{num_epochs}",
                   disable=not show, leave=False, dynamic_ncols=True)
        for x, y in bar:
            progress = step / total_steps
            lr = step_lr(cfg.optim.lr, cfg.schedule.milestones, cfg.schedule.gamma, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for layer in scheduled:
                layer.set_progress(progress)
            loss, errors = train_step(net, optimizer, x, y, cfg.train.double_forward, autocast, forward)
            loss_sum += loss
            err_sum += errors
            seen += len(y)
            step += 1
            if lead and step % cfg.logger.log_every == 0:
                live = {"train/loss_running": loss_sum.item() / seen, "train/err_running": 100.0 * err_sum.item() / seen,
                        "lr": lr}
                bar.set_postfix(loss=f"{live['train/loss_running']:.3f}", err=f"{live['train/err_running']:.1f}",
                                lr=f"{lr:.3g}")
                tracker.log_step(live, step)
        train_time = time.perf_counter() - t0
        train_loss, train_err, seen = epoch_metrics(loss_sum, err_sum, seen, world)
        if lead:
            test = evaluate(model, test_batches, autocast, forward if world == 1 else None)
            metrics = {"epoch": epoch + 1, "step": step, "lr": lr, **scheduled_values(model),
                       "train_loss": train_loss, "train_err": train_err, "test_loss": test["loss"],
                       "test_err": test["err"], "test_err5": test["err5"],
                       "epoch_time": train_time, "images_per_s": seen / train_time}
            history.append(metrics)
            tracker.log_epoch(metrics, step)
            if cfg.logger.name != "none":
                tqdm.write(f"epoch {epoch + 1}/{num_epochs}  train loss {train_loss:.4f} err {train_err:.2f}%  "
                           f"test loss {test['loss']:.4f} err {test['err']:.2f}%  lr {lr:.3g}  "
                           f"{metrics['images_per_s']:.0f} img/s")
        rngs = rng_state()
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rngs)
            rngs = gathered
        if lead:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch + 1, "step": step, "rng": rngs, "config": cfg_dict,
                                        "history": history, "wandb_id": wandb_id})
        if world > 1:
            dist.barrier()
        if cfg.train.stop_after and epoch + 1 - start_epoch >= cfg.train.stop_after and epoch + 1 < num_epochs:
            stopped_early = True
            if lead:
                tqdm.write(f"stopping after {cfg.train.stop_after} epoch(s) as asked; continue with resume=true")
            break

    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not lead:
        return {}
    summary = dict(history[-1]) if history else {}
    summary.update(finished=not stopped_early, epochs=num_epochs, total_steps=total_steps,
                   wall_time=sum(h["epoch_time"] for h in history), world_size=world)
    if not stopped_early and any(hasattr(m, "eval_stats") for m in model.modules()):
        set_eval_stats(model, "running")
        summary["test_err_running"] = evaluate(model, test_batches, autocast)["err"]
        set_eval_stats(model, cfg.norm.eval_stats)
    if not stopped_early:
        atomic_write_text(done_path, json.dumps(summary, indent=2))
        print(f"final test error {summary['test_err']:.2f}% after {step} steps ({num_epochs} epochs); "
              f"run dir {run_dir}")
    tracker.finish(summary)
    return summary
