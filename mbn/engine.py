"""The training loop: build, resume, train epoch by epoch, evaluate, checkpoint, summarise."""
import contextlib
import math
import os
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from mbn import UserError, compile_cache, norms, preempt
from mbn.build import (autocast_for, make_model, make_optimizer, resolve_device, resolve_perf, seed_everything,
                       set_schedule)
from mbn.checkpoint import (CHECKPOINT, config_differences, load_checkpoint, rng_state, save_checkpoint,
                            set_rng_state)
from mbn.cli import environment_fault
from mbn.data import make_loaders
from mbn.rundir import RunLock, finished_run
from mbn.step import Evaluator, TrainStep, precise_data
from mbn.tracking import (JsonlTracker, Tracker, Trackers, WandbTracker, plural, progress_postfix, run_record,
                          stop_if_diverged, wandb_mode, write_json)
from mbn.validate import validate


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


def epoch_metrics(step: TrainStep, seen: int, world: int):
    """Training loss/error of the epoch over all ranks (the one host read of the epoch)."""
    t = torch.stack([step.loss_sum, step.errors.double(),
                     torch.tensor(float(seen), dtype=torch.float64, device=step.loss_sum.device)])
    if world > 1:
        dist.all_reduce(t)
    loss, err, n = t.tolist()
    return loss / n, 100.0 * err / n, int(n)


class Run:
    """Everything built for one training run."""

    def __init__(self, cfg, device, rank=0, world=1):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.perf = resolve_perf(cfg.perf, device)
        if world > 1:
            self.perf["cuda_graph"] = False  # collectives inside a captured step: not supported here
        self.autocast = autocast_for(self.perf, device)
        self.train_batches, self.test_batches = make_loaders(cfg, device, rank, world, self.perf["channels_last"])
        model = make_model(cfg).to(device)
        if self.perf["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = make_optimizer(cfg, model)
        self.net = model
        if world > 1:  # normalizers keep their own buffers (BN/BRN/MBN synchronise statistics, CBN/MABN
            # are per process, as their papers' code); rank 0's are checkpointed
            self.net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        if self.perf["compile"]:  # before the first compilation: a carried cache makes it a warm start
            compile_cache.use(cfg.perf.get("compile_cache"))
        self.forward = torch.compile(self.net, mode=self.perf["compile_mode"]) if self.perf["compile"] else self.net
        graph = self.perf["cuda_graph"]
        self.step = TrainStep(self.net, self.optimizer, self.train_batches, cfg.train.double_forward, self.autocast,
                              self.forward, graph)
        self.evaluate = Evaluator(model, self.test_batches, self.autocast, self.forward if world == 1 else model,
                                  graph and world == 1)
        self.scheduled = [m for m in norms.normalizers(model)
                          if type(m).set_progress is not norms.Normalizer.set_progress]
        self.per_epoch = len(self.train_batches)
        self.total_steps = cfg.train.steps or cfg.train.epochs * self.per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.per_epoch)

    def schedule(self, step: int) -> float:
        """Set the lr and the normalizers' scheduled values for `step`; returns the lr."""
        return set_schedule(self.cfg, self.optimizer, self.scheduled, step / self.total_steps)

    def train_epoch(self, epoch: int, step: int, steps: int, bar) -> int:
        """`steps` SGD steps of epoch `epoch` starting at global step `step`; no host reads."""
        self.net.train()
        self.step.reset()
        self.train_batches.start_epoch(epoch)
        for i in range(steps):
            lr = self.schedule(step + i)
            self.step()
            if bar is not None:  # host values only: no sync
                bar.set_postfix(progress_postfix(lr, norms.scheduled_values(self.model)), refresh=False)
                bar.update()
        return step + steps

    def final_evaluations(self) -> dict:
        """The test error with every other inference statistic the model supports, and PreciseBN's."""
        out = {}
        for mode in norms.inference_modes(self.model)[1:]:
            norms.inference_stats(self.model, mode)
            out[f"test_err_{mode}"] = self.evaluate(key=mode)["err"]
        norms.inference_stats(self.model, "default")
        n = self.cfg.train.precise_batches
        if n and norms.inference_modes(self.model):
            import copy

            model = copy.deepcopy(self.model)  # PreciseBN rewrites statistics: keep the trained model as is
            norms.precise_statistics(model, precise_data(self.train_batches, self.cfg.train.batch_size, n),
                                     self.autocast)
            out["test_err_precise"] = Evaluator(model, self.test_batches, self.autocast)()["err"]
        return out


def fit(cfg, run_dir: str, overrides=(), on_start=None) -> dict:
    """Train as configured, writing everything into run_dir (rank 0 only). Returns the final
    summary, or the summary so far when train.stop_after, train.time_limit or SLURM's time-limit
    signal (mbn.preempt) ends this invocation early. Nothing is written before every check has
    passed; then `on_start()` is called (train.py writes Hydra's .hydra/ files there). The run
    dir is locked while the run uses it (mbn.rundir)."""
    started = time.perf_counter()
    validate(cfg)  # out-of-range values: one clear error before anything is written
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    rank, world, device = setup_distributed(resolve_device(cfg.device))
    if world > 1:  # every rank writes into rank 0's run dir
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)
        run_dir = shared[0]
    lead = rank == 0
    deadline = os.environ.get("MBN_DEADLINE")
    if deadline and agreed(time.time() > float(deadline), world):  # a sweep job started after its time ran out
        print(f"skipping {run_dir}: the sweep's time limit has passed; rerun the sweep to continue")
        return {"finished": False}
    if lead:
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise environment_fault(e, "cannot create the run directory (hydra.run.dir):") from None
    with RunLock(run_dir) if lead else contextlib.nullcontext():
        done = agreed(finished_before(cfg, cfg_dict, run_dir) if lead else None, world)
        if done is not None:
            return done
        return _fit(cfg, cfg_dict, run_dir, overrides, on_start, started, rank, world, device)


def finished_before(cfg, cfg_dict, run_dir):
    """The summary of the finished run in run_dir (nothing to do), None if there is none; a finished
    run of another config, or resume=false, is refused. Its checkpoint is not needed."""
    found = finished_run(run_dir)
    if found is None:
        return None
    summary, record = found
    diff = []
    if record and record.get("config"):  # read as the tables read it: keys added since take their defaults
        from mbn.results.configs import filled_identity

        diff = config_differences(filled_identity(record), cfg_dict, "finished run")
    if diff:
        raise UserError(f"{run_dir} holds a finished run of a different config, which is kept; choose another "
                        "hydra.run.dir for this one. Differences: " + "; ".join(diff))
    if cfg.resume is False:
        raise UserError(f"{run_dir} holds a finished run, which is kept; resume=false needs a fresh directory: "
                        "choose another hydra.run.dir")
    print(f"{run_dir} already finished (its metrics.json); nothing to do")
    return summary


def _fit(cfg, cfg_dict, run_dir, overrides, on_start, started, rank, world, device) -> dict:
    lead = rank == 0
    seed_everything(cfg.seed + rank, cfg.deterministic)  # data order is seeded separately, per epoch
    run = Run(cfg, device, rank, world)
    model, optimizer = run.model, run.optimizer

    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    done_path = os.path.join(run_dir, "metrics.json")
    state = load_or_check(cfg, cfg_dict, run_dir, ckpt_path, device)
    # W&B's server is asked before anything is written: a refused logger.mode=online changes nothing
    mode = wandb_mode(cfg, run_dir) if lead and cfg.logger.name == "wandb" else None
    if lead and on_start is not None:
        on_start()
    start_epoch, step, history, wandb_id = 0, 0, [], None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        start_epoch, step, history, wandb_id = state["epoch"], state["step"], state["history"], state.get("wandb_id")
        if lead:
            print(f"resuming {run_dir} after epoch {start_epoch} of {run.num_epochs} (step {step})")

    tracker, wandb_id = make_tracker(cfg, cfg_dict, run, run_dir, overrides, history, start_epoch, wandb_id, mode) \
        if lead else (Tracker(), wandb_id)
    show = lead and cfg.train.progress and cfg.logger.name != "none"  # logger=none: the epoch lines only
    if lead:
        print(f"{'resuming' if start_epoch else 'training'} {cfg.model.name} with norm={cfg.norm.name} on "
              f"{cfg.data.name} for {plural(run.num_epochs, 'epoch')}; run dir {run_dir}", flush=True)
    stopped_early, preempted = None, False  # the reason, if this invocation ends early
    for epoch in range(start_epoch, run.num_epochs):
        t0 = time.perf_counter()
        first_step, steps = step, min(run.per_epoch, run.total_steps - step)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{run.num_epochs}", leave=False, dynamic_ncols=True) \
            if show else None
        step = run.train_epoch(epoch, step, steps, bar)
        if bar is not None:
            bar.close()
        train_loss, train_err, seen = epoch_metrics(run.step, steps * cfg.train.batch_size // world, world)
        train_time = time.perf_counter() - t0
        test = run.evaluate(key="default") if lead else None
        # every loss the run computes, judged before this epoch's checkpoint (rank 0's test loss for all)
        losses = agreed({"train_loss": train_loss, **({"test_loss": test["loss"]} if lead else {})}, world)
        stop_if_diverged(losses, epoch + 1, step, run_dir if lead else None)
        if lead:
            if tracker.wants_steps:  # per-step curves: one read of the epoch's device buffer
                tracker.log_steps(first_step, *run.step.step_curves(steps))
            metrics = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                       **{k: float(v) for k, v in norms.scheduled_values(model).items()},
                       "train_loss": train_loss, "train_err": train_err,
                       "test_loss": test["loss"], "test_err": test["err"], "test_err5": test["err5"],
                       "epoch_time": train_time, "images_per_s": seen / train_time}
            history.append(metrics)
            tracker.log_epoch(metrics, step)
            tqdm.write(f"epoch {epoch + 1}/{run.num_epochs}  train loss {train_loss:.4f} err {train_err:.2f}%  "
                       f"test loss {test['loss']:.4f} err {test['err']:.2f}%  lr {metrics['lr']:.3g}  "
                       f"{metrics['images_per_s']:.0f} img/s")
        save(run, ckpt_path, epoch, step, history, cfg_dict, wandb_id)
        epoch_wall = time.perf_counter() - t0
        reason = agreed(stop_reason(cfg, epoch + 1 - start_epoch, time.perf_counter() - started, epoch_wall), world)
        if reason and epoch + 1 < run.num_epochs:
            stopped_early = reason
            preempted = preempt.stopping(reason)  # then train.py requeues the job
            if lead:
                tqdm.write(f"stopping after epoch {epoch + 1} ({reason})"
                           + ("" if preempted else f"; continue with: {preempt.same_command()}"))
            break

    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if not lead:
        return {}
    summary = dict(history[-1]) if history else {}
    summary.update(finished=not stopped_early, epochs=run.num_epochs, total_steps=run.total_steps,
                   wall_time=sum(h["epoch_time"] for h in history), world_size=world)
    if stopped_early:
        summary.update(status="preempted" if preempted else "stopped", stop_reason=stopped_early)
        if preempted:  # the run dir says why the job ended; not finished, so no table takes it
            write_json(done_path, summary)
    else:
        summary.update(run.final_evaluations())
        summary["status"] = "finished"
        write_json(done_path, summary)
        print(f"final test error {summary['test_err']:.2f}% after {step} steps ({plural(run.num_epochs, 'epoch')}); "
              f"run dir {run_dir}")
    tracker.finish(summary)
    return summary


def load_or_check(cfg, cfg_dict, run_dir, ckpt_path, device):
    """The checkpoint to continue (None for a fresh run), after checking it belongs to this config."""
    have_ckpt = os.path.isfile(ckpt_path)
    if cfg.resume is False and have_ckpt:
        raise UserError(f"{run_dir} already holds a checkpoint; continue it with resume=true "
                        "(or leave resume unset) or choose another hydra.run.dir")
    if cfg.resume and not have_ckpt:
        raise UserError(f"resume=true but there is no {CHECKPOINT} in {run_dir}; "
                        "pass hydra.run.dir=<the run's directory>")
    if not have_ckpt:
        return None
    state = load_checkpoint(ckpt_path, device)
    diff = config_differences(state["config"], cfg_dict)
    if diff:
        raise UserError(f"the checkpoint in {run_dir} was written by a different config; "
                        "resume with the same settings or start a new run dir. Differences: " + "; ".join(diff))
    return state


def make_tracker(cfg, cfg_dict, run, run_dir, overrides, history, start_epoch, wandb_id, mode=None):
    record = run_record(cfg_dict, overrides, run.device)
    record.update(steps_per_epoch=run.per_epoch, total_steps=run.total_steps, epochs=run.num_epochs,
                  world_size=run.world, perf=run.perf)
    name = "run_record.json" if not start_epoch else f"run_record.resume{start_epoch}.json"
    write_json(os.path.join(run_dir, name), record)
    trackers = [JsonlTracker(run_dir, history)]
    if cfg.logger.name == "wandb":
        trackers.append(WandbTracker(cfg, cfg_dict, record, run_dir, overrides, wandb_id, mode))
        wandb_id = trackers[-1].id
    return Trackers(trackers), wandb_id


def save(run, ckpt_path, epoch, step, history, cfg_dict, wandb_id):
    """Checkpoint at an epoch boundary: model (normalizer state included), optimizer, every RNG."""
    rngs = rng_state()
    if run.world > 1:
        gathered = [None] * run.world
        dist.all_gather_object(gathered, rngs)
        rngs = gathered
    if run.rank == 0:
        save_checkpoint(ckpt_path, {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                                    "epoch": epoch + 1, "step": step, "rng": rngs, "config": cfg_dict,
                                    "history": history, "wandb_id": wandb_id})
    if run.world > 1:
        dist.barrier()


def agreed(decision, world: int):
    """Rank 0's decision, for every rank (clocks differ: ranks deciding alone could part ways)."""
    if world == 1:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop_reason(cfg, epochs_done: int, elapsed: float, epoch_wall: float):
    """Why this invocation should end at this epoch boundary (None: go on). SLURM's signal ahead of
    the job's time limit (mbn.preempt) ends it at the first boundary. Another epoch must fit
    before train.time_limit (seconds since start) and before $MBN_DEADLINE (an absolute time set
    by `scripts/sweep.py --time-limit` for every job of a sweep)."""
    if preempt.requested():
        return preempt.reason()
    if cfg.train.stop_after and epochs_done >= cfg.train.stop_after:
        return f"train.stop_after={cfg.train.stop_after}"
    limit = cfg.train.get("time_limit")
    if limit and elapsed + 1.2 * epoch_wall > limit:
        return f"train.time_limit={limit:g}s"
    deadline = os.environ.get("MBN_DEADLINE")
    if deadline and time.time() + 1.2 * epoch_wall > float(deadline):
        return "the sweep's time limit"
    return None
